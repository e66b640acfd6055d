"""Readers: loading in order, streaming in blocks across shards, and lookups that read only the rows asked for."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.store.shards as shards
from pipeline.errors import UserError
from pipeline.extract.discover import ImageRecord
from pipeline.store import EmbeddingStore
from pipeline.store.readers import hash_digests
from tests.test_store import ROOT, segment, sha

PATHS = [f"c{i % 3}/{i:04d}.jpg" for i in range(700)]


@pytest.fixture
def store(tmp_path) -> EmbeddingStore:
    """700 rows of 1024 floats (256 rows per 1 MB chunk) in three shards, every seventh deleted."""
    store = EmbeddingStore(tmp_path / "e.h5")
    writer = store.writer()
    for start, stop in ((0, 250), (250, 600), (600, 700)):
        writer.append(segment({p: float(i) for i, p in enumerate(PATHS[start:stop], start)}, dim=1024))
    keep = [ImageRecord(p, p[:2]) for i, p in enumerate(PATHS) if i % 7]  # every seventh file is gone
    writer.commit(ROOT, keep, {"m": "f1"})
    return store


def test_load_without_embeddings_reads_the_index_paths_and_hashes_only(store):
    whole, light = store.load("m"), store.load("m", embeddings=False)
    assert light.embeddings is None and list(light.sha256) == list(whole.sha256) and len(light.sha256)
    assert list(light.paths) == list(whole.paths) == [p for i, p in enumerate(PATHS) if i % 7]
    np.testing.assert_array_equal(whole.embeddings[:, 0], [i for i in range(700) if i % 7])


def test_blocks_cover_every_live_row_once_within_one_chunk_of_one_shard(store):
    whole = store.load("m").embeddings
    with store.rows("m") as rows:
        blocks = list(rows.blocks())
        assert len(rows) == len(whole) and blocks[0][0] == 0 and blocks[-1][1] == len(whole)
        assert all(a < b for a, b in blocks) and all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))
        assert max(b - a for a, b in blocks) <= 256  # 256 rows of 1024 floats per 1 MB chunk
        np.testing.assert_array_equal(np.concatenate([rows.read(a, b) for a, b in blocks]), whole)
        np.testing.assert_array_equal(rows.read(200, 300), whole[200:300])  # across two shards


def test_a_lookup_reads_only_the_rows_asked_for(store, monkeypatch):
    found = store.lookup("m", "f1")
    assert (len(found) == 600 and store.lookup("m", "other") == {}
            and EmbeddingStore(store.path.with_name("x.h5")).lookup("m", "f1") == {})
    read = []
    embeddings = shards.ShardReader.embeddings

    def counted(self, rows=None):
        read.append(None if rows is None else len(rows))
        return embeddings(self, rows)

    monkeypatch.setattr(shards.ShardReader, "embeddings", counted)
    assert sha(PATHS[8]) in found and sha(PATHS[7]) not in found and "not a hash" not in found and 7 not in found
    np.testing.assert_array_equal(found[sha(PATHS[650])], np.full(1024, 650, np.float32))
    assert read == [1]  # one row of one shard
    with pytest.raises(KeyError):
        found[sha(PATHS[7])]
    assert sorted(found) == sorted(sha(p) for i, p in enumerate(PATHS) if i % 7)


def test_hashes_are_held_as_their_32_bytes():
    digests = hash_digests(np.array([sha("a"), sha("b").upper()]))
    assert digests.dtype == np.dtype("S32") and digests[0] == bytes.fromhex(sha("a"))
    assert digests[1] == bytes.fromhex(sha("b"))
    with pytest.raises(ValueError):
        hash_digests(np.array(["z" * 64]))


def test_a_reader_reads_its_version_whole_while_a_compaction_replaces_its_shards(store):
    with store.rows("m") as rows:  # opened on the index before the compaction
        first = rows.read(0, 10).copy()
        with store.writer() as writer:
            writer.compact(force=True)
        assert store.index().version == 2 and np.array_equal(rows.read(0, 10), first)
        assert rows.read(0, 600).shape[0] == 600  # every shard of version 1 is kept


def test_a_reader_whose_version_a_cleanup_removed_is_told_to_run_again(store):
    with store.rows("m") as rows:  # version 1
        with store.writer() as writer:
            writer.compact(force=True)  # version 2: version 1 is the previous one, kept whatever its age
            writer.drop("m")  # version 3
            assert writer.cleanup(older_than=0) == [1]
        with pytest.raises(UserError, match="changed while this was reading it: the version it read is past the "
                                            "store's retention, and a writer removed .*; run it again"):
            rows.read(0, 600)
