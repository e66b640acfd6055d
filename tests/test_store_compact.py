"""Compaction: which shards it rewrites, that rows keep their order, labels and failures, and its thresholds."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

import pipeline.store.compact as compact
import pipeline.store.spec as spec
from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore
from pipeline.store.compact import _jobs, plan_compaction
from tests.test_store import ROOT, listed_files, segment, shard_files

PATHS = [f"{'cat' if i % 2 else 'dog'}/{i:03d}.jpg" for i in range(40)]
LISTING = [ImageRecord(p, p.split("/")[0], "test" if i % 5 == 0 else "train") for i, p in enumerate(PATHS)]


@pytest.fixture
def small_full_shards(monkeypatch):
    """Full shards of 8 rows (of 4 floats): small ones are those under 2 rows."""
    monkeypatch.setattr(spec, "SHARD_BYTES", 8 * 4 * 4)


def store_of_small_shards(tmp_path, rows_per_shard: int = 1, failed: str = "") -> EmbeddingStore:
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    for start in range(0, len(PATHS), rows_per_shard):
        part = {p: float(i) for i, p in enumerate(PATHS[start : start + rows_per_shard], start)}
        writer.append(segment(part, {failed: "broken"} if failed and start == 0 else {}))
    writer.commit(ROOT, LISTING + ([ImageRecord(failed)] if failed else []), {"m": "f1"})
    return store


def snapshot(store: EmbeddingStore) -> tuple:
    loaded = store.load("m")
    return (loaded.paths.tolist(), loaded.embeddings.tolist(), loaded.labels.tolist(), loaded.splits.tolist(),
            loaded.sha256.tolist(), store.failures("m").paths.tolist(), store.counts("m"))


def test_compaction_keeps_every_row_in_order_and_rewrites_into_full_shards(tmp_path, small_full_shards):
    store = store_of_small_shards(tmp_path, failed="bad.jpg")
    assert len(shard_files(store)) == 40
    before = snapshot(store)
    with store.writer() as writer:
        done = writer.compact()
    assert done.rewritten == {"m": 40} and done.written == {"m": 5}
    assert snapshot(store) == before and len(listed_files(store)) == 5
    assert [e.rows for e in store.index().sets["m"].shards] == [8] * 5
    assert not writer.compact()  # nothing left to do


def test_deleted_rows_are_dropped_by_compaction_and_deletion_lists_renumbered(tmp_path, small_full_shards):
    store = store_of_small_shards(tmp_path, rows_per_shard=8)  # five full shards
    writer = store.writer()
    kept = [r for i, r in enumerate(LISTING) if i not in (9, 10, 33)]  # one row gone in shards 1, 4; one more in 1
    writer.commit(ROOT, kept, {"m": "f1"})
    assert list(store.index().sets["m"].deleted) == [9, 10, 33]  # under the automatic threshold (a quarter)
    before = snapshot(store)
    with store.writer() as writer:
        assert writer.compact().rewritten == {"m": 2}  # only the two shards with deleted rows
    assert snapshot(store) == before and not len(store.index().sets["m"].deleted)


def test_a_commit_compacts_by_itself_past_the_thresholds(tmp_path, small_full_shards, monkeypatch):
    monkeypatch.setattr(compact, "SMALL_SHARDS", 64)
    store = store_of_small_shards(tmp_path)  # 40 small shards: under the limit
    writer = store.writer()
    assert len(shard_files(store)) == 40
    monkeypatch.setattr(compact, "SMALL_SHARDS", 30)
    writer.append(segment({"new.jpg": 7}))
    writer.commit(ROOT, LISTING + [ImageRecord("new.jpg")], {"m": "f1"})  # 41 small shards: past it
    assert len(listed_files(store)) == 6 and store.counts("m") == (41, 0)
    half = [r for i, r in enumerate(LISTING) if i >= 5] + [ImageRecord("new.jpg")]
    writer.commit(ROOT, half, {"m": "f1"})  # the first full shard 5/8 deleted: more than a quarter
    assert [e.rows for e in store.index().sets["m"].shards][0] < 8 and not len(store.index().sets["m"].deleted)


def test_the_plan_only_rewrites_what_pays(tmp_path, small_full_shards):
    store = store_of_small_shards(tmp_path, rows_per_shard=8)
    writer = store.writer()
    assert plan_compaction(store.index(), force=True) == []  # full, nothing deleted
    writer.commit(ROOT, LISTING[1:], {"m": "f1"})  # one row of 8 deleted: under a quarter
    assert plan_compaction(store.index(), force=False) == []
    assert [(r.first, r.stop) for r in plan_compaction(store.index(), force=True)] == [(0, 1)]


def test_rewrite_jobs_cross_to_other_processes(tmp_path, small_full_shards):
    store = store_of_small_shards(tmp_path)
    index = store.index()
    jobs = _jobs(store.shards, store.path, index, plan_compaction(index, force=True))
    copy = pickle.loads(pickle.dumps(jobs))  # what Ray sends to a task
    assert [j.sizes for j in copy] == [(8, 8, 8, 8, 8)] and copy[0].folder == str(store.shards.resolve())
    np.testing.assert_array_equal(copy[0].sources[3][1], [0])


def test_a_float16_set_stays_float16_through_compaction_and_in_the_view(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with store.writer() as writer:
        for start in range(0, len(PATHS), 10):
            part = segment({p: i + 0.1 for i, p in enumerate(PATHS[start : start + 10], start)})
            part.attrs["storage"] = "float16"
            writer.append(part)
        writer.commit(ROOT, LISTING, {"m": "f1"})
        before = snapshot(store)
        assert writer.compact(force=True).rewritten == {"m": 4}
    assert snapshot(store) == before and before[1][1][0] == np.float32(np.float16(1.1))
    for name in listed_files(store):
        with h5py.File(store.shards / name) as shard:
            assert shard["embeddings"].dtype == np.float16
    with h5py.File(store.path) as index:
        assert index["m/embeddings"].dtype == np.float16 and index["m/embeddings"][1, 0] == np.float16(1.1)
