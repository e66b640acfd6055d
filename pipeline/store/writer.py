"""StoreWriter: the one object that changes a store, in Lance's manner.

It appends a run's rows as pending shards, hands worker processes a :class:`ShardTarget` to write theirs,
registers the shards they report, and commits them in a new index; it also drops sets, compacts and
empties the store. :class:`~pipeline.store.EmbeddingStore` only reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import atomic_path, exclusive
from pipeline.store.commit import (
    Known,
    Listing,
    RunName,
    Segment,
    carry,
    commit_sets,
    garbage,
    known_files,
    pending_entry,
    pending_shards,
    write_segment,
)
from pipeline.store.compact import JobRunner, compact_index, plan_compaction
from pipeline.store.index import Index, write_index
from pipeline.store.legacy import adopt_journal, convert
from pipeline.store.location import StoreLocation
from pipeline.store.shards import ShardEntry
from pipeline.store.spec import LEGACY_VERSION, RETENTION_SECONDS, ImageRecord, shard_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compaction:
    """What a compaction did: shards rewritten and written, per feature set."""

    rewritten: dict[str, int]
    written: dict[str, int]

    def __bool__(self) -> bool:
        return bool(self.rewritten)


@dataclass(frozen=True)
class ShardTarget:
    """Where another process (a Ray worker) writes pending shards of a writer's run: plain values, so it pickles.

    Attributes
    ----------
    folder : str
        The store's shards folder, at the same path on every node.
    base_version : int
        The index version the run started from.
    run : str
        The run's name, shared by all its writers.
    dataset_root : str
        The dataset root recorded in each shard.
    """

    folder: str
    base_version: int
    run: str
    dataset_root: str

    def write(self, segment: Segment, order: int, writer: str) -> ShardEntry:
        """Write ``segment`` as the pending shard number ``order`` of process ``writer`` (a name unique to it; a
        batch retried elsewhere writes under another, and the commit lists each row once)."""
        name = RunName(self.base_version, self.run, writer).shard(segment.name, order)
        return write_segment(Path(self.folder), segment, name, self.base_version)


class StoreWriter:
    """Writes one store: ``store.writer()``; in a ``with`` block it holds the store's lock.

    A run appends its rows as pending shards (they survive a kill once :meth:`append` returns), other
    processes write theirs through :meth:`target` and are :meth:`register`-ed, and :meth:`commit` lists them
    all in a new index, renamed over the old one, so readers see every commit whole.

    Parameters
    ----------
    location : StoreLocation
        The store to write (an :class:`~pipeline.store.EmbeddingStore` is one).

    Examples
    --------
    >>> with EmbeddingStore("features/embeddings.h5").writer() as writer:  # doctest: +SKIP
    ...     writer.append(segment)
    ...     writer.commit(dataset_root, records, {"resnet50": fingerprint})
    """

    def __init__(self, location: StoreLocation) -> None:
        if location.pinned is not None:
            raise UserError(f"{location.path}@{location.pinned} names a version to read; a run writes the next "
                            f"version: use --cache {location.path}.")
        self.location = location
        self._run: RunName | None = None
        self._order = 0
        self._written: dict[str, ShardEntry] = {}
        self._listing: tuple[Sequence[ImageRecord], Listing] | None = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> StoreWriter:
        self._held.enter_context(self.lock())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._held.close()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock; a second writer on the same store gets a clear error.

        On taking it, a format-1 store is converted to format 2, and what killed writers left is cleaned up:
        unfinished files, and versions past the retention with the shards only they listed (see :meth:`cleanup`).
        """
        path = self.location.path
        busy = f"another run is writing {path}; wait for it to finish, or use another --cache."
        with exclusive(path.with_name(path.name + ".lock"), busy):
            for stale in [*path.parent.glob(f".{path.name}.*.tmp"), *self.location.versions.glob(".*.tmp")]:
                stale.unlink(missing_ok=True)  # an index killed mid-write
            self._writable_index(arrays=False)
            self.cleanup()
            yield

    def append(self, segment: Segment) -> None:
        """Write a segment as pending shards (of at most a full shard's rows each), and empty it; after this
        returns, its rows survive a kill."""
        if not len(segment):
            return
        run = self._run_name()
        full = shard_rows(int(segment.attrs["embedding_dim"]))
        for start in range(0, max(len(segment.records), 1), full):
            piece = Segment(segment.name, segment.fingerprint, segment.attrs, segment.dataset_root,
                            segment.records[start : start + full], segment.states[start : start + full],
                            segment.embeddings[start : start + full], segment.failures if start == 0 else [])
            self._order += 1
            entry = write_segment(self.location.shards, piece, run.shard(segment.name, self._order), run.base_version)
            self._written[entry.file] = entry
        segment.records, segment.states, segment.embeddings, segment.failures = [], [], [], []

    def target(self, dataset_root: str) -> ShardTarget:
        """Where worker processes write this run's pending shards (see :class:`ShardTarget`)."""
        run = self._run_name()
        return ShardTarget(str(self.location.shards.resolve()), run.base_version, run.run, dataset_root)

    def register(self, entry: ShardEntry) -> None:
        """A pending shard a worker wrote for this run, as it reported it (its sha256 is not recomputed)."""
        self._written[entry.file] = entry

    def listing(self, records: Sequence[ImageRecord]) -> Listing:
        """The records as planning and the commit match them (made once per run: the same records are reused)."""
        if self._listing is None or self._listing[0] is not records:
            self._listing = (records, Listing.of(records))
        return self._listing[1]

    def known(self, name: str, fingerprint: str) -> Known:
        """What feature set ``name`` holds of each file, committed or pending, when computed with ``fingerprint``."""
        shards = self.location.shards
        index = self.location.current_index(arrays=False)
        listed = index.sets.get(name)
        listed = listed if listed is not None and listed.fingerprint == fingerprint else None
        pending = [p for p in pending_shards(shards, index)
                   if p.header.feature_set == name and p.header.fingerprint == fingerprint]
        entries = [pending_entry(shards, p, self._written) for p in pending]
        return known_files(shards, self.location.path, listed, entries)

    def commit(self, dataset_root: Path, records: Sequence[ImageRecord], fingerprints: dict[str, str],
               run_jobs: JobRunner = map) -> dict[str, int]:
        """List the pending shards in a new index for the dataset's current ``records``, then replace the index.

        Every feature set, computed by this run or not, is brought up to date: rows of files no longer in
        ``records`` are deleted, labels and splits follow ``records``, and a pending row or failure
        supersedes an older one of the same path. Sets whose fingerprint differs from ``fingerprints``
        (other models, after ``--overwrite``) are replaced by the pending shards of the new one. A commit
        that would change nothing writes nothing. The version it supersedes is kept with its shards (see
        :meth:`cleanup`), and sets past the thresholds of :mod:`pipeline.store.compact` are compacted by
        ``run_jobs`` (``map`` here, or tasks on the cluster whose workers wrote the shards).

        Returns
        -------
        dict
            Per feature set, how many rows were deleted because their files left the dataset.
        """
        shards = self.location.shards
        index = self._writable_index()
        pending = pending_shards(shards, index)
        result = commit_sets(shards, self.location.path, index, pending, str(dataset_root), self.listing(records),
                             fingerprints, self._written)
        if result.index is not None:
            result.index.run = self._run_name().run
            result.index.changes = changes(index, result.index)
            self._replace(result.index)
            rewrites = plan_compaction(result.index, force=False)
            if rewrites:
                compacted = compact_index(shards, self.location.path, result.index, rewrites, run_jobs)
                self._replace(compacted, note=_compacted(rewrites))
        self._run, self._written, self._listing = None, {}, None  # the next shards are written on the new index
        return result.dropped

    def drop(self, name: str) -> None:
        """Remove feature set ``name`` in a new version (its shards are deleted once no kept version lists them).

        Raises
        ------
        UserError
            When the set is absent.
        """
        index = self._writable_index()
        if name not in index.sets:
            raise UserError(
                f"{self.location.path} has no {name!r} features (it has: {', '.join(sorted(index.sets)) or 'none'})."
            )
        sets = {other: set_index for other, set_index in index.sets.items() if other != name}
        self._replace(Index(index.version + 1, index.dataset_root, index.classes, sets),
                      note={name: {"added": 0, "deleted": index.sets[name].counts()[0]}}, carried=True)

    def compact(self, force: bool = True) -> Compaction:
        """Rewrite the shards that need it (see :func:`pipeline.store.compact.plan_compaction`), crash-safely.

        Results of an interrupted run stay pending for the next commit.
        """
        index = self._writable_index()
        rewrites = plan_compaction(index, force)
        if not rewrites:
            return Compaction({}, {})
        new = compact_index(self.location.shards, self.location.path, index, rewrites)
        self._replace(new, note=_compacted(rewrites), carried=True)
        before = {name: len(s.shards) for name, s in index.sets.items()}
        rewritten = {r.feature_set: 0 for r in rewrites}
        for rewrite in rewrites:
            rewritten[rewrite.feature_set] += rewrite.stop - rewrite.first
        written = {name: len(new.sets[name].shards) - before[name] + rewritten[name] for name in rewritten}
        return Compaction(rewritten, written)

    def discard_pending(self) -> None:
        """Forget the results of interrupted runs (used with ``--overwrite``)."""
        for shard in pending_shards(self.location.shards, self.location.current_index(arrays=False)):
            (self.location.shards / shard.name).unlink(missing_ok=True)

    def remove(self) -> None:
        """Empty the store in a new version (the earlier ones kept as :meth:`cleanup` says), and format 1's
        journal."""
        index = self.location.current_index(arrays=False)
        self._replace(Index(index.version + 1, "", [], {}),
                      note={name: {"added": 0, "deleted": s.counts()[0]} for name, s in index.sets.items()})
        shutil.rmtree(self.location.journal, ignore_errors=True)

    def cleanup(self, older_than: float = RETENTION_SECONDS) -> list[int]:
        """Remove the earlier versions superseded more than ``older_than`` seconds ago (never the previous one),
        then the shards that no kept version lists and no commit will, crash-safely.

        Version indexes go first, oldest first, and a shard only once no remaining index lists it: a kill at
        any point leaves every kept version whole, and the next writer finishes the work.

        Returns
        -------
        list of int
            The versions removed.
        """
        location = self.location
        current = location.current_index(arrays=False)
        kept = {v: location.version_index(v, arrays=False) for v in location.kept_versions()}  # one read each
        superseded = _superseded_times(location, kept, current)
        removed = [v for v in list(kept)[:-1] if time.time() - superseded[v] > older_than]  # the last: the previous
        for version in removed:
            location.version_file(version).unlink(missing_ok=True)
        listed = current.listed().union(*(index.listed() for v, index in kept.items() if v not in removed))
        pending = [p.name for p in pending_shards(location.shards, current)]
        for path in garbage(location.shards, current, [*listed, *pending]):
            path.unlink(missing_ok=True)
        return removed

    # ---- internals -----------------------------------------------------------------------------------------

    def _run_name(self) -> RunName:
        if self._run is None:
            self._run = RunName(self._writable_index(arrays=False).version)
        return self._run

    def _writable_index(self, arrays: bool = True) -> Index:
        """The index, after converting a format-1 store to format 2 (and a format-1 journal to pending shards)."""
        store = self.location
        index = store.current_index(arrays)
        if index.format_version == LEGACY_VERSION:
            logger.info(f"{store.path}: converting the store to format 2, once (the old file stays until the new "
                        "index is complete).")
            index = convert(store.path, store.shards, store.journal)
        elif store.journal.is_dir():  # a conversion killed after its index, or a format-1 run killed before its commit
            adopt_journal(store.journal, store.shards, index.version)
        return index

    def _replace(self, index: Index, note: dict[str, dict[str, int]] | None = None, carried: bool = False) -> None:
        """Put ``index`` in place as the next version, keeping the one it supersedes, then clean up.

        With ``carried``, pending shards stay pending on the new version (for index writes that are not
        commits); otherwise the unlisted ones are garbage once it is in place. ``note`` replaces the changes
        recorded in the version (a compaction's, a drop's).
        """
        location = self.location
        if note is not None:
            index.changes = note
        if carried:
            carry(location.shards, pending_shards(location.shards, location.current_index(arrays=False)), index.version)
        self._keep_current()
        write_index(location.path, index, location.shards)
        self.cleanup()

    def _keep_current(self) -> None:
        """Keep the current index as its version's file before a new one replaces it (a hard link: no copy)."""
        location = self.location
        if not location.exists():
            return
        current = location.current_index(arrays=False)
        if current.format_version == LEGACY_VERSION:
            return  # format 1 is converted, never kept as a version
        kept = location.version_file(current.version)
        location.versions.mkdir(exist_ok=True)
        try:
            os.link(location.path, kept)  # a name for a whole file, made at once
        except FileExistsError:
            return
        except OSError:  # a filesystem without hard links
            with atomic_path(kept) as tmp:
                shutil.copy2(location.path, tmp)


def changes(before: Index, after: Index) -> dict[str, dict[str, int]]:
    """Per feature set, the live rows a commit added (in shards ``before`` did not list) and deleted."""
    result = {}
    for name in sorted(set(before.sets) | set(after.sets)):
        old, new = before.sets.get(name), after.sets.get(name)
        had = old.counts()[0] if old is not None else 0
        if new is None:
            result[name] = {"added": 0, "deleted": had}
            continue
        listed_before = {entry.file for entry in old.shards} if old is not None else set()
        live, offsets = new.live(), new.offsets()
        added = sum(int(live[offsets[n] : offsets[n + 1]].sum()) for n, entry in enumerate(new.shards)
                    if entry.file not in listed_before)
        result[name] = {"added": added, "deleted": had + added - new.counts()[0]}
    return result


def _compacted(rewrites: Sequence) -> dict[str, dict[str, int]]:
    """A compaction's changes: no row added or deleted, shards rewritten per set."""
    shards: dict[str, int] = {}
    for rewrite in rewrites:
        shards[rewrite.feature_set] = shards.get(rewrite.feature_set, 0) + rewrite.stop - rewrite.first
    return {name: {"added": 0, "deleted": 0, "compacted": count} for name, count in shards.items()}


def _superseded_times(location: StoreLocation, kept: dict[int, Index], current: Index) -> dict[int, float]:
    """When each kept version (oldest first) was superseded: the commit time of the next version still there (a
    version whose successor is gone counts as superseded no earlier than the next one kept)."""
    versions = list(kept)
    times = {}
    for version, following in zip(versions, [*versions[1:], None]):
        later = current if following is None else kept[following]
        times[version] = _committed_at(later, location.path if following is None else location.version_file(following))
    return times


def _committed_at(index: Index, path: Path) -> float:
    """A version's commit time, or its file's modification time for versions written before history was kept."""
    if index.committed:
        return datetime.fromisoformat(index.committed).timestamp()
    return path.stat().st_mtime
