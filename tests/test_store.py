"""The embedding store: layout and attributes, journal and commit, incremental rules, locking, readers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.discover import ImageRecord
from pipeline.errors import UserError
from pipeline.store import FORMAT_VERSION, EmbeddingStore, FileState, Segment

ATTRS = {"kind": "onnx", "fingerprint": "f1", "embedding_dim": 4, "weights_id": "random:seed=0"}
ROOT = Path("/data/pets")


def records(*items: tuple[str, str | None, str]) -> list[ImageRecord]:
    return [ImageRecord(*item) for item in items]


def segment(rows: dict[str, float], failures: dict[str, str] = {}, name="m", fingerprint="f1") -> Segment:
    """A segment whose embedding for each path is filled with the given value."""
    result = Segment(name, fingerprint, {**ATTRS, "fingerprint": fingerprint}, str(ROOT))
    for path, value in rows.items():
        result.records.append(ImageRecord(path))
        result.states.append(FileState(f"sha-{path}", 10, int(value)))
        result.embeddings.append(np.full(4, value, np.float32))
    for path, reason in failures.items():
        result.failures.append((path, FileState(f"sha-{path}", 1, 1), reason))
    return result


def by_path(store: EmbeddingStore, name="m") -> dict[str, float]:
    loaded = store.load(name)
    return {str(p): float(e[0]) for p, e in zip(loaded.paths, loaded.embeddings)}


DATASET = records(("cat/a.jpg", "cat", "train"), ("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""))


def test_round_trip_layout_and_attributes(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2, "c.jpg": 3}))
    assert (tmp_path / "e.h5.journal").is_dir() and not store.exists()
    store.commit(ROOT, DATASET, {"m": "f1"})
    assert not (tmp_path / "e.h5.journal").exists()

    loaded = store.load("m")
    assert loaded.embeddings.dtype == np.float32 and loaded.embeddings.shape == (3, 4)
    assert sorted(loaded.paths) == ["c.jpg", "cat/a.jpg", "dog/b.jpg"]
    labels = dict(zip(loaded.paths, loaded.labels))
    assert list(loaded.classes) == ["cat", "dog"]
    assert labels == {"cat/a.jpg": 0, "dog/b.jpg": 1, "c.jpg": -1} and loaded.labels.dtype == np.int32
    assert dict(zip(loaded.paths, loaded.splits)) == {"cat/a.jpg": "train", "dog/b.jpg": "test", "c.jpg": ""}
    assert dict(zip(loaded.paths, loaded.sha256))["c.jpg"] == "sha-c.jpg"
    assert loaded.attrs["weights_id"] == "random:seed=0"

    with h5py.File(store.path, "r") as raw:
        assert raw.attrs["format_version"] == FORMAT_VERSION and raw.attrs["dataset_root"] == str(ROOT)
        assert "labels int32" in raw.attrs["spec"]
        embeddings = raw["m/embeddings"]
        assert embeddings.compression == "gzip" and embeddings.chunks is not None and embeddings.shuffle
        assert raw["m/paths"].dtype.kind == "O" and h5py.check_string_dtype(raw["m/paths"].dtype).encoding == "utf-8"
        assert set(raw["m/failures"]) == {"paths", "reason", "sha256", "file_size", "file_mtime_ns"}


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="the HDF5 command-line tools are not installed")
def test_standard_hdf5_tools_read_the_store(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1}, {"dog/b.jpg": "broken"}))
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    listing = subprocess.run(["h5ls", "-r", str(store.path)], capture_output=True, text=True, check=True).stdout
    assert "/m/embeddings" in listing and "Dataset {1/Inf, 4}" in listing and "/m/failures/reason" in listing
    dump = subprocess.run(["h5dump", "-d", "/m/paths", str(store.path)], capture_output=True, text=True, check=True)
    assert '"cat/a.jpg"' in dump.stdout


def test_journal_rows_replace_older_rows_and_gone_files_are_dropped(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2, "c.jpg": 3}))
    store.commit(ROOT, DATASET, {"m": "f1"})
    store.append(segment({"dog/b.jpg": 20}))  # changed content
    store.append(segment({"dog/b.jpg": 21, "new.jpg": 5}))  # changed again within the same run
    current = records(("cat/a.jpg", "dog", "train"), ("dog/b.jpg", "dog", "test"), ("new.jpg", "bird", ""))
    assert store.commit(ROOT, current, {"m": "f1"}) == {"m": 1}  # c.jpg is gone
    assert by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 21, "new.jpg": 5}
    loaded = store.load("m")
    assert list(loaded.classes) == ["cat", "dog", "bird"]  # indices of earlier classes never move
    assert dict(zip(loaded.paths, loaded.labels)) == {"cat/a.jpg": 1, "dog/b.jpg": 1, "new.jpg": 2}


def test_failures_are_recorded_and_superseded(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1}, {"dog/b.jpg": "broken"}))
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    embedded, failed = store.state("m", "f1")
    assert set(embedded) == {"cat/a.jpg"} and set(failed) == {"dog/b.jpg"}
    store.append(segment({"dog/b.jpg": 2}, {"cat/a.jpg": "now broken"}))
    embedded, failed = store.state("m", "f1")  # the journal counts before it is committed
    assert set(embedded) == {"dog/b.jpg"} and set(failed) == {"cat/a.jpg"}
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert by_path(store) == {"dog/b.jpg": 2}
    with h5py.File(store.path) as raw:
        assert list(raw["m/failures/paths"].asstr()) == ["cat/a.jpg"]
        assert list(raw["m/failures/reason"].asstr()) == ["now broken"]


def test_other_fingerprints_are_not_counted_and_untouched_sets_are_kept(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1}))
    store.append(segment({"cat/a.jpg": 9}, name="pixels", fingerprint="p"))
    store.commit(ROOT, DATASET[:1], {"m": "f1", "pixels": "p"})
    assert store.state("m", "f2") == ({}, {})
    store.append(segment({"cat/a.jpg": 7}, fingerprint="f2"))
    store.commit(ROOT, DATASET[:1], {"m": "f2"})  # pixels not in this run: copied as it was
    assert by_path(store) == {"cat/a.jpg": 7} and by_path(store, "pixels") == {"cat/a.jpg": 9}
    assert store.load_attrs("m")["fingerprint"] == "f2"
    assert store.feature_sets() == ["m", "pixels"]


def test_an_uncommitted_journal_leaves_the_file_whole(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1}))
    store.commit(ROOT, DATASET[:1], {"m": "f1"})
    before = store.path.read_bytes()
    store.append(segment({"dog/b.jpg": 2}))  # a run killed after this: no commit
    assert store.path.read_bytes() == before
    with pytest.warns(UserWarning, match="interrupted run"):
        assert by_path(store) == {"cat/a.jpg": 1}
    assert not store.matches(DATASET[:1], ["m"])
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 2}
    assert store.matches(DATASET[:2], ["m"]) and not store.matches(DATASET, ["m"])


def test_a_second_writer_gets_a_clear_error(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with store.lock():
        with pytest.raises(UserError, match="another run is writing"):
            with EmbeddingStore(tmp_path / "e.h5").lock():
                pass
    with store.lock():  # released
        pass


def test_missing_store_set_and_foreign_files_are_user_errors(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with pytest.raises(UserError, match="run extract first"):
        store.load("m")
    store.append(segment({"cat/a.jpg": 1}))
    store.commit(ROOT, DATASET[:1], {"m": "f1"})
    with pytest.raises(UserError, match=r"has no 'vgg16' features \(it has: m\)"):
        store.load("vgg16")
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["x"] = 1
    with pytest.raises(UserError, match="not an embedding store"):
        EmbeddingStore(tmp_path / "other.h5").load("m")
    shutil.copy(tmp_path / "e.h5", tmp_path / "future.h5")
    with h5py.File(tmp_path / "future.h5", "a") as future:
        future.attrs["format_version"] = 2
    with pytest.raises(UserError, match="future.h5 is embedding store format 2, and this version .* reads format 1"):
        EmbeddingStore(tmp_path / "future.h5").load("m")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable HDF5 store"):
        EmbeddingStore(tmp_path / "junk.h5").load("m")


def test_journal_rows_of_files_gone_since_a_killed_run_are_dropped(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}, {"c.jpg": "broken"}))  # then the run was killed
    store.commit(ROOT, DATASET[:1], {"m": "f1"})  # dog/b.jpg and c.jpg were deleted meanwhile
    assert by_path(store) == {"cat/a.jpg": 1}
    assert store.counts("m") == (1, 0)


def test_every_feature_set_is_merged_and_follows_the_dataset(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    store.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}, name="vgg", fingerprint="v"))
    store.append(segment({"cat/a.jpg": 3, "dog/b.jpg": 4}))
    store.commit(ROOT, DATASET[:2], {"m": "f1"})  # this run computed "m" only; "vgg" came from a killed run
    assert by_path(store, "vgg") == {"cat/a.jpg": 1, "dog/b.jpg": 2}
    relabelled = records(("cat/a.jpg", "lynx", "train"))
    store.commit(ROOT, relabelled, {"m": "f1"})  # dog/b.jpg deleted, cat/a.jpg relabelled
    for name in ("vgg", "m"):
        loaded = store.load(name)
        assert list(loaded.paths) == ["cat/a.jpg"] and loaded.classes[loaded.labels[0]] == "lynx"


def test_journal_roots_and_providers_are_recorded(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    first = segment({"cat/a.jpg": 1})
    first.attrs["provider"] = "CUDAExecutionProvider"
    store.append(first)
    assert store.journal_roots() == {str(ROOT)}
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    second = segment({"dog/b.jpg": 2})
    second.attrs["provider"] = "CPUExecutionProvider"
    store.append(second)
    store.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert store.load_attrs("m")["provider"] == "CPUExecutionProvider,CUDAExecutionProvider"


def test_rows_across_many_chunks_are_compressed_in_threads_as_standard_gzip(tmp_path):
    dim = 512  # 512 rows per 1 MB chunk
    rng = np.random.default_rng(0)
    wanted = {f"{i:05d}.jpg": rng.random(dim, dtype=np.float32) for i in range(1300)}
    store = EmbeddingStore(tmp_path / "s.h5")
    names = sorted(wanted)
    for start in range(0, 1300, 300):  # segments that do not line up with chunks
        part = Segment("m", "f1", {**ATTRS, "embedding_dim": dim}, str(ROOT))
        for path in names[start : start + 300]:
            part.records.append(ImageRecord(path))
            part.states.append(FileState("0" * 64, 1, 1))
            part.embeddings.append(wanted[path])
        store.append(part)
    store.commit(ROOT, [ImageRecord(p) for p in names], {"m": "f1"})
    kept = names[100:1250:2]  # drop rows, then add one: old rows copied, new ones appended
    extra = Segment("m", "f1", {**ATTRS, "embedding_dim": dim}, str(ROOT))
    extra.records.append(ImageRecord("new.jpg"))
    extra.states.append(FileState("1" * 64, 1, 1))
    extra.embeddings.append(np.full(dim, 7, np.float32))
    store.append(extra)
    store.commit(ROOT, [ImageRecord(p) for p in kept + ["new.jpg"]], {"m": "f1"})
    loaded = store.load("m")
    assert list(loaded.paths) == kept + ["new.jpg"]
    np.testing.assert_array_equal(loaded.embeddings[:-1], np.stack([wanted[p] for p in kept]))
    np.testing.assert_array_equal(loaded.embeddings[-1], np.full(dim, 7, np.float32))
    with h5py.File(store.path, "r") as f:
        dataset = f["m/embeddings"]
        assert (dataset.compression, dataset.compression_opts, dataset.shuffle, dataset.chunks) == ("gzip", 4, True, (512, dim))
