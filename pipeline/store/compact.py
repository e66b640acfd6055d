"""Compaction: small and mostly deleted shards rewritten into full ones, in order, crash-safely."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store.commit import RunName
from pipeline.store.index import Index, SetIndex
from pipeline.store.shards import ShardEntry, ShardHeader, ShardReader, ShardTable, write_shard
from pipeline.store.spec import DEAD_SHARE, SMALL_SHARDS, SMALL_SHARE, shard_rows


@dataclass(frozen=True)
class Rewrite:
    """A run of consecutive shards of one set to rewrite as full ones."""

    feature_set: str
    first: int  # position of the first shard in the set's list
    stop: int


def plan_compaction(index: Index, force: bool) -> list[Rewrite]:
    """The shards worth rewriting.

    Automatically (``force`` False): in a set with more than :data:`SMALL_SHARDS` small shards (fewer live
    rows than :data:`SMALL_SHARE` of a full one), every run of two or more consecutive small shards; and
    every shard more than :data:`DEAD_SHARE` deleted, with the small shards beside it. With ``force``: every
    run of two or more small shards, and every shard with a deleted row or failure.
    """
    rewrites = []
    for name, set_index in sorted(index.sets.items()):
        small, dead = _shard_health(set_index)
        many_small = force or int(small.sum()) > SMALL_SHARDS
        worth = small & many_small
        worth |= dead > (0 if force else DEAD_SHARE)
        for first, stop in _runs(worth):
            if stop - first > 1 or dead[first] > (0 if force else DEAD_SHARE):
                rewrites.append(Rewrite(name, first, stop))
    return rewrites


def _shard_health(set_index: SetIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per shard: is it small, and what share of its rows and failures is deleted."""
    full = shard_rows(set_index.dim)
    rows, failures = set_index.offsets(), set_index.offsets(True)
    live_rows, live_failures = set_index.live(), set_index.live(True)
    small, dead = [], []
    for number, entry in enumerate(set_index.shards):
        alive = int(live_rows[rows[number] : rows[number + 1]].sum())
        alive_failures = int(live_failures[failures[number] : failures[number + 1]].sum())
        small.append(alive < SMALL_SHARE * full)
        total = entry.rows + entry.failures
        dead.append(1 - (alive + alive_failures) / total if total else 0.0)
    return np.array(small, bool), np.array(dead, float)


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    yield from zip(edges[::2].tolist(), edges[1::2].tolist())


def compact_index(folder: Path, index_path: Path, index: Index, rewrites: Sequence[Rewrite]) -> tuple[Index, list[str]]:
    """Write the new shards of ``rewrites`` and return the index listing them, and the shard files it retires.

    The new shards are unlisted until the returned index replaces the old one (a crash before leaves them
    as garbage the next writer deletes); the old ones must be deleted only after that.
    """
    name = RunName(index.version, writer="compaction")
    sets = dict(index.sets)
    retired: list[str] = []
    order = 0
    for rewrite in sorted(rewrites, key=lambda r: (r.feature_set, -r.first)):  # from the back: positions hold
        set_index = sets[rewrite.feature_set]
        written, labels, splits = [], [], []
        for piece in _pieces(folder, index_path, set_index, rewrite):
            rows, embeddings, failures, piece_labels, piece_splits = piece
            header = ShardHeader(rewrite.feature_set, set_index.fingerprint, index.dataset_root, index.version,
                                 "compaction", set_index.attrs)
            written.append(write_shard(folder, name.shard(rewrite.feature_set, order), header, rows, embeddings, failures))
            labels.append(piece_labels)
            splits.append(piece_splits)
            order += 1
        retired += [e.file for e in set_index.shards[rewrite.first : rewrite.stop]]
        sets[rewrite.feature_set] = _replaced(set_index, rewrite, written, labels, splits)
    return Index(index.version + 1, index.dataset_root, index.classes, sets), retired


def _pieces(folder: Path, index_path: Path, set_index: SetIndex, rewrite: Rewrite) -> Iterator[tuple]:
    """The live rows of the rewrite's shards, in order, in pieces of at most one full shard."""
    full = shard_rows(set_index.dim)
    rows, failures = set_index.offsets(), set_index.offsets(True)
    live_rows, live_failures = set_index.live(), set_index.live(True)
    buffer: list[tuple] = []
    held = 0
    failed = []
    for number in range(rewrite.first, rewrite.stop):
        entry = set_index.shards[number]
        span, failure_span = slice(rows[number], rows[number + 1]), slice(failures[number], failures[number + 1])
        alive = np.flatnonzero(live_rows[span])
        with ShardReader(folder, entry, index_path, verify=True) as reader:
            if len(alive):
                buffer.append((reader.table(rows=alive), reader.embeddings(alive), set_index.labels[span][alive],
                               set_index.splits[span][alive]))
                held += len(alive)
            kept = np.flatnonzero(live_failures[failure_span])
            if len(kept):
                failed.append(reader.table(True, kept))
        while held >= full:
            piece, buffer, held = _take(buffer, full)
            yield (*piece[:2], _joined(failed), *piece[2:])
            failed = []
    if held or failed:
        piece, buffer, held = _take(buffer, held)
        yield (*piece[:2], _joined(failed), *piece[2:])


def _take(buffer: list[tuple], count: int) -> tuple[tuple, list[tuple], int]:
    """The first ``count`` rows of the buffered pieces, and what is left."""
    tables, embeddings = _joined([t for t, *_ in buffer]), _stack([e for _, e, *_ in buffer])
    labels = np.concatenate([b[2] for b in buffer]) if buffer else np.zeros(0, np.int32)
    splits = np.concatenate([b[3] for b in buffer]) if buffer else np.zeros(0, np.uint8)
    head = np.arange(count)
    rest = np.arange(count, len(tables))
    left = [(tables.take(rest), embeddings[count:], labels[count:], splits[count:])] if len(rest) else []
    return (tables.take(head), embeddings[:count], labels[:count], splits[:count]), left, len(rest)


def _joined(tables: Sequence[ShardTable]) -> ShardTable:
    if not tables:
        return ShardTable.empty()
    reasons = [t.reasons for t in tables if len(t.reasons)]
    return ShardTable(
        np.concatenate([t.paths for t in tables]), np.concatenate([t.sha256 for t in tables]),
        np.concatenate([t.sizes for t in tables]), np.concatenate([t.mtimes for t in tables]),
        np.concatenate(reasons) if reasons else np.array([], dtype=str),
    )


def _stack(blocks: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def _replaced(set_index: SetIndex, rewrite: Rewrite, written: list[ShardEntry], labels: list[np.ndarray],
              splits: list[np.ndarray]) -> SetIndex:
    """``set_index`` with the rewrite's shards replaced by the ``written`` ones (all live)."""
    rows, failures = set_index.offsets(), set_index.offsets(True)
    start, stop = rows[rewrite.first], rows[rewrite.stop]
    failure_start, failure_stop = failures[rewrite.first], failures[rewrite.stop]
    added, added_failures = sum(e.rows for e in written), sum(e.failures for e in written)

    def renumbered(deleted: np.ndarray, first: int, last: int, count: int) -> np.ndarray:
        before, after = deleted[deleted < first], deleted[deleted >= last]
        return np.concatenate([before, after - (last - first) + count]).astype(np.int64)

    return SetIndex(
        set_index.attrs,
        set_index.shards[: rewrite.first] + written + set_index.shards[rewrite.stop :],
        np.concatenate([set_index.labels[:start], *labels, set_index.labels[stop:]]).astype(np.int32),
        np.concatenate([set_index.splits[:start], *splits, set_index.splits[stop:]]).astype(np.uint8),
        renumbered(set_index.deleted, start, stop, added),
        renumbered(set_index.deleted_failures, failure_start, failure_stop, added_failures),
    )
