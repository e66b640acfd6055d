"""Shard files: written whole or not at all, read back by row, checked against what the index lists."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from pipeline.errors import UserError, command
from pipeline.store.shards import (
    ShardEntry,
    ShardHeader,
    ShardReader,
    ShardTable,
    read_header,
    write_shard,
    write_shard_blocks,
)
from pipeline.store.spec import path_keys

HEADER = ShardHeader("m", "f1", "/data", 3, "extract",
                     {"fingerprint": "f1", "embedding_dim": 4, "untrained": np.bool_(False)})


def table(paths: list[str], reasons: list[str] | None = None) -> ShardTable:
    return ShardTable(
        np.array(paths, dtype=str), np.array([f"{i:064x}" for i in range(len(paths))], dtype=str),
        np.arange(len(paths), dtype=np.int64) + 10, np.arange(len(paths), dtype=np.int64) + 20,
        np.array(reasons or [], dtype=str),
    )


def test_a_shard_round_trips_rows_failures_and_its_header(tmp_path):
    rows = table(["a/1.jpg", "b/é 2.jpg", "c.jpg"])
    embeddings = np.arange(12, dtype=np.float32).reshape(3, 4)
    failures = table(["bad.jpg"], ["truncated"])
    failures.sha256[0] = ""  # unreadable: no hash
    entry = write_shard(tmp_path, "m/000003-x-0000000001-local.h5", HEADER, rows, embeddings, failures)
    assert (entry.rows, entry.failures, entry.bytes) == (3, 1, (tmp_path / entry.file).stat().st_size)
    assert read_header(tmp_path / entry.file) == ShardHeader(
        "m", "f1", "/data", 3, "extract", {"fingerprint": "f1", "embedding_dim": 4, "untrained": False})
    with ShardReader(tmp_path, entry, tmp_path / "e.h5", verify=True) as reader:
        np.testing.assert_array_equal(reader.embeddings(), embeddings)
        np.testing.assert_array_equal(reader.embeddings(np.array([0, 2])), embeddings[[0, 2]])
        assert list(reader.keys()) == list(path_keys(rows.paths)) and list(reader.keys(True)) == list(
            path_keys(["bad.jpg"]))
        back = reader.table(rows=np.array([1]))
        assert list(back.paths) == ["b/é 2.jpg"] and list(back.sizes) == [11] and list(back.mtimes) == [21]
        sizes, mtimes, readable = reader.states(True)
        assert list(readable) == [False] and list(reader.table(True).reasons) == ["truncated"]
        assert reader.sha256_of(np.array([2])).tolist() == [f"{2:064x}"]


def test_blocks_write_the_same_shard_as_one_array(tmp_path):
    rows = table([f"{i}.jpg" for i in range(10)])
    embeddings = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    whole = write_shard(tmp_path, "m/a.h5", HEADER, rows, embeddings, ShardTable.empty())
    blocks = [(rows.take(np.arange(0, 3)), embeddings[:3]), (rows.take(np.arange(3, 10)), embeddings[3:])]
    pieces = write_shard_blocks(tmp_path, "m/b.h5", HEADER, 10, blocks, ShardTable.empty())
    with ShardReader(tmp_path, whole, tmp_path) as a, ShardReader(tmp_path, pieces, tmp_path) as b:
        np.testing.assert_array_equal(a.embeddings(), b.embeddings())
        assert list(a.table().paths) == list(b.table().paths)
    with h5py.File(tmp_path / pieces.file) as shard:
        assert shard["embeddings"].compression == "gzip" and shard["embeddings"].shuffle


def test_a_write_that_fails_midway_leaves_no_shard(tmp_path):
    rows = table(["a.jpg", "b.jpg"])

    def blocks():
        yield rows.take(np.arange(1)), np.zeros((1, 4), np.float32)
        raise KeyboardInterrupt  # as a Ctrl-C or a crash while writing

    with pytest.raises(KeyboardInterrupt):
        write_shard_blocks(tmp_path, "m/a.h5", HEADER, 2, blocks(), ShardTable.empty())
    assert not list(tmp_path.rglob("*.h5")) and not list(tmp_path.rglob("*.tmp"))
    assert read_header(tmp_path / "m" / "a.h5") is None


def test_a_missing_or_other_file_is_refused_with_the_recovery(tmp_path):
    entry = write_shard(tmp_path, "m/a.h5", HEADER, table(["a.jpg"]), np.zeros((1, 4), np.float32), ShardTable.empty())
    with pytest.raises(UserError, match=r"m/b.h5 is missing, and .*e.h5 lists it as a shard; restore that file, or "
                                        rf"compute that feature set anew: {re.escape(command('store'))} "
                                        r"drop m --cache"):
        ShardReader(tmp_path, ShardEntry("m/b.h5", "", 1, 1, 0), tmp_path / "e.h5")
    with pytest.raises(UserError, match="is not the shard .* lists"):
        ShardReader(tmp_path, ShardEntry(entry.file, entry.sha256, entry.bytes + 1, 1, 0), tmp_path / "e.h5")
    other = ShardEntry(entry.file, "0" * 64, entry.bytes, 1, 0)
    ShardReader(tmp_path, other, tmp_path / "e.h5").close()  # the size is checked on every open...
    with pytest.raises(UserError, match="its size or sha256 differs"):  # ...the sha256 when embeddings are read
        ShardReader(tmp_path, other, tmp_path / "e.h5", verify=True)
