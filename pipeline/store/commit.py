"""Writing: a run's results as pending shards (its journal), what is already known, and the commit that lists them."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import sha256_file
from pipeline.store.index import Index, SetIndex
from pipeline.store.shards import ShardEntry, ShardHeader, ShardReader, ShardTable, read_header, write_shard
from pipeline.store.spec import FileState, ImageRecord, path_keys, split_codes

ORIGIN_EXTRACT = "extract"
_NAME = re.compile(r"^(\d{6})-([0-9a-f]{16})-(\d{10})-([a-z0-9]+)\.h5$")


@dataclass
class Segment:
    """Rows computed for one feature set and not yet in a shard: what a run writes out every few hundred images."""

    name: str
    fingerprint: str
    attrs: dict[str, Any]
    dataset_root: str
    records: list[ImageRecord] = field(default_factory=list)
    states: list[FileState] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    failures: list[tuple[str, FileState, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.failures)


@dataclass(frozen=True)
class RunName:
    """How a run names its shards: ``<set>/<base version>-<run>-<order>-<writer>.h5``, sortable in run order."""

    base_version: int
    run: str = field(default_factory=lambda: f"{time.time_ns():016x}")
    writer: str = "local"

    def shard(self, feature_set: str, order: int) -> str:
        return f"{feature_set}/{self.base_version:06d}-{self.run}-{order:010d}-{self.writer}.h5"


def write_segment(folder: Path, segment: Segment, name: str, base_version: int) -> ShardEntry:
    """Write a segment's rows as the pending shard ``name`` of the shards ``folder``."""
    states = segment.states
    rows = ShardTable(
        np.array([r.path for r in segment.records], dtype=str), np.array([s.sha256 for s in states], dtype=str),
        np.array([s.size for s in states], np.int64), np.array([s.mtime_ns for s in states], np.int64),
    )
    failed = [state for _, state, _ in segment.failures]
    failures = ShardTable(
        np.array([p for p, _, _ in segment.failures], dtype=str), np.array([s.sha256 for s in failed], dtype=str),
        np.array([s.size for s in failed], np.int64), np.array([s.mtime_ns for s in failed], np.int64),
        np.array([reason for _, _, reason in segment.failures], dtype=str),
    )
    dim = int(segment.attrs["embedding_dim"])
    embeddings = np.stack(segment.embeddings) if segment.embeddings else np.zeros((0, dim), np.float32)
    header = ShardHeader(segment.name, segment.fingerprint, segment.dataset_root, base_version, ORIGIN_EXTRACT,
                         segment.attrs)
    return write_shard(folder, name, header, rows, embeddings, failures)


@dataclass(frozen=True)
class Pending:
    """A shard a run wrote and no commit has listed yet."""

    name: str  # relative to the shards folder
    header: ShardHeader


def shard_files(folder: Path) -> list[str]:
    """Every shard file in the folder, as names relative to it."""
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.h5"))


def pending_shards(folder: Path, index: Index) -> list[Pending]:
    """The shards runs wrote on this index version (or carried to a later one) that no commit has listed yet,
    in run order (by file name)."""
    listed = index.listed()
    pending = []
    for name in sorted(shard_files(folder), key=lambda n: Path(n).name):
        match = _NAME.match(Path(name).name)
        if name in listed or not match or int(match[1]) < index.version or match[4] in ("compaction", "conversion"):
            continue
        header = read_header(folder / name)
        if header is not None and header.origin == ORIGIN_EXTRACT:
            pending.append(Pending(name, header))
    return pending


def carry(folder: Path, pending: Sequence[Pending], version: int) -> None:
    """Rename pending shards onto index ``version`` before an index write that does not list them (a drop or
    a compaction), so that they stay pending; a crash midway leaves them pending either way."""
    for shard in pending:
        folder_name, name = shard.name.rsplit("/", 1)
        os.replace(folder / shard.name, folder / folder_name / f"{version:06d}{name[6:]}")


def garbage(folder: Path, index: Index, keep: Collection[str]) -> list[Path]:
    """Files in the shards folder that no index lists and no commit will: safe to delete under the lock."""
    listed = index.listed() | set(keep)
    found = [p for p in folder.glob("*/.*.tmp")] if folder.is_dir() else []
    return found + [folder / name for name in shard_files(folder) if name not in listed]


@dataclass
class Known:
    """What a feature set holds of each path (its latest outcome): compact arrays sorted by path key.

    Attributes
    ----------
    keys : numpy.ndarray
        ``S16`` path keys (see :func:`pipeline.store.spec.path_keys`), sorted.
    sizes, mtimes : numpy.ndarray
        int64, the file as it was read.
    readable : numpy.ndarray
        bool: its bytes were read (embedded, or failed to decode). A file that could not be read at all
        is tried again on every run.
    """

    keys: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    readable: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def needed(self, keys: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray) -> np.ndarray:
        """bool per file: not known, or known with another size or mtime, or never read."""
        if not len(self.keys):
            return np.ones(len(keys), bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        same = (self.keys[at] == keys) & self.readable[at] & (self.sizes[at] == sizes) & (self.mtimes[at] == mtimes)
        return ~same


@dataclass
class _Outcomes:
    """Every live row and failure of a set, listed and pending, flattened; ``winner`` marks each path's latest.

    ``sizes``, ``mtimes`` and ``readable`` are empty unless asked for (planning needs them, a commit not).
    """

    keys: np.ndarray
    failure: np.ndarray  # bool
    position: np.ndarray  # int64: row (or failure row) number over the set's shards, listed then pending
    sizes: np.ndarray
    mtimes: np.ndarray
    readable: np.ndarray
    winner: np.ndarray


def _outcomes(folder: Path, index_path: Path, shards: Sequence[ShardEntry], live_rows: np.ndarray,
              live_failures: np.ndarray, states: bool) -> _Outcomes:
    total = int(live_rows.sum() + live_failures.sum())
    columns = _Outcomes(
        np.empty(total, "S16"), np.empty(total, bool), np.empty(total, np.int64),
        np.empty(total if states else 0, np.int64), np.empty(total if states else 0, np.int64),
        np.empty(total if states else 0, bool), np.zeros(total, bool),
    )
    filled = row_at = failure_at = 0
    for entry in shards:
        parts = ((False, entry.rows, row_at, live_rows), (True, entry.failures, failure_at, live_failures))
        takes = [np.flatnonzero(alive[start : start + count]) for _, count, start, alive in parts]
        if any(len(take) for take in takes):
            with ShardReader(folder, entry, index_path) as reader:
                for (failures, _, start, _), take in zip(parts, takes):
                    span = slice(filled, filled + len(take))
                    columns.keys[span] = reader.keys(failures)[take]
                    columns.failure[span], columns.position[span] = failures, start + take
                    if states:
                        sizes, mtimes, readable = reader.states(failures)
                        columns.sizes[span], columns.mtimes[span], columns.readable[span] = (
                            sizes[take], mtimes[take], readable[take]
                        )
                    filled += len(take)
        row_at, failure_at = row_at + entry.rows, failure_at + entry.failures
    order = np.argsort(columns.keys, kind="stable")  # stable: within a path, shards stay in order
    keys = columns.keys[order]
    last = np.ones(len(keys), bool)
    last[:-1] = keys[1:] != keys[:-1]
    del keys
    columns.winner[order[last]] = True
    return columns


def known_files(folder: Path, index_path: Path, set_index: SetIndex | None, pending: Sequence[ShardEntry]) -> Known:
    """What a set holds, in its listed shards and in ``pending`` ones, as :class:`Known`."""
    shards = (set_index.shards if set_index else []) + list(pending)
    live_rows, live_failures = _live_with(set_index, pending)
    outcomes = _outcomes(folder, index_path, shards, live_rows, live_failures, states=True)
    win = np.flatnonzero(outcomes.winner)
    order = win[np.argsort(outcomes.keys[win])]
    return Known(outcomes.keys[order], outcomes.sizes[order], outcomes.mtimes[order], outcomes.readable[order])


def _live_with(set_index: SetIndex | None, pending: Sequence[ShardEntry]) -> tuple[np.ndarray, np.ndarray]:
    """Live masks over the listed shards' rows (failures) followed by the pending ones', all live."""
    rows = [set_index.live()] if set_index else []
    failures = [set_index.live(True)] if set_index else []
    rows += [np.ones(sum(e.rows for e in pending), bool)]
    failures += [np.ones(sum(e.failures for e in pending), bool)]
    return np.concatenate(rows), np.concatenate(failures)


@dataclass
class Listing:
    """A dataset's records as planning and the commit match them: path keys, labels and splits, sorted by key.

    25 bytes per image; ``order`` maps each sorted position back to its record.
    """

    keys: np.ndarray  # S16, sorted
    order: np.ndarray  # int32 (int64 beyond 2**31 records): record number of each key
    labels: np.ndarray  # int32, index into ``names``, -1 when unlabelled
    splits: np.ndarray  # uint8 split codes
    names: list[str]  # the dataset's class names, sorted

    @staticmethod
    def of(records: Sequence[ImageRecord]) -> Listing:
        """The listing of ``records``."""
        names = sorted({r.label for r in records if r.label})
        code = {name: number for number, name in enumerate(names)}
        keys = path_keys(r.path for r in records)
        order = np.argsort(keys).astype(np.int32 if len(records) < 2**31 else np.int64)
        labels = np.array([code[r.label] if r.label else -1 for r in records], np.int32)[order]
        return Listing(keys[order], order, labels, split_codes(r.split for r in records)[order], names)

    def classes(self, old: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The store's classes after this listing (``old`` keep their indices, new ones come after, sorted),
        and each key's label as an index into them (-1 when unlabelled)."""
        classes = list(old) + sorted(set(self.names) - set(old))
        index = {name: number for number, name in enumerate(classes)}
        remap = np.array([index[name] for name in self.names] + [-1], np.int32)  # -1 picks the last: unlabelled
        return classes, remap[self.labels]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found, at)``: which keys are listed, and where."""
        if not len(self.keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys, at


@dataclass
class SetMerge:
    """A feature set after a commit: its new index entry, what changed."""

    set_index: SetIndex | None
    dropped: int  # rows removed because their files left the dataset
    changed: bool


def merge_set(folder: Path, index_path: Path, listed: SetIndex | None, pending: Sequence[tuple[Pending, ShardEntry]],
              listing: Listing, labels_of: np.ndarray) -> SetMerge:
    """The set's new index entry: its listed shards, then the pending ones, each path's latest outcome live.

    Rows and failures of files no longer in ``listing`` are deleted, and so are those an outcome of a later
    shard supersedes; labels (``labels_of``, per listed key, as class indices) and splits follow ``listing``;
    shards left without anything live are retired.
    """
    entries = (listed.shards if listed else []) + [entry for _, entry in pending]
    live_rows, live_failures = _live_with(listed, [entry for _, entry in pending])
    outcomes = _outcomes(folder, index_path, entries, live_rows, live_failures, states=False)
    found, at = listing.find(outcomes.keys)
    keep = outcomes.winner & found
    total_rows, total_failures = len(live_rows), len(live_failures)
    rows_alive, failures_alive = np.zeros(total_rows, bool), np.zeros(total_failures, bool)
    rows_alive[outcomes.position[keep & ~outcomes.failure]] = True
    failures_alive[outcomes.position[keep & outcomes.failure]] = True
    labels, splits = np.full(total_rows, -1, np.int32), np.zeros(total_rows, np.uint8)
    kept_rows = keep & ~outcomes.failure
    labels[outcomes.position[kept_rows]] = labels_of[at[kept_rows]]
    splits[outcomes.position[kept_rows]] = listing.splits[at[kept_rows]]
    listed_count = sum(e.rows for e in listed.shards) if listed else 0
    gone = outcomes.winner & ~found & ~outcomes.failure & (outcomes.position < listed_count)
    attrs = _attrs(listed, [p.header.set_attrs for p, _ in pending], rows_alive[:listed_count].any())
    if attrs is None:
        return SetMerge(None, 0, False)
    # Shards with nothing live left are retired; the others keep their order.
    row_ends, failure_ends = np.cumsum([e.rows for e in entries]), np.cumsum([e.failures for e in entries])
    kept_shards, row_mask, failure_mask, retired = [], np.zeros(total_rows, bool), np.zeros(total_failures, bool), []
    for number, entry in enumerate(entries):
        rows = slice(row_ends[number] - entry.rows, row_ends[number])
        failures = slice(failure_ends[number] - entry.failures, failure_ends[number])
        if rows_alive[rows].any() or failures_alive[failures].any():
            kept_shards.append(entry)
            row_mask[rows] = failure_mask[failures] = True
        else:
            retired.append(entry.file)
    new = SetIndex(
        attrs, kept_shards, labels[row_mask], splits[row_mask],
        np.flatnonzero(~rows_alive[row_mask]).astype(np.int64),
        np.flatnonzero(~failures_alive[failure_mask]).astype(np.int64),
    )
    changed = listed is None or bool(pending) or bool(retired) or not _same(listed, new)
    return SetMerge(new, int(gone.sum()), changed)


def _same(old: SetIndex, new: SetIndex) -> bool:
    return (
        old.attrs == new.attrs and [e.file for e in old.shards] == [e.file for e in new.shards]
        and np.array_equal(old.labels, new.labels) and np.array_equal(old.splits, new.splits)
        and np.array_equal(old.deleted, new.deleted) and np.array_equal(old.deleted_failures, new.deleted_failures)
    )


def _attrs(listed: SetIndex | None, pending: Sequence[dict[str, Any]],
           listed_rows_survive: bool) -> dict[str, Any] | None:
    """The set's attributes: the newest pending shard's, with the providers of surviving rows merged in."""
    if not pending:
        return dict(listed.attrs) if listed else None
    attrs = dict(pending[-1])
    providers = {str(a.get("provider", "")) for a in pending}
    if listed is not None and listed_rows_survive:
        providers |= set(str(listed.attrs.get("provider", "")).split(","))
    if "provider" in attrs:
        attrs["provider"] = ",".join(sorted({p for joined in providers for p in joined.split(",") if p}))
    return attrs


def pending_entry(folder: Path, pending: Pending, written: dict[str, ShardEntry]) -> ShardEntry:
    """The index entry of a pending shard: as its writer reported it when the file still matches, else measured."""
    path = folder / pending.name
    entry = written.get(pending.name)
    if entry is not None and path.stat().st_size == entry.bytes:
        return entry
    with ShardReader(folder, ShardEntry(pending.name, "", path.stat().st_size, 0, 0), path) as reader:
        rows, failures = len(reader.keys()), len(reader.keys(True))
    return ShardEntry(pending.name, sha256_file(path), path.stat().st_size, rows, failures)


@dataclass
class Commit:
    """What a commit makes of the store: the new index (None when nothing changed), and per feature set the rows
    deleted because their files left the dataset."""

    index: Index | None
    dropped: dict[str, int]


def commit_sets(folder: Path, index_path: Path, index: Index, pending: Sequence[Pending], dataset_root: str,
                listing: Listing, fingerprints: dict[str, str], written: dict[str, ShardEntry]) -> Commit:
    """The next index: every feature set brought up to date with ``records`` and the ``pending`` shards.

    Parameters
    ----------
    folder, index_path : Path
        The shards folder and the index file.
    index : Index
        The current index (an empty one for a new store).
    pending : sequence of Pending
        Shards written since ``index`` (see :func:`pending_shards`), in run order.
    dataset_root : str
        The dataset the listing is of; pending shards of another root are left out.
    listing : Listing
        The dataset's current files, labels and splits.
    fingerprints : dict
        The fingerprint of each feature set this run computes. A listed set of another fingerprint is
        replaced by the pending shards of this one; sets this run does not compute keep their own.
    written : dict
        Entries of shards this process wrote (their sha256 is not computed again).
    """
    classes, labels_of = listing.classes(index.classes)
    by_set: dict[str, list[Pending]] = {}
    for shard in pending:
        if shard.header.dataset_root == dataset_root:
            by_set.setdefault(shard.header.feature_set, []).append(shard)
    changed = classes != index.classes or dataset_root != index.dataset_root
    sets, dropped = {}, {}
    for name in sorted(set(fingerprints) | set(index.sets) | set(by_set)):
        listed, candidates = index.sets.get(name), by_set.get(name, [])
        fingerprint = fingerprints.get(name) or (
            listed.fingerprint if listed else candidates[-1].header.fingerprint if candidates else ""
        )
        if listed is not None and listed.fingerprint != fingerprint:
            listed, changed = None, True
        mine = [p for p in candidates if p.header.fingerprint == fingerprint]
        mine = [(p, pending_entry(folder, p, written)) for p in mine]
        merged = merge_set(folder, index_path, listed, mine, listing, labels_of)
        changed |= merged.changed
        if merged.set_index is not None:
            sets[name] = merged.set_index
            dropped[name] = merged.dropped
    if not changed:
        return Commit(None, dropped)
    return Commit(Index(index.version + 1, dataset_root, classes, sets), dropped)
