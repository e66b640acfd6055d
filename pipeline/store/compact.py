"""Compaction: small and mostly deleted shards rewritten into full ones, in order, crash-safely, by any worker."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store.commit import RunName
from pipeline.store.index import Index, SetIndex
from pipeline.store.shards import ShardEntry, ShardHeader, ShardReader, ShardTable, write_shard_blocks
from pipeline.store.spec import DEAD_SHARE, SMALL_SHARDS, SMALL_SHARE, shard_rows

READ_CHUNKS = 4  # HDF5 chunks read at once while rewriting: about 4 MB in memory per block

# How rewrite jobs run: the built-in ``map`` here, or tasks on a Ray cluster (extract's Ray backend).
JobRunner = Callable[[Callable, Iterable], Iterable]


@dataclass(frozen=True)
class Rewrite:
    """A run of consecutive shards of one set to rewrite as full ones."""

    feature_set: str
    first: int  # position of the first shard in the set's list
    stop: int


@dataclass(frozen=True)
class RewriteJob:
    """All a worker needs to rewrite a run of shards: plain values, so that it can cross to another process.

    ``sources`` are the run's shards, each with its live rows and live failures (local numbers); the live
    rows are written, in order, as shards named ``names`` holding ``sizes`` rows each.
    """

    folder: str
    index_path: str
    header: ShardHeader
    sources: tuple[tuple[ShardEntry, np.ndarray, np.ndarray], ...]
    names: tuple[str, ...]
    sizes: tuple[int, ...]


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
        limit = 0.0 if force else DEAD_SHARE
        worth = (small & (force or int(small.sum()) > SMALL_SHARDS)) | (dead > limit)
        for first, stop in _runs(worth):
            if stop - first > 1 or dead[first] > limit:
                rewrites.append(Rewrite(name, first, stop))
    return rewrites


def _shard_health(set_index: SetIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per shard: is it small, and what share of its rows and failures is deleted."""
    full = shard_rows(set_index.dim)
    alive, alive_failures = _live_counts(set_index)
    totals = np.array([e.rows + e.failures for e in set_index.shards], float)
    dead = np.divide(totals - alive - alive_failures, totals, out=np.zeros(len(totals)), where=totals > 0)
    return alive < SMALL_SHARE * full, dead


def _live_counts(set_index: SetIndex) -> tuple[np.ndarray, np.ndarray]:
    rows, failures = set_index.offsets(), set_index.offsets(True)
    live_rows = np.concatenate([[0], np.cumsum(set_index.live())])[rows]
    live_failures = np.concatenate([[0], np.cumsum(set_index.live(True))])[failures]
    return np.diff(live_rows), np.diff(live_failures)


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    yield from zip(edges[::2].tolist(), edges[1::2].tolist())


def compact_index(folder: Path, index_path: Path, index: Index, rewrites: Sequence[Rewrite],
                  run: JobRunner = map) -> Index:
    """Rewrite the ``rewrites`` (as jobs, by ``run``) and return the index listing the new shards.

    The new shards are unlisted until the returned index replaces the old one (a crash before leaves them
    as garbage the next writer deletes); the old ones stay while a kept version lists them.
    """
    jobs = _jobs(folder, index_path, index, rewrites)
    written = list(run(rewrite_shards, jobs))
    sets = dict(index.sets)
    for rewrite, entries in sorted(zip(rewrites, written), key=lambda r: (r[0].feature_set, -r[0].first)):
        # from the back of each set: earlier positions hold
        sets[rewrite.feature_set] = _replaced(sets[rewrite.feature_set], rewrite, entries)
    return Index(index.version + 1, index.dataset_root, index.classes, sets)


def _jobs(folder: Path, index_path: Path, index: Index, rewrites: Sequence[Rewrite]) -> list[RewriteJob]:
    name = RunName(index.version, writer="compaction")
    jobs, order = [], 0
    for rewrite in rewrites:
        set_index = index.sets[rewrite.feature_set]
        live, live_failures = set_index.live(), set_index.live(True)
        rows, failures = set_index.offsets(), set_index.offsets(True)
        sources = tuple(
            (set_index.shards[n], np.flatnonzero(live[rows[n] : rows[n + 1]]),
             np.flatnonzero(live_failures[failures[n] : failures[n + 1]]))
            for n in range(rewrite.first, rewrite.stop)
        )
        total, full = sum(len(s[1]) for s in sources), shard_rows(set_index.dim)
        sizes = tuple([full] * (total // full) + ([total % full] if total % full or not total else []))
        names = tuple(name.shard(rewrite.feature_set, order + n) for n in range(len(sizes)))
        order += len(sizes)
        header = ShardHeader(rewrite.feature_set, set_index.fingerprint, index.dataset_root, index.version,
                             "compaction", set_index.attrs)
        jobs.append(RewriteJob(str(folder.resolve()), str(index_path.resolve()), header, sources, names, sizes))
    return jobs


def rewrite_shards(job: RewriteJob) -> list[ShardEntry]:
    """Write the live rows of the job's shards, in order, as its new shards; the failures go to the first.

    Each source is checked by sha256 before it is read; memory holds one block of rows at a time.
    """
    folder, index_path = Path(job.folder), Path(job.index_path)
    failures = []
    for entry, _, kept in job.sources:
        if len(kept):
            with ShardReader(folder, entry, index_path) as reader:
                failures.append(reader.table(True, kept))
    rows = _Rows(_blocks(folder, index_path, job.sources))
    written = []
    for number, (name, size) in enumerate(zip(job.names, job.sizes)):
        written.append(write_shard_blocks(folder, name, job.header, size, rows.take(size),
                                          ShardTable.joined(failures) if number == 0 else ShardTable.empty()))
    return written


def _blocks(folder: Path, index_path: Path, sources: Iterable[tuple]) -> Iterator[tuple[ShardTable, np.ndarray]]:
    """The sources' live rows in order, a few HDF5 chunks at a time."""
    for entry, rows, _ in sources:
        if not len(rows):
            continue
        with ShardReader(folder, entry, index_path, verify=True) as reader:
            table, step = reader.table(), reader.chunk_rows() * READ_CHUNKS
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                yield table.take(part), reader.embeddings(part)


class _Rows:
    """A stream of row blocks that exact counts of rows are taken from, in order."""

    def __init__(self, blocks: Iterable[tuple[ShardTable, np.ndarray]]) -> None:
        self.blocks = iter(blocks)
        self.carried: tuple[ShardTable, np.ndarray] | None = None  # the rest of a block split at a shard's end

    def take(self, count: int) -> Iterator[tuple[ShardTable, np.ndarray]]:
        """The next ``count`` rows, as blocks."""
        while count:
            table, rows = self.carried if self.carried is not None else next(self.blocks)
            self.carried = None
            if len(table) > count:
                self.carried = (table.take(np.arange(count, len(table))), rows[count:])
                table, rows = table.take(np.arange(count)), rows[:count]
            count -= len(table)
            yield table, rows


def _replaced(set_index: SetIndex, rewrite: Rewrite, written: list[ShardEntry]) -> SetIndex:
    """``set_index`` with the rewrite's shards replaced by the ``written`` ones (all live, in the same order)."""
    rows, failures = set_index.offsets(), set_index.offsets(True)
    start, stop = rows[rewrite.first], rows[rewrite.stop]
    failure_start, failure_stop = failures[rewrite.first], failures[rewrite.stop]
    live = set_index.live()[start:stop]

    def renumbered(deleted: np.ndarray, first: int, last: int, count: int) -> np.ndarray:
        before, after = deleted[deleted < first], deleted[deleted >= last]
        return np.concatenate([before, after - (last - first) + count]).astype(np.int64)

    return SetIndex(
        set_index.attrs,
        set_index.shards[: rewrite.first] + written + set_index.shards[rewrite.stop :],
        np.concatenate([set_index.labels[:start], set_index.labels[start:stop][live], set_index.labels[stop:]]),
        np.concatenate([set_index.splits[:start], set_index.splits[start:stop][live], set_index.splits[stop:]]),
        renumbered(set_index.deleted, start, stop, sum(e.rows for e in written)),
        renumbered(set_index.deleted_failures, failure_start, failure_stop, sum(e.failures for e in written)),
    )
