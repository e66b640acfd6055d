"""Export: a feature set's live rows as one flat file, each format equal to what the store loads."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pyarrow.parquet
import pytest

from pipeline.errors import UserError
from pipeline.store import EmbeddingStore
from pipeline.store.export import EXPORT_FORMATS, export_set
from tests.test_store import ROOT, records, segment


@pytest.fixture
def store(tmp_path) -> EmbeddingStore:
    """Two versions: five rows over two shards, then one file gone and one changed (a third shard)."""
    store = EmbeddingStore(tmp_path / "e.h5")
    listing = [("cat/a.jpg", "cat", "train"), ("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""),
               ("cat/d.jpg", "cat", "validation"), ("dog/é.jpg", "dog", "train")]
    with store.writer() as writer:
        writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2, "c.jpg": 3}, dim=6))
        writer.append(segment({"cat/d.jpg": 4, "dog/é.jpg": 5}, dim=6))
        writer.commit(ROOT, records(*listing), {"m": "f1"})
        writer.append(segment({"dog/b.jpg": 20}, dim=6))
        writer.commit(ROOT, records(*[row for row in listing if row[0] != "cat/a.jpg"]), {"m": "f1"})
    return store


def read_back(path, file_format: str) -> dict[str, list]:
    if file_format == "parquet":
        table = pyarrow.parquet.read_table(path).to_pydict()
        table["label"] = [label or "" for label in table["label"]]
        return {**table, "embedding": np.array(table["embedding"], np.float32)}
    if file_format == "hdf5":
        with h5py.File(path) as data:
            return {name: data[name].asstr()[()].tolist() for name in ("path", "label", "split")} | {
                "sha256": data["sha256"][()].astype(str).tolist(), "embedding": data["embedding"][()]}
    with np.load(path) as data:
        return {name: data[name].tolist() for name in ("path", "label", "split", "sha256")} | {
            "embedding": data["embedding"]}


@pytest.mark.parametrize("file_format", EXPORT_FORMATS)
def test_each_format_holds_the_live_rows_as_the_store_loads_them_a_block_at_a_time(store, tmp_path, file_format):
    out = tmp_path / f"m.{file_format}"
    assert export_set(store, "m", out, file_format, block_rows=1) == 4
    written = read_back(out, file_format)
    loaded = store.load("m")
    assert written["path"] == loaded.paths.tolist() == ["c.jpg", "cat/d.jpg", "dog/é.jpg", "dog/b.jpg"]
    assert written["label"] == ["", "cat", "dog", "dog"] and written["split"] == loaded.splits.tolist()
    assert written["sha256"] == loaded.sha256.tolist() and np.array_equal(written["embedding"], loaded.embeddings)


def test_an_npz_is_numpys_own_and_a_version_exports_as_it_was(store, tmp_path):
    export_set(EmbeddingStore(f"{store.path}@1"), "m", tmp_path / "v1.npz", "npz")
    assert {info.filename for info in zipfile.ZipFile(tmp_path / "v1.npz").infolist()} == {
        "path.npy", "label.npy", "split.npy", "sha256.npy", "embedding.npy"}
    with np.load(tmp_path / "v1.npz") as data:
        assert data["path"].tolist() == ["cat/a.jpg", "dog/b.jpg", "c.jpg", "cat/d.jpg", "dog/é.jpg"]
        assert data["embedding"][:, 0].tolist() == [1, 2, 3, 4, 5]


def test_mistakes_are_one_sentence_and_leave_no_file(store, tmp_path):
    with pytest.raises(UserError, match=r"e.h5 has no 'n' features \(it has: m\); --set names one of them"):
        export_set(store, "n", tmp_path / "n.parquet", "parquet")
    with pytest.raises(UserError, match="--format csv is not one of parquet, hdf5, npz"):
        export_set(store, "m", tmp_path / "m.csv", "csv")
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob("*.csv"))
    asked = subprocess.run([sys.executable, "-m", "pipeline.store", "export", str(store.path), "--set", "m"],
                           capture_output=True, text=True, timeout=120)
    assert asked.returncode == 2 and "say which set and where:" in asked.stderr and "(SET one of: m)" in asked.stderr
    done = subprocess.run([sys.executable, "-m", "pipeline.store", "export", str(store.path), "--set", "m", "--out",
                           str(tmp_path / "m.parquet")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"{tmp_path / 'm.parquet'}: 4 rows of m from ")
