"""The embedding store's public class: layout, pending shards and commit, incremental rules, locking, errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import UserError, command
from pipeline.extract.discover import ImageRecord
from pipeline.store import FORMAT_VERSION, EmbeddingStore, FileState, Segment

ATTRS = {"kind": "onnx", "fingerprint": "f1", "embedding_dim": 4, "weights_id": "random:seed=0"}
ROOT = Path("/data/pets")


def records(*items: tuple[str, str | None, str]) -> list[ImageRecord]:
    return [ImageRecord(*item) for item in items]


def sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(path.encode()).hexdigest()


def segment(
    rows: dict[str, float], failures: dict[str, str] | None = None, name="m", fingerprint="f1", dim=4
) -> Segment:
    """A segment whose embedding for each path is filled with the given value."""
    result = Segment(name, fingerprint, {**ATTRS, "fingerprint": fingerprint, "embedding_dim": dim}, str(ROOT))
    for path, value in rows.items():
        result.records.append(ImageRecord(path))
        result.states.append(FileState(sha(path), 10, int(value)))
        result.embeddings.append(np.full(dim, value, np.float32))
    for path, reason in (failures or {}).items():
        result.failures.append((path, FileState(sha(path), 1, 1), reason))
    return result


def by_path(store: EmbeddingStore, name="m") -> dict[str, float]:
    loaded = store.load(name)
    return {str(p): float(e[0]) for p, e in zip(loaded.paths, loaded.embeddings)}


def shard_files(store: EmbeddingStore) -> dict[str, int]:
    """Every shard file, with its modification time: shards are never modified once written."""
    return {p.relative_to(store.shards).as_posix(): p.stat().st_mtime_ns for p in store.shards.glob("*/*.h5")}


def listed_files(store: EmbeddingStore) -> set[str]:
    """The shard files the current version lists (earlier versions' may be kept beside them)."""
    return store.current_index(arrays=False).listed()


DATASET = records(("cat/a.jpg", "cat", "train"), ("dog/b.jpg", "dog", "test"), ("c.jpg", None, ""))


def test_round_trip_layout_and_attributes(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2, "c.jpg": 3}))
    assert len(shard_files(store)) == 1 and not store.exists()  # a pending shard, no index yet
    writer.commit(ROOT, DATASET, {"m": "f1"})

    loaded = store.load("m")
    assert loaded.embeddings.dtype == np.float32 and loaded.embeddings.shape == (3, 4)
    assert sorted(loaded.paths) == ["c.jpg", "cat/a.jpg", "dog/b.jpg"]
    labels = dict(zip(loaded.paths, loaded.labels))
    assert list(loaded.classes) == ["cat", "dog"]
    assert labels == {"cat/a.jpg": 0, "dog/b.jpg": 1, "c.jpg": -1} and loaded.labels.dtype == np.int32
    assert dict(zip(loaded.paths, loaded.splits)) == {"cat/a.jpg": "train", "dog/b.jpg": "test", "c.jpg": ""}
    assert dict(zip(loaded.paths, loaded.sha256))["c.jpg"] == sha("c.jpg")
    assert loaded.attrs["weights_id"] == "random:seed=0"
    assert loaded.root == str(ROOT) and loaded.files()[0] == ROOT / loaded.paths[0]

    with h5py.File(store.path, "r") as index:
        assert index.attrs["format_version"] == FORMAT_VERSION == 2 and index.attrs["dataset_root"] == str(ROOT)
        assert "MUST" in index.attrs["spec"] and index.attrs["version"] == 1
        assert index.attrs["shards_folder"] == "e.h5.shards"
        assert list(index["m/shards/rows"]) == [3] and list(index["m/labels"]) == [0, 1, -1]
        np.testing.assert_array_equal(index["m/embeddings"][()], loaded.embeddings)  # the virtual view
    (name,) = shard_files(store)
    with h5py.File(store.shards / name, "r") as shard:
        assert shard.attrs["encoding"] == "pipeline.embedding-shard" and shard.attrs["feature_set"] == "m"
        embeddings = shard["embeddings"]
        assert embeddings.compression == "gzip" and embeddings.chunks is not None and embeddings.shuffle
        assert h5py.check_string_dtype(shard["paths"].dtype).encoding == "utf-8"
        assert set(shard["failures"]) == {"paths", "path_key", "reason", "sha256", "file_size", "file_mtime_ns"}


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="the HDF5 command-line tools are not installed")
def test_standard_hdf5_tools_read_the_index_and_the_shards(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}, {"dog/b.jpg": "broken"}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    listing = subprocess.run(["h5ls", "-r", str(store.path)], capture_output=True, text=True, check=True).stdout
    assert "/m/embeddings" in listing and "Dataset {1, 4}" in listing and "/m/shards/file" in listing
    # The view's sources are named relative to the index: h5dump resolves them from any working directory.
    dump = subprocess.run(["h5dump", "-d", "/m/embeddings", str(store.path)], capture_output=True, text=True,
                          check=True, cwd="/")
    assert "(0,0): 1, 1, 1, 1" in dump.stdout
    (name,) = shard_files(store)
    dump = subprocess.run(["h5dump", "-d", "/failures/reason", str(store.shards / name)], capture_output=True,
                          text=True, check=True)
    assert '"broken"' in dump.stdout


def test_pending_rows_replace_older_rows_and_gone_files_are_dropped(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2, "c.jpg": 3}))
    writer.commit(ROOT, DATASET, {"m": "f1"})
    writer.append(segment({"dog/b.jpg": 20}))  # changed content
    writer.append(segment({"dog/b.jpg": 21, "new.jpg": 5}))  # changed again within the same run
    current = records(("cat/a.jpg", "dog", "train"), ("dog/b.jpg", "dog", "test"), ("new.jpg", "bird", ""))
    assert writer.commit(ROOT, current, {"m": "f1"}) == {"m": 1}  # c.jpg is gone
    assert by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 21, "new.jpg": 5}
    loaded = store.load("m")
    assert list(loaded.classes) == ["cat", "dog", "bird"]  # indices of earlier classes never move
    assert dict(zip(loaded.paths, loaded.labels)) == {"cat/a.jpg": 1, "dog/b.jpg": 1, "new.jpg": 2}


def test_failures_are_recorded_and_superseded(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}, {"dog/b.jpg": "broken"}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert len(writer.known("m", "f1")) == 2 and store.counts("m") == (1, 1)
    assert list(store.failures("m").paths) == ["dog/b.jpg"]
    writer.append(segment({"dog/b.jpg": 2}, {"cat/a.jpg": "now broken"}))
    assert store.counts("m") == (1, 1)  # pending shards count once committed...
    known = writer.known("m", "f1")  # ...but are known at once: a killed run's work is not done again
    assert len(known) == 2 and not known.needed(known.keys, known.sizes, known.mtimes).any()
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert by_path(store) == {"dog/b.jpg": 2}
    failures = store.failures("m")
    assert list(failures.paths) == ["cat/a.jpg"] and list(failures.reasons) == ["now broken"]


def test_known_files_are_needed_again_when_they_change_or_were_unreadable(tmp_path):
    from pipeline.store.spec import path_keys

    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    unreadable = segment({"cat/a.jpg": 1})
    unreadable.failures.append(("dog/b.jpg", FileState("", -1, -1), "unreadable: permission denied"))
    writer.append(unreadable)
    writer.commit(ROOT, DATASET, {"m": "f1"})
    known = writer.known("m", "f1")
    keys = path_keys(["cat/a.jpg", "cat/a.jpg", "dog/b.jpg", "c.jpg"])
    needed = known.needed(keys, np.array([10, 11, -1, 5]), np.array([1, 1, -1, 5]))
    assert list(needed) == [False, True, True, True]  # same; changed size; never read; new


def test_other_fingerprints_are_not_counted_and_untouched_sets_are_kept(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.append(segment({"cat/a.jpg": 9}, name="pixels", fingerprint="p"))
    writer.commit(ROOT, DATASET[:1], {"m": "f1", "pixels": "p"})
    assert len(writer.known("m", "f2")) == 0
    writer.append(segment({"cat/a.jpg": 7}, fingerprint="f2"))
    writer.commit(ROOT, DATASET[:1], {"m": "f2"})  # pixels not in this run: kept as it was
    assert by_path(store) == {"cat/a.jpg": 7} and by_path(store, "pixels") == {"cat/a.jpg": 9}
    assert store.load_attrs("m")["fingerprint"] == "f2"
    assert store.feature_sets() == ["m", "pixels"]
    assert len(listed_files(store)) == 2  # the f1 shard, no longer listed...
    assert len(shard_files(store)) == 3  # ...is kept while the version before, which lists it, is kept


def test_an_uncommitted_run_leaves_the_index_whole_and_a_commit_that_changes_nothing_writes_nothing(tmp_path, messages):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    before, stat = store.path.read_bytes(), store.path.stat().st_mtime_ns
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})  # nothing changed: nothing written
    assert store.path.read_bytes() == before and store.path.stat().st_mtime_ns == stat
    writer.append(segment({"dog/b.jpg": 2}))  # a run killed after this: no commit
    assert store.path.read_bytes() == before
    assert by_path(store) == {"cat/a.jpg": 1}
    assert "interrupted run" in messages()
    EmbeddingStore(store.path).writer().commit(ROOT, DATASET[:2], {"m": "f1"})  # the next run's commit lists it
    assert by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 2}


def test_a_run_writes_what_it_adds_and_deletions_rewrite_nothing(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    dataset = records(*[(f"cat/{i}.jpg", "cat", "") for i in range(8)])
    writer.append(segment({r.path: i for i, r in enumerate(dataset)}))
    writer.commit(ROOT, dataset, {"m": "f1"})
    first = shard_files(store)
    writer.append(segment({"new.jpg": 8}))
    writer.commit(ROOT, [*dataset, ImageRecord("new.jpg")], {"m": "f1"})
    after = shard_files(store)
    # one shard more, the rest as it was
    assert {k: v for k, v in after.items() if k in first} == first and len(after) == 2
    writer.commit(ROOT, dataset[1:] + [ImageRecord("new.jpg")], {"m": "f1"})  # cat/0.jpg deleted
    assert shard_files(store) == after  # a deletion entry, no shard rewritten
    with h5py.File(store.path, "r") as index:
        assert list(index["m/deleted"]) == [0]
    assert by_path(store) == {**{f"cat/{i}.jpg": i for i in range(1, 8)}, "new.jpg": 8}


def test_a_second_writer_gets_a_clear_error(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with (
        store.writer(),
        pytest.raises(UserError, match="another run is writing"),
        EmbeddingStore(tmp_path / "e.h5").writer(),
    ):
        pass
    with store.writer():  # released
        pass


def test_missing_store_set_and_foreign_files_are_user_errors(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    with pytest.raises(UserError, match="run extract first"):
        store.load("m")
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    with pytest.raises(UserError, match=r"has no 'vgg16' features \(it has: m\)"):
        store.load("vgg16")
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["x"] = 1
    with pytest.raises(UserError, match="not an embedding store"):
        EmbeddingStore(tmp_path / "other.h5").load("m")
    shutil.copy(tmp_path / "e.h5", tmp_path / "future.h5")
    with h5py.File(tmp_path / "future.h5", "a") as future:
        future.attrs["format_version"] = 3
    with pytest.raises(UserError,
                       match="future.h5 is embedding store format 3, and this version .* reads formats 1 and 2"):
        EmbeddingStore(tmp_path / "future.h5").load("m")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable HDF5 store"):
        EmbeddingStore(tmp_path / "junk.h5").load("m")


def test_a_missing_or_altered_shard_is_named_with_the_recovery(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    (name,) = shard_files(store)
    shard = store.shards / name
    original = shard.read_bytes()
    shard.unlink()
    for read in (lambda: store.load("m"), lambda: store.counts("m") and writer.known("m", "f1"), store.verify):
        with pytest.raises(UserError, match=rf"{name} is missing, .* restore that file, or compute that feature "
                                            f"set anew: {re.escape(command('store'))} drop m --cache"):
            read()
    altered = bytearray(original)
    altered[-100] ^= 0xFF  # same size, other bytes: caught by the sha256 when the embeddings are read
    shard.write_bytes(bytes(altered))
    with pytest.raises(UserError, match=f"{name} is not the shard .* lists"):
        store.load("m")
    shard.write_bytes(original + b"x")  # another size: caught on opening
    with pytest.raises(UserError, match=f"{name} is not the shard .* lists"):
        writer.known("m", "f1")
    shard.write_bytes(original)
    assert store.verify() == 1 and by_path(store) == {"cat/a.jpg": 1, "dog/b.jpg": 2}


def test_pending_rows_of_files_gone_since_a_killed_run_are_dropped(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}, {"c.jpg": "broken"}))  # then the run was killed
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})  # dog/b.jpg and c.jpg were deleted meanwhile
    assert by_path(store) == {"cat/a.jpg": 1}
    assert store.counts("m") == (1, 0)


def test_every_feature_set_is_committed_and_follows_the_dataset(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1, "dog/b.jpg": 2}, name="vgg", fingerprint="v"))
    writer.append(segment({"cat/a.jpg": 3, "dog/b.jpg": 4}))
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})  # this run computed "m" only; "vgg" came from a killed run
    assert by_path(store, "vgg") == {"cat/a.jpg": 1, "dog/b.jpg": 2}
    relabelled = records(("cat/a.jpg", "lynx", "train"))
    writer.commit(ROOT, relabelled, {"m": "f1"})  # dog/b.jpg deleted, cat/a.jpg relabelled
    for name in ("vgg", "m"):
        loaded = store.load(name)
        assert list(loaded.paths) == ["cat/a.jpg"] and loaded.classes[loaded.labels[0]] == "lynx"


def test_pending_roots_and_providers_are_recorded(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    first = segment({"cat/a.jpg": 1})
    first.attrs["provider"] = "CUDAExecutionProvider"
    writer.append(first)
    assert store.pending_roots() == {str(ROOT)}
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    second = segment({"dog/b.jpg": 2})
    second.attrs["provider"] = "CPUExecutionProvider"
    writer.append(second)
    writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert store.load_attrs("m")["provider"] == "CPUExecutionProvider,CUDAExecutionProvider"


def test_a_dropped_set_is_computed_anew_and_pending_rows_stay_pending(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    (name,) = shard_files(store)
    (store.shards / name).unlink()  # a lost shard: only computing the set anew recovers
    writer.append(segment({"cat/a.jpg": 5}, name="vgg", fingerprint="v"))  # a killed run's rows
    with pytest.raises(UserError, match=f"{name} is missing"):
        writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    writer.drop("m")  # the pending rows stay pending
    assert store.feature_sets() == [] and not len(writer.known("m", "f1")) and len(writer.known("vgg", "v")) == 1
    store = EmbeddingStore(store.path)  # the next run
    writer = store.writer()
    writer.append(segment({"cat/a.jpg": 1}))
    writer.commit(ROOT, DATASET[:1], {"m": "f1"})
    assert by_path(store) == {"cat/a.jpg": 1} and by_path(store, "vgg") == {"cat/a.jpg": 5}


def test_rows_across_many_chunks_are_compressed_in_threads_as_standard_gzip(tmp_path):
    dim = 512  # 512 rows per 1 MB chunk
    rng = np.random.default_rng(0)
    wanted = {f"{i:05d}.jpg": rng.random(dim, dtype=np.float32) for i in range(1300)}
    store = EmbeddingStore(tmp_path / "s.h5")
    writer = store.writer()
    names = sorted(wanted)
    part = Segment("m", "f1", {**ATTRS, "embedding_dim": dim}, str(ROOT))
    for path in names:
        part.records.append(ImageRecord(path))
        part.states.append(FileState("0" * 64, 1, 1))
        part.embeddings.append(wanted[path])
    writer.append(part)
    writer.commit(ROOT, [ImageRecord(p) for p in names], {"m": "f1"})
    kept = names[100:1250:2]  # drop rows, then add one: old rows stay, new ones come after
    extra = Segment("m", "f1", {**ATTRS, "embedding_dim": dim}, str(ROOT))
    extra.records.append(ImageRecord("new.jpg"))
    extra.states.append(FileState("1" * 64, 1, 1))
    extra.embeddings.append(np.full(dim, 7, np.float32))
    writer.append(extra)
    writer.commit(ROOT, [ImageRecord(p) for p in kept + ["new.jpg"]], {"m": "f1"})
    loaded = store.load("m")
    assert list(loaded.paths) == kept + ["new.jpg"]
    np.testing.assert_array_equal(loaded.embeddings[:-1], np.stack([wanted[p] for p in kept]))
    np.testing.assert_array_equal(loaded.embeddings[-1], np.full(dim, 7, np.float32))
    largest = max(shard_files(store), key=lambda name: (store.shards / name).stat().st_size)
    with h5py.File(store.shards / largest, "r") as f:
        dataset = f["embeddings"]
        assert (dataset.compression, dataset.shuffle, dataset.chunks) == ("gzip", True, (512, dim))
