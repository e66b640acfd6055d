"""The index file: round trip, live rows and counts, the virtual-dataset view over the shards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store.index as index_module
from pipeline.store import EmbeddingStore
from pipeline.store.index import Index, SetIndex, open_store_file, read_index, write_index
from pipeline.store.shards import ShardHeader, ShardTable, write_shard
from tests.test_store import ROOT, records, segment

ATTRS = {"kind": "onnx", "fingerprint": "f1", "embedding_dim": 3}


def shard(folder, name: str, values: list[float], failures: int = 0):
    rows = ShardTable(np.array([f"{name}-{i}.jpg" for i in range(len(values))], dtype=str),
                      np.array(["0" * 64] * len(values), dtype=str), np.ones(len(values), np.int64),
                      np.ones(len(values), np.int64))
    failed = ShardTable(np.array([f"{name}-bad{i}.jpg" for i in range(failures)], dtype=str),
                        np.array([""] * failures, dtype=str), np.ones(failures, np.int64), np.ones(failures, np.int64),
                        np.array(["broken"] * failures, dtype=str))
    embeddings = np.repeat(np.array(values, np.float32)[:, None], 3, axis=1)
    return write_shard(folder, f"m/{name}.h5", ShardHeader("m", "f1", "/d", 0, "extract", ATTRS), rows, embeddings,
                       failed)


def two_shards(tmp_path) -> Index:
    folder = tmp_path / "e.h5.shards"
    shards = [shard(folder, "a", [1, 2, 3], failures=1), shard(folder, "b", [4, 5])]
    set_index = SetIndex(ATTRS, shards, np.array([0, 1, 0, -1, 1], np.int32), np.array([1, 3, 1, 0, 2], np.uint8),
                         np.array([1, 3], np.int64), np.array([0], np.int64))
    return Index(7, "/d", ["cat", "dog"], {"m": set_index})


def test_an_index_round_trips_and_counts_only_live_rows(tmp_path):
    index = two_shards(tmp_path)
    write_index(tmp_path / "e.h5", index, tmp_path / "e.h5.shards")
    with open_store_file(tmp_path / "e.h5") as store:
        back = read_index(store)
        assert store.attrs["shards_folder"] == "e.h5.shards" and "MUST" in store.attrs["spec"]
    assert (back.version, back.dataset_root, back.classes) == (7, "/d", ["cat", "dog"])
    got, want = back.sets["m"], index.sets["m"]
    assert got.shards == want.shards and got.attrs == ATTRS
    for field in ("labels", "splits", "deleted", "deleted_failures"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.counts() == (3, 0) and list(got.offsets()) == [0, 3, 5] and list(got.live()) == [1, 0, 1, 0, 1]


def test_the_view_holds_the_live_rows_and_reads_nan_where_a_shard_is_missing(tmp_path):
    write_index(tmp_path / "e.h5", two_shards(tmp_path), tmp_path / "e.h5.shards")
    os.chdir("/")  # sources are named relative to the index: any working directory
    with h5py.File(tmp_path / "e.h5", "r") as store:
        assert store["m/embeddings"].is_virtual
        np.testing.assert_array_equal(store["m/embeddings"][:, 0], [1, 3, 5])
    (tmp_path / "e.h5.shards" / "m" / "b.h5").unlink()
    with h5py.File(tmp_path / "e.h5", "r") as store:
        assert np.isnan(store["m/embeddings"][2]).all()  # why the pipeline's readers never use the view


def test_a_view_of_too_many_pieces_is_left_out_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "VIEW_PIECES", 2)
    write_index(tmp_path / "e.h5", two_shards(tmp_path), tmp_path / "e.h5.shards")  # three runs of live rows
    with h5py.File(tmp_path / "e.h5", "r") as store:
        assert "embeddings" not in store["m"] and "python -m pipeline.store compact" in store["m"].attrs["view"]


def test_an_empty_set_has_an_empty_view(tmp_path):
    write_index(tmp_path / "e.h5", Index(1, "/d", [], {"m": SetIndex(ATTRS)}), tmp_path / "e.h5.shards")
    with h5py.File(tmp_path / "e.h5", "r") as store:
        assert store["m/embeddings"].shape == (0, 3)


@pytest.fixture(autouse=True)
def _back_to_the_start():
    where = os.getcwd()
    yield
    os.chdir(where)


def docs_snippet(marker: str) -> str:
    """The Python block of docs/store.md that holds ``marker``."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "store.md").read_text(encoding="utf-8")
    return next(code for code in re.findall(r"^```python\n(.*?)^```", page, re.S | re.M) if marker in code)


def test_every_live_row_is_named_in_the_index_for_h5py_alone_as_docs_store_md_shows(tmp_path):
    store = EmbeddingStore(tmp_path / "features" / "embeddings.h5")
    with store.writer() as writer:  # three shards, then deletions, a changed file and a compaction
        writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}, name="resnet50"))
        writer.append(segment({"c.jpg": 3, "cat/d.jpg": 4}, name="resnet50"))
        writer.commit(ROOT, records(("cat/a.jpg", "cat", "train"), ("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""),
                                    ("cat/d.jpg", "cat", "validation")), {"resnet50": "f1"})
        writer.append(segment({"dog/b.jpg": 20, "chien/été.jpg": 5}, name="resnet50"))
        writer.commit(ROOT, records(("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""), ("cat/d.jpg", "cat", "train"),
                                    ("chien/été.jpg", "dog", "train")), {"resnet50": "f1"})
    expected = store.load("resnet50")
    code = docs_snippet('index["resnet50"]') + (
        "\nimport json, sys\n"
        "assert sys.modules['pipeline'] is None and not [m for m in sys.modules if m.startswith('pipeline.')]\n"
        "print(json.dumps([paths.tolist(), labels.tolist(), splits.tolist(), sha256.tolist(), "
        "embeddings[:, 0].tolist(), named]))"
    )
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pipeline'] = None\n" + code],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    paths, labels, splits, sha256, first, named = json.loads(done.stdout)
    assert paths == expected.paths.tolist() == ["c.jpg", "cat/d.jpg", "dog/b.jpg", "chien/été.jpg"]
    assert labels == expected.labels.tolist() and splits == expected.splits.tolist()
    assert sha256 == expected.sha256.tolist() and first == expected.embeddings[:, 0].tolist()
    assert named == {"cat/d.jpg": "cat", "dog/b.jpg": "dog", "chien/été.jpg": "dog"}
    with store.writer() as writer:
        writer.append(segment({"new.jpg": 6}, name="resnet50"))  # carried from the index it replaces, plus its own
        writer.commit(ROOT, records(("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""), ("cat/d.jpg", "cat", "train"),
                                    ("chien/été.jpg", "dog", "train"), ("new.jpg", None, "")), {"resnet50": "f1"})
        writer.compact(force=True)  # rewritten shards: the rows read from them, in the same order
    with h5py.File(store.path) as index:
        assert index["resnet50/rows/path"].asstr()[()].tolist() == [*paths, "new.jpg"]
