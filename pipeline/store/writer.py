"""StoreWriter: the one object that changes a store, in Lance's manner.

It appends a run's rows as pending shards, hands worker processes a :class:`ShardTarget` to write theirs,
registers the shards they report, and commits them in a new index; it also drops sets, compacts and
empties the store. :class:`~pipeline.store.EmbeddingStore` only reads.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.files import exclusive
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
from pipeline.store.spec import LEGACY_VERSION, ImageRecord, shard_rows

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

        On taking it, leftovers of killed writers are removed (unfinished shards, shards no index will list),
        and a format-1 store is converted to format 2.
        """
        path = self.location.path
        busy = f"another run is writing {path}; wait for it to finish, or use another --cache."
        with exclusive(path.with_name(path.name + ".lock"), busy):
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # an index killed mid-write
                stale.unlink(missing_ok=True)
            index = self._writable_index(arrays=False)
            for leftover in garbage(self.location.shards, index, [p.name for p in pending_shards(self.location.shards,
                                                                                             index)]):
                leftover.unlink(missing_ok=True)
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
        index = self.location.index(arrays=False)
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
        that would change nothing writes nothing. Afterwards, shards no longer listed are deleted, and sets
        past the thresholds of :mod:`pipeline.store.compact` compacted by ``run_jobs`` (``map`` here, or
        tasks on the cluster whose workers wrote the shards).

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
            self._replace(result.index, result.retired)
            rewrites = plan_compaction(result.index, force=False)
            if rewrites:
                self._replace(*compact_index(shards, self.location.path, result.index, rewrites, run_jobs))
        self._run, self._written, self._listing = None, {}, None  # the next shards are written on the new index
        return result.dropped

    def drop(self, name: str) -> None:
        """Remove feature set ``name`` (its shards are deleted once the index no longer lists them).

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
        retired = [entry.file for entry in index.sets[name].shards]
        sets = {other: set_index for other, set_index in index.sets.items() if other != name}
        self._replace(Index(index.version + 1, index.dataset_root, index.classes, sets), retired, carried=True)

    def compact(self, force: bool = True) -> Compaction:
        """Rewrite the shards that need it (see :func:`pipeline.store.compact.plan_compaction`), crash-safely.

        Results of an interrupted run stay pending for the next commit.
        """
        index = self._writable_index()
        rewrites = plan_compaction(index, force)
        if not rewrites:
            return Compaction({}, {})
        new, retired = compact_index(self.location.shards, self.location.path, index, rewrites)
        self._replace(new, retired, carried=True)
        before = {name: len(s.shards) for name, s in index.sets.items()}
        rewritten = {r.feature_set: 0 for r in rewrites}
        for rewrite in rewrites:
            rewritten[rewrite.feature_set] += rewrite.stop - rewrite.first
        written = {name: len(new.sets[name].shards) - before[name] + rewritten[name] for name in rewritten}
        return Compaction(rewritten, written)

    def discard_pending(self) -> None:
        """Forget the results of interrupted runs (used with ``--overwrite``)."""
        for shard in pending_shards(self.location.shards, self.location.index(arrays=False)):
            (self.location.shards / shard.name).unlink(missing_ok=True)

    def remove(self) -> None:
        """Empty the store, crash-safely: an index listing nothing replaces it, then the shards are deleted."""
        store = self.location
        version = store.index(arrays=False).version if store.exists() else 0
        write_index(store.path, Index(version + 1, "", [], {}), store.shards)
        shutil.rmtree(store.shards, ignore_errors=True)
        shutil.rmtree(store.journal, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------------------------

    def _run_name(self) -> RunName:
        if self._run is None:
            self._run = RunName(self._writable_index(arrays=False).version)
        return self._run

    def _writable_index(self, arrays: bool = True) -> Index:
        """The index, after converting a format-1 store to format 2 (and a format-1 journal to pending shards)."""
        store = self.location
        index = store.index(arrays)
        if index.format_version == LEGACY_VERSION:
            logger.info(f"{store.path}: converting the store to format 2, once (the old file stays until the new "
                        "index is complete).")
            index = convert(store.path, store.shards, store.journal)
        elif store.journal.is_dir():  # a conversion killed after its index, or a format-1 run killed before its commit
            adopt_journal(store.journal, store.shards, index.version)
        return index

    def _replace(self, index: Index, retired: Sequence[str], carried: bool = False) -> None:
        """Put ``index`` in place, then delete the shards it no longer lists (never before).

        With ``carried``, pending shards stay pending on the new version (for index writes that are not
        commits); otherwise the unlisted ones are garbage once it is in place.
        """
        shards = self.location.shards
        if carried:
            carry(shards, pending_shards(shards, self.location.index(arrays=False)), index.version)
        write_index(self.location.path, index, shards)
        for name in retired:
            (shards / name).unlink(missing_ok=True)
        keep = [p.name for p in pending_shards(shards, index)] if carried else ()
        for path in garbage(shards, index, keep):
            path.unlink(missing_ok=True)
