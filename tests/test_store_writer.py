"""The store's writer: the lock it holds in a ``with`` block, shards other processes write through its target
and it registers, and a reader that never sees a half-written commit."""

from __future__ import annotations

import multiprocessing
import pickle
from dataclasses import asdict

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.store import EmbeddingStore, ShardEntry, ShardTarget
from tests.test_store import DATASET, ROOT, segment


def write_in_another_process(target: ShardTarget, rows: dict[str, float], order: int) -> dict:
    """What a Ray actor does: write a pending shard through the target, report its entry as plain values."""
    return asdict(target.write(segment(rows), order, f"worker{order}"))


def test_shards_written_elsewhere_through_the_target_are_committed_once_registered(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    with store.writer() as writer:
        target = writer.target(str(ROOT))
        assert pickle.loads(pickle.dumps(target)) == target  # it crosses to the workers
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            reported = pool.starmap(write_in_another_process,
                                    [(target, {"cat/a.jpg": 1}, 1), (target, {"dog/b.jpg": 2}, 2)])
        for entry in reported:
            writer.register(ShardEntry(**entry))
        assert not store.exists()  # nothing is visible before the commit
        writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    loaded = store.load("m")
    assert dict(zip(loaded.paths, loaded.embeddings[:, 0])) == {"cat/a.jpg": 1.0, "dog/b.jpg": 2.0}


def test_a_writer_in_a_with_block_holds_the_lock_and_the_reader_reads_meanwhile(tmp_path):
    store = EmbeddingStore(tmp_path / "e.h5")
    first = store.writer()
    first.append(segment({"cat/a.jpg": 1}))
    first.commit(ROOT, DATASET[:1], {"m": "f1"})
    with store.writer() as writer:
        second = EmbeddingStore(store.path).writer()
        with pytest.raises(UserError, match="another run is writing .*e.h5; wait for it to finish"), second:
            pass
        writer.append(segment({"dog/b.jpg": 2}))
        assert list(store.load("m").paths) == ["cat/a.jpg"]  # the reader sees the last commit, whole
        writer.commit(ROOT, DATASET[:2], {"m": "f1"})
    assert sorted(store.load("m").paths) == ["cat/a.jpg", "dog/b.jpg"]
    with store.writer():  # released
        pass


def test_the_reader_has_no_write_methods():
    reading = {name for name in dir(EmbeddingStore) if not name.startswith("_")}
    assert not reading & {"append", "commit", "register", "drop", "compact", "remove", "lock", "known"}
    assert np.isin(["load", "rows", "lookup", "counts", "writer"], sorted(reading)).all()
