"""EmbeddingStore: the store's one entry point, tying the index, the shards, the commit and the readers together."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
from pipeline.store.index import Index, open_store_file, read_index, write_index
from pipeline.store.legacy import adopt_journal, convert, legacy_index
from pipeline.store.readers import Failures, FeatureSet, RowReader, StoredEmbeddings, load_failures, load_set
from pipeline.store.shards import ShardEntry, ShardReader
from pipeline.store.spec import LEGACY_VERSION, ImageRecord, shard_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compaction:
    """What a compaction did: shards rewritten and written, per feature set."""

    rewritten: dict[str, int]
    written: dict[str, int]

    def __bool__(self) -> bool:
        return bool(self.rewritten)


class EmbeddingStore:
    """Embeddings per feature set (one per backbone and precision, plus ``pixels``): an index file and shards.

    The index at ``path`` lists immutable shard files in the folder ``<path>.shards/`` beside it. A run
    writes its rows as shards every few hundred images (its journal: a shard is whole once renamed), then
    commits: a new index listing them, written beside the old one and renamed over it. So the store opens at
    every moment, a killed run keeps every shard it finished (the next commit lists them), a run costs what
    it adds, and files that changed or left the dataset become deleted rows, not rewrites. Compaction
    rewrites shards once they are small or mostly deleted. A format-1 store (one file) is read as it is and
    converted by the first write.

    Parameters
    ----------
    path : path-like
        The index file, e.g. ``features/embeddings.h5``.

    Examples
    --------
    >>> features = EmbeddingStore("features/embeddings.h5").load("resnet50")  # doctest: +SKIP
    >>> features.embeddings.shape, features.classes  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(
                f"--cache {path} is a folder; name the store file, e.g. --cache {self.path / 'embeddings.h5'}."
            )
        self.shards = self.path.with_name(self.path.name + ".shards")
        self.journal = self.path.with_name(self.path.name + ".journal")  # format 1's: converted by the first write
        self._run: RunName | None = None
        self._order = 0
        self._written: dict[str, ShardEntry] = {}
        self._verified: set[str] = set()  # sha256 of the shards whose bytes this process has checked
        self._listing: tuple[Sequence[ImageRecord], Listing] | None = None

    # ---- reading -------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the index file exists."""
        return self.path.exists()

    def index(self, arrays: bool = True) -> Index:
        """The current index (a format-1 file as one of one shard per set); an empty one when there is none."""
        if not self.exists():
            return Index.empty()
        with open_store_file(self.path) as store:
            if store.attrs["format_version"] == LEGACY_VERSION:
                return legacy_index(store, self.path)
            return read_index(store, arrays)

    def feature_sets(self) -> list[str]:
        """Names of the feature sets in the store."""
        return sorted(self.index(arrays=False).sets)

    def root_attrs(self) -> dict[str, Any]:
        """The index's root attributes (``format_version``, ``dataset_root``, ...); empty if there is none."""
        if not self.exists():
            return {}
        with open_store_file(self.path) as store:
            return dict(store.attrs)

    def load(self, name: str, embeddings: bool = True) -> FeatureSet:
        """Load one feature set (a backbone name or ``"pixels"``) into memory, rows in store order.

        Without ``embeddings``, only paths, labels and splits are read (``embeddings`` None, ``sha256``
        empty), for streaming the embeddings with :meth:`rows`.

        Raises
        ------
        UserError
            If the store or the feature set does not exist, or a shard is missing or altered.
        """
        index = self._set_index(name)
        self._warn_if_pending(index)
        return load_set(self.shards, self.path, index.sets[name], index.classes, index.dataset_root, embeddings,
                        self._verified)

    def failures(self, name: str) -> Failures:
        """The files of feature set ``name`` that could not be decoded, with their reasons."""
        index = self._set_index(name, arrays=False)
        return load_failures(self.shards, self.path, index.sets[name])

    @contextlib.contextmanager
    def rows(self, name: str) -> Iterator[RowReader]:
        """The live rows of feature set ``name``, for reading in blocks across shards (see :class:`RowReader`)."""
        reader = RowReader(self.shards, self.path, self._set_index(name, arrays=False).sets[name], self._verified)
        try:
            yield reader
        finally:
            reader.close()

    def lookup(self, name: str, fingerprint: str) -> Mapping[str, np.ndarray]:
        """Stored embeddings of feature set ``name`` by content hash, when computed with ``fingerprint``.

        No embedding is read until one is asked for; empty when the store or set is absent or was computed
        with another model file.
        """
        set_index = self.index(arrays=False).sets.get(name)
        if set_index is None or set_index.fingerprint != fingerprint:
            return {}
        return StoredEmbeddings(self.shards, self.path, set_index, self._verified)

    def counts(self, name: str) -> tuple[int, int]:
        """``(rows, failures)`` of feature set ``name``; ``(0, 0)`` when it is absent."""
        set_index = self.index(arrays=False).sets.get(name)
        return set_index.counts() if set_index else (0, 0)

    def load_attrs(self, name: str) -> dict[str, Any]:
        """The attributes of feature set ``name`` (how its rows were computed)."""
        return dict(self._set_index(name, arrays=False).sets[name].attrs)

    def verify(self) -> int:
        """Check every listed shard's size and sha256; returns how many were checked.

        Raises
        ------
        UserError
            Naming the first shard that is missing or altered, and how to recover.
        """
        checked = 0
        for set_index in self.index(arrays=False).sets.values():
            for entry in set_index.shards:
                ShardReader(self.shards, entry, self.path, verify=True).close()
                checked += 1
        return checked

    # ---- writing -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock for a run; a second run on the same store gets a clear error.

        On taking it, leftovers of killed writers are removed (unfinished shards, shards no index will list),
        and a format-1 store is converted to format 2.
        """
        busy = f"another run is writing {self.path}; wait for it to finish, or use another --cache."
        with exclusive(self.path.with_name(self.path.name + ".lock"), busy):
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # an index killed mid-write
                stale.unlink(missing_ok=True)
            index = self._writable_index(arrays=False)
            for path in garbage(self.shards, index, [p.name for p in pending_shards(self.shards, index)]):
                path.unlink(missing_ok=True)
            yield

    def append(self, segment: Segment) -> None:
        """Write a segment as pending shards (of at most a full shard's rows each); after this returns, its rows
        survive a kill."""
        if not len(segment):
            return
        run = self.run_name()
        full = shard_rows(int(segment.attrs["embedding_dim"]))
        for start in range(0, max(len(segment.records), 1), full):
            piece = Segment(segment.name, segment.fingerprint, segment.attrs, segment.dataset_root,
                            segment.records[start : start + full], segment.states[start : start + full],
                            segment.embeddings[start : start + full], segment.failures if start == 0 else [])
            self._order += 1
            entry = write_segment(self.shards, piece, run.shard(segment.name, self._order), run.base_version)
            self._written[entry.file] = entry
        segment.records, segment.states, segment.embeddings, segment.failures = [], [], [], []

    def run_name(self) -> RunName:
        """How shards written for this run on other processes (Ray workers) are named."""
        if self._run is None:
            self._run = RunName(self._writable_index(arrays=False).version)
        return self._run

    def register(self, entry: ShardEntry) -> None:
        """A pending shard another process wrote for this run, as it reported it (its sha256 is not recomputed)."""
        self._written[entry.file] = entry

    def listing(self, records: Sequence[ImageRecord]) -> Listing:
        """The records as planning and the commit match them (made once per run: the same records are reused)."""
        if self._listing is None or self._listing[0] is not records:
            self._listing = (records, Listing.of(records))
        return self._listing[1]

    def known(self, name: str, fingerprint: str) -> Known:
        """What feature set ``name`` holds of each file, committed or pending, when computed with ``fingerprint``."""
        index = self.index(arrays=False)
        listed = index.sets.get(name)
        listed = listed if listed is not None and listed.fingerprint == fingerprint else None
        pending = [p for p in pending_shards(self.shards, index)
                   if p.header.feature_set == name and p.header.fingerprint == fingerprint]
        entries = [pending_entry(self.shards, p, self._written) for p in pending]
        return known_files(self.shards, self.path, listed, entries)

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
        index = self._writable_index()
        pending = pending_shards(self.shards, index)
        result = commit_sets(self.shards, self.path, index, pending, str(dataset_root), self.listing(records),
                             fingerprints, self._written)
        if result.index is not None:
            self._replace(result.index, result.retired)
            rewrites = plan_compaction(result.index, force=False)
            if rewrites:
                self._replace(*compact_index(self.shards, self.path, result.index, rewrites, run_jobs))
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
                f"{self.path} has no {name!r} features (it has: {', '.join(sorted(index.sets)) or 'none'})."
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
        new, retired = compact_index(self.shards, self.path, index, rewrites)
        self._replace(new, retired, carried=True)
        before = {name: len(s.shards) for name, s in index.sets.items()}
        rewritten = {r.feature_set: 0 for r in rewrites}
        for rewrite in rewrites:
            rewritten[rewrite.feature_set] += rewrite.stop - rewrite.first
        written = {name: len(new.sets[name].shards) - before[name] + rewritten[name] for name in rewritten}
        return Compaction(rewritten, written)

    def pending_sets(self) -> dict[str, int]:
        """Shards per feature set that interrupted runs wrote and no commit has listed yet."""
        counts: dict[str, int] = {}
        for shard in pending_shards(self.shards, self.index(arrays=False)):
            counts[shard.header.feature_set] = counts.get(shard.header.feature_set, 0) + 1
        return counts

    def pending_roots(self) -> set[str]:
        """Dataset roots of the results interrupted runs left pending."""
        return {p.header.dataset_root for p in pending_shards(self.shards, self.index(arrays=False))}

    def discard_pending(self) -> None:
        """Forget the results of interrupted runs (used with ``--overwrite``)."""
        for shard in pending_shards(self.shards, self.index(arrays=False)):
            (self.shards / shard.name).unlink(missing_ok=True)

    def remove(self) -> None:
        """Empty the store, crash-safely: an index listing nothing replaces it, then the shards are deleted."""
        version = self.index(arrays=False).version if self.exists() else 0
        write_index(self.path, Index(version + 1, "", [], {}), self.shards)
        shutil.rmtree(self.shards, ignore_errors=True)
        shutil.rmtree(self.journal, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------------------------

    def _set_index(self, name: str, arrays: bool = True) -> Index:
        if not self.exists():
            pending = " again to commit the interrupted run's results" if self.shards.exists() else " first"
            raise UserError(f"no embedding store at {self.path}; run extract{pending} (make extract DATA=...).")
        index = self.index(arrays)
        if name not in index.sets:
            present = ", ".join(sorted(index.sets)) or "none"
            raise UserError(f"{self.path} has no {name!r} features (it has: {present}); extract them first.")
        return index

    def _warn_if_pending(self, index: Index) -> None:
        if (self.journal.is_dir() and any(self.journal.iterdir())) or pending_shards(self.shards, index):
            logger.warning(
                f"{self.path} has results of an interrupted run that are not committed yet; run extract again to "
                "commit them."
            )

    def _writable_index(self, arrays: bool = True) -> Index:
        """The index, after converting a format-1 store to format 2 (and a format-1 journal to pending shards)."""
        index = self.index(arrays)
        if index.format_version == LEGACY_VERSION:
            logger.info(f"{self.path}: converting the store to format 2, once (the old file stays until the new index "
                        "is complete).")
            index = convert(self.path, self.shards, self.journal)
        elif self.journal.is_dir():  # a conversion killed after its index, or a format-1 run killed before its commit
            adopt_journal(self.journal, self.shards, index.version)
        return index

    def _replace(self, index: Index, retired: Sequence[str], carried: bool = False) -> None:
        """Put ``index`` in place, then delete the shards it no longer lists (never before).

        With ``carried``, pending shards stay pending on the new version (for index writes that are not
        commits); otherwise the unlisted ones are garbage once it is in place.
        """
        if carried:
            carry(self.shards, pending_shards(self.shards, self.index(arrays=False)), index.version)
        write_index(self.path, index, self.shards)
        for name in retired:
            (self.shards / name).unlink(missing_ok=True)
        keep = [p.name for p in pending_shards(self.shards, index)] if carried else ()
        for path in garbage(self.shards, index, keep):
            path.unlink(missing_ok=True)
