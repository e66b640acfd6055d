"""Stage 4: the HDF5 embedding store, with a journal so that a killed run loses nothing and the file always opens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.discover import ImageRecord
from pipeline.errors import UserError
from pipeline.files import atomic_path, exclusive

FORMAT_VERSION = 1
ENCODING = "pipeline.embedding-store"
PIXELS = "pixels"
_STRING = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20
_COPY_BLOCK_ROWS = 4096
SPEC = (
    "Embedding store, format 1. /classes: UTF-8 class names [C]. One group per feature set (a backbone such as "
    "'resnet50', a precision variant such as 'resnet50-int8', or 'pixels' for the 32x32 raw-pixel baseline), rows aligned across its datasets: embeddings float32 [N, D]; "
    "paths UTF-8 [N], POSIX, relative to the dataset_root attribute; labels int32 [N], index into /classes, -1 "
    "when unlabelled; split UTF-8 [N] (train, validation, test or empty); sha256 UTF-8 [N] of each file's bytes; "
    "file_size and file_mtime_ns int64 [N] as read. <group>/failures holds paths, reason, sha256, file_size, "
    "file_mtime_ns of every file that could not be decoded. Group attributes say how the rows were computed "
    "(fingerprint = ONNX sha256, weights provenance, image size, precision and the fp32 export it derives from, "
    "int8 calibration, provider)."
)


@dataclass(frozen=True)
class FileState:
    """What a store knows of one file: its content hash and the size and mtime it had when read."""

    sha256: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FeatureSet:
    """One group of a store loaded into memory (see :meth:`EmbeddingStore.load`).

    Attributes
    ----------
    embeddings : numpy.ndarray or None
        float32 ``[N, D]``; None when loaded without them (read them in blocks with
        :meth:`EmbeddingStore.embeddings`).
    labels : numpy.ndarray
        int32 ``[N]``, indices into ``classes``; -1 for unlabelled images.
    paths : numpy.ndarray
        str ``[N]``, POSIX paths relative to the dataset root.
    classes : numpy.ndarray
        str ``[C]``.
    splits : numpy.ndarray
        str ``[N]``: ``train``, ``validation``, ``test`` or ``""``.
    sha256 : numpy.ndarray
        str ``[N]``, hex sha256 of each file's bytes (empty when loaded without embeddings).
    attrs : dict
        The group's attributes: how the embeddings were computed.
    """

    embeddings: np.ndarray | None
    labels: np.ndarray
    paths: np.ndarray
    classes: np.ndarray
    splits: np.ndarray
    sha256: np.ndarray
    attrs: dict[str, Any]


@dataclass
class Segment:
    """Rows computed for one feature set and not yet merged into the store: a journal entry."""

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


class EmbeddingStore:
    """An HDF5 file of embeddings per feature set (one group per backbone, plus ``pixels``).

    The file is only ever replaced whole (written beside it, then renamed), so it opens at every moment.
    A run appends its results to a journal folder beside the file (``<store>.journal/``) in small segments,
    each written atomically; :meth:`commit` merges the journal into a new file. A run killed before its
    commit leaves only complete segments, which the next run counts as done and merges.

    Parameters
    ----------
    path : path-like
        The HDF5 file, e.g. ``features/embeddings.h5``.

    Examples
    --------
    >>> features = EmbeddingStore("features/embeddings.h5").load("resnet50")  # doctest: +SKIP
    >>> features.embeddings.shape, features.classes  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.journal = self.path.with_name(self.path.name + ".journal")

    # ---- reading -------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the store file exists."""
        return self.path.exists()

    def feature_sets(self) -> list[str]:
        """Names of the feature sets in the store file."""
        if not self.exists():
            return []
        with self._open() as store:
            return sorted(name for name in store if isinstance(store[name], h5py.Group))

    def root_attrs(self) -> dict[str, Any]:
        """The file's root attributes (``format_version``, ``dataset_root``, ...); empty if there is no file."""
        if not self.exists():
            return {}
        with self._open() as store:
            return dict(store.attrs)

    def load(self, name: str, embeddings: bool = True) -> FeatureSet:
        """Load one feature set (a backbone name or ``"pixels"``) into memory.

        Without ``embeddings``, only the index is loaded: paths, labels, splits (``embeddings`` None and
        ``sha256`` empty), for reading the embeddings in blocks with :meth:`embeddings`.

        Raises
        ------
        UserError
            If the store or the feature set does not exist.
        """
        if self.journal.exists() and any(self.journal.iterdir()):
            warnings.warn(
                f"{self.journal} holds results of an interrupted run that are not in {self.path} yet; "
                "run extract again to merge them.",
                stacklevel=2,
            )
        if not self.exists():
            pending = " again to merge the interrupted run's results" if self.journal.exists() else " first"
            raise UserError(f"no embedding store at {self.path}; run extract{pending} (make extract DATA=...).")
        with self._open() as store:
            if name not in store:
                present = ", ".join(sorted(n for n in store if isinstance(store[n], h5py.Group))) or "none"
                raise UserError(f"{self.path} has no {name!r} features (it has: {present}); extract them first.")
            group = store[name]
            return FeatureSet(
                embeddings=group["embeddings"][()] if embeddings else None,
                labels=group["labels"][()],
                paths=_strings(group["paths"]),
                classes=_strings(store["classes"]),
                splits=_strings(group["split"]),
                sha256=_strings(group["sha256"]) if embeddings else np.array([], dtype=str),
                attrs=dict(group.attrs),
            )

    @contextlib.contextmanager
    def embeddings(self, name: str) -> Iterator[h5py.Dataset]:
        """The embeddings of feature set ``name``, open for reading in blocks (``dataset[start:stop]``).

        Reading whole HDF5 chunks (``dataset.chunks[0]`` rows each) decompresses each chunk once.
        """
        with self._open() as store:
            if name not in store:
                raise UserError(f"{self.path} has no {name!r} features; extract them first.")
            yield store[name]["embeddings"]

    def counts(self, name: str) -> tuple[int, int]:
        """``(rows, failures)`` of feature set ``name`` in the store file; ``(0, 0)`` when it is absent."""
        if not self.exists():
            return 0, 0
        with self._open() as store:
            if name not in store:
                return 0, 0
            return store[name]["paths"].shape[0], store[name]["failures/paths"].shape[0]

    def load_attrs(self, name: str) -> dict[str, Any]:
        """The attributes of feature set ``name`` (how its rows were computed)."""
        with self._open() as store:
            return dict(store[name].attrs)

    def matches(self, records: Sequence[ImageRecord], names: Sequence[str]) -> bool:
        """True when no journal is pending and each feature set in ``names`` covers exactly ``records``
        (as rows or recorded failures) with the same labels and splits: then a commit would change nothing."""
        if not self.exists() or (self.journal.exists() and any(self.journal.iterdir())):
            return False
        wanted = {r.path: (r.label or "", r.split) for r in records}
        with self._open() as store:
            classes = _strings(store["classes"])
            for name in names:
                if name not in store:
                    return False
                group = store[name]
                labels = [classes[i] if i >= 0 else "" for i in group["labels"][()]]
                stored = dict(zip(_strings(group["paths"]), zip(labels, _strings(group["split"]))))
                failed = _strings(group["failures/paths"])
                failed_set = set(failed)
                if len(stored) + len(failed) != len(wanted) or any(
                    stored.get(p) != v for p, v in wanted.items() if p not in failed_set
                ):
                    return False
        return True

    def state(self, name: str, fingerprint: str) -> tuple[dict[str, FileState], dict[str, FileState]]:
        """What feature set ``name`` already holds, in the file and the journal: ``(embedded, failed)`` by path.

        Rows computed with another fingerprint (another ONNX file) are not counted.
        """
        embedded: dict[str, FileState] = {}
        failed: dict[str, FileState] = {}
        if self.exists():
            with self._open() as store:
                if name in store and store[name].attrs.get("fingerprint") == fingerprint:
                    embedded.update(_states(store[name]))
                    failed.update(_states(store[name]["failures"]))
        for segment in self._segments(name):
            if segment["fingerprint"] != fingerprint:
                continue
            for path, state in _segment_states(segment, "").items():
                embedded[path] = state
                failed.pop(path, None)
            for path, state in _segment_states(segment, "failed_").items():
                failed[path] = state
                embedded.pop(path, None)
        return embedded, failed

    # ---- writing -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock for a run; a second run on the same store gets a clear error."""
        busy = f"another run is writing {self.path}; wait for it to finish, or use another --cache."
        with exclusive(self.path.with_name(self.path.name + ".lock"), busy):
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # from a run killed mid-commit
                stale.unlink(missing_ok=True)
            yield

    def append(self, segment: Segment) -> None:
        """Write a segment to the journal atomically; after this returns, its rows survive a kill."""
        if not len(segment):
            return
        self.journal.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in self.journal.glob("*.npz")), default=0)
        dim = int(segment.attrs["embedding_dim"])
        arrays = {
            "name": np.array(segment.name),
            "fingerprint": np.array(segment.fingerprint),
            "dataset_root": np.array(segment.dataset_root),
            "attrs": np.array(json.dumps(segment.attrs)),
            "embeddings": np.stack(segment.embeddings) if segment.embeddings else np.zeros((0, dim), np.float32),
            **_record_arrays("", segment.records, segment.states),
            **_record_arrays("failed_", [ImageRecord(p) for p, _, _ in segment.failures], [s for _, s, _ in segment.failures]),
            "failed_reasons": np.array([reason for _, _, reason in segment.failures], dtype=str),
        }
        with atomic_path(self.journal / f"{segment.name}-{number:06d}.npz") as tmp:
            with open(tmp, "wb") as stream:
                np.savez(stream, **arrays)
        segment.records, segment.states, segment.embeddings, segment.failures = [], [], [], []

    def commit(self, dataset_root: Path, records: Sequence[ImageRecord], fingerprints: dict[str, str]) -> dict[str, int]:
        """Merge the journal into a new store file for the dataset's current ``records``, then replace the file.

        Every feature set, computed by this run or not, is brought up to date: rows of files no longer in
        ``records`` are dropped, labels and splits follow ``records``, and a journal row or failure replaces
        an older one of the same path. Sets whose fingerprint differs from ``fingerprints`` (other models,
        after ``--overwrite``) are replaced by the journal's rows.

        Returns
        -------
        dict
            Per feature set, how many rows were dropped because their files are no longer in the dataset.
        """
        current = {r.path: r for r in records}
        segments = [s for s in self._segments() if s["dataset_root"] == str(dataset_root)]
        old_classes = _strings_of(self, "classes")
        classes = list(old_classes) + sorted({r.label for r in records if r.label} - set(old_classes))
        class_index = {name: i for i, name in enumerate(classes)}
        dropped: dict[str, int] = {}
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as new:
            new.attrs.update(
                {"encoding": ENCODING, "format_version": FORMAT_VERSION, "dataset_root": str(dataset_root), "spec": SPEC}
            )
            new.create_dataset("classes", data=np.array(classes, dtype=object), dtype=_STRING)
            old = h5py.File(self.path, "r") if self.exists() else None
            try:
                old_groups = {n for n in (old or ()) if isinstance(old[n], h5py.Group)}
                for name in sorted(set(fingerprints) | old_groups | {s["name"] for s in segments}):
                    group_old = old[name] if name in old_groups else None
                    # Sets this run did not compute keep their own fingerprint (or their journal's newest).
                    fingerprint = fingerprints.get(name) or (
                        group_old.attrs.get("fingerprint") if group_old is not None
                        else [s for s in segments if s["name"] == name][-1]["fingerprint"]
                    )
                    if group_old is not None and group_old.attrs.get("fingerprint") != fingerprint:
                        group_old = None
                    mine = [s for s in segments if s["name"] == name and s["fingerprint"] == fingerprint]
                    dropped[name] = _merge_group(new, name, group_old, mine, current, class_index)
            finally:
                if old is not None:
                    old.close()
        shutil.rmtree(self.journal, ignore_errors=True)
        return dropped

    def journal_roots(self) -> set[str]:
        """Dataset roots of the results an interrupted run left in the journal."""
        return {s["dataset_root"] for s in self._segments()}

    def clear_journal(self) -> None:
        """Forget results of interrupted runs (used with ``--overwrite``)."""
        shutil.rmtree(self.journal, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------------------------

    def _open(self) -> h5py.File:
        try:
            store = h5py.File(self.path, "r")
        except OSError as error:
            raise UserError(f"{self.path} is not a readable HDF5 store ({error}); move it away and extract again.") from None
        if store.attrs.get("encoding") != ENCODING:
            store.close()
            raise UserError(f"{self.path} is not an embedding store written by this pipeline; use another --cache.")
        version = store.attrs.get("format_version")
        if version != FORMAT_VERSION:
            store.close()
            raise UserError(
                f"{self.path} is embedding store format {version}, and this version of the pipeline reads format "
                f"{FORMAT_VERSION}; extract into another --cache, or use the pipeline version that wrote it."
            )
        return store

    def _segments(self, name: str | None = None) -> Iterator[dict[str, Any]]:
        """Journal segments in the order written, without their embeddings (read later, one at a time)."""
        if not self.journal.exists():
            return
        pattern = f"{name}-*.npz" if name else "*.npz"
        for path in sorted(self.journal.glob(pattern), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
            with np.load(path, allow_pickle=False) as data:
                segment: dict[str, Any] = {key: data[key] for key in data.files if key != "embeddings"}
            for key in ("name", "fingerprint", "dataset_root"):
                segment[key] = str(segment[key])
            segment["file"] = path
            yield segment


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    return dataset.asstr()[()].astype(str) if dataset.shape[0] else np.array([], dtype=str)


def _strings_of(store: EmbeddingStore, name: str) -> list[str]:
    if not store.exists():
        return []
    with store._open() as f:
        return list(_strings(f[name])) if name in f else []


def _states(group: h5py.Group) -> dict[str, FileState]:
    paths, sha = _strings(group["paths"]), _strings(group["sha256"])
    sizes, mtimes = group["file_size"][()], group["file_mtime_ns"][()]
    return {p: FileState(s, int(z), int(m)) for p, s, z, m in zip(paths, sha, sizes, mtimes)}


def _segment_states(segment: dict[str, np.ndarray], prefix: str) -> dict[str, FileState]:
    return {
        str(p): FileState(str(s), int(z), int(m))
        for p, s, z, m in zip(
            segment[prefix + "paths"], segment[prefix + "sha256"],
            segment[prefix + "file_size"], segment[prefix + "file_mtime_ns"],
        )
    }


def _record_arrays(prefix: str, records: Sequence[ImageRecord], states: Sequence[FileState]) -> dict[str, np.ndarray]:
    return {
        prefix + "paths": np.array([r.path for r in records], dtype=str),
        prefix + "sha256": np.array([s.sha256 for s in states], dtype=str),
        prefix + "file_size": np.array([s.size for s in states], dtype=np.int64),
        prefix + "file_mtime_ns": np.array([s.mtime_ns for s in states], dtype=np.int64),
    }


def _merge_group(
    new: h5py.File,
    name: str,
    old: h5py.Group | None,
    segments: Sequence[dict[str, Any]],
    current: dict[str, ImageRecord],
    class_index: dict[str, int],
) -> int:
    """Write feature set ``name`` into ``new``: the old rows still current, then the journal's newest rows.

    Returns how many old rows were dropped because their files left the dataset.
    """
    # The latest outcome per path, oldest source first: ("failed", state, reason) or ("row", segment, row).
    outcome: dict[str, tuple] = {}
    if old is not None:
        for (path, state), reason in zip(_states(old["failures"]).items(), _strings(old["failures/reason"])):
            outcome[path] = ("failed", state, reason)
    for number, segment in enumerate(segments):
        for row, path in enumerate(segment["paths"]):
            outcome[str(path)] = ("row", number, row)
        failed_states = _segment_states(segment, "failed_")
        for (path, state), reason in zip(failed_states.items(), segment["failed_reasons"]):
            outcome[path] = ("failed", state, str(reason))
    attrs = json.loads(str(segments[-1]["attrs"])) if segments else dict(old.attrs) if old is not None else None
    if attrs is None:
        return 0
    old_paths = _strings(old["paths"]) if old is not None else np.array([], dtype=str)
    keep = np.array([p in current and p not in outcome for p in old_paths], dtype=bool)
    if old is not None and keep.any() and segments and "provider" in attrs:
        providers = set(str(old.attrs.get("provider", "")).split(",")) | {attrs["provider"]}
        attrs["provider"] = ",".join(sorted(p for p in providers if p))
    fresh = {p: o[1:] for p, o in outcome.items() if o[0] == "row" and p in current}
    failed = {p: o[1:] for p, o in outcome.items() if o[0] == "failed" and p in current}
    fresh_paths = sorted(fresh, key=fresh.__getitem__)  # journal order: segment, then row
    paths = list(old_paths[keep]) + fresh_paths

    group = new.create_group(name)
    group.attrs.update(attrs)
    if old is not None and keep.all() and not fresh:
        new.copy(old["embeddings"], group, "embeddings")  # nothing changed: raw compressed chunks, as they are
    else:
        with _ChunkWriter(_create_rows(group, "embeddings", int(attrs["embedding_dim"]), len(paths))) as writer:
            if old is not None and keep.any():
                _copy_rows(old["embeddings"], writer, keep)
            for number, segment in enumerate(segments):
                rows = [row for n, row in map(fresh.__getitem__, fresh_paths) if n == number]
                if rows:
                    with np.load(segment["file"], allow_pickle=False) as data:
                        writer.write(data["embeddings"][rows])
    states = {**(_states(old) if old is not None else {}), **_fresh_states(segments, fresh)}
    _write_row_fields(group, paths, [states[p] for p in paths], current, class_index)
    failures = group.create_group("failures")
    _write_strings(failures, "paths", list(failed))
    _write_strings(failures, "sha256", [s.sha256 for s, _ in failed.values()])
    failures.create_dataset("file_size", data=np.array([s.size for s, _ in failed.values()], dtype=np.int64))
    failures.create_dataset("file_mtime_ns", data=np.array([s.mtime_ns for s, _ in failed.values()], dtype=np.int64))
    _write_strings(failures, "reason", [r for _, r in failed.values()])
    return sum(1 for p in old_paths if p not in current)


def _fresh_states(segments: Sequence[dict[str, np.ndarray]], fresh: dict[str, tuple[int, int]]) -> dict[str, FileState]:
    states = {}
    for path, (number, row) in fresh.items():
        segment = segments[number]
        states[path] = FileState(
            str(segment["sha256"][row]), int(segment["file_size"][row]), int(segment["file_mtime_ns"][row])
        )
    return states


def _create_rows(group: h5py.Group, name: str, dim: int, rows: int) -> h5py.Dataset:
    chunk_rows = max(1, min(max(rows, 1), _CHUNK_BYTES // (4 * dim)))
    return group.create_dataset(
        name, shape=(rows, dim), maxshape=(None, dim), dtype=np.float32,
        chunks=(chunk_rows, dim), compression="gzip", compression_opts=4, shuffle=True,
    )


def _copy_rows(source: h5py.Dataset, target: _ChunkWriter, keep: np.ndarray) -> None:
    """Copy the kept rows of ``source`` to ``target`` in blocks, so memory stays bounded."""
    for start in range(0, source.shape[0], _COPY_BLOCK_ROWS):
        mask = keep[start : start + _COPY_BLOCK_ROWS]
        if mask.any():
            target.write(source[start : start + len(mask)][mask])


class _ChunkWriter:
    """Fills a float32 dataset made by :func:`_create_rows` front to back, compressing whole chunks in threads.

    HDF5 compresses chunk by chunk on one thread (about 30 MB/s of embeddings here); zlib releases the GIL,
    so chunks are shuffled and deflated in a thread pool, as HDF5's shuffle and gzip filters would, and
    written with ``write_direct_chunk``: the file is the same standard gzip + shuffle dataset.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.chunk_rows = dataset.chunks[0]
        self.level = dataset.compression_opts
        self.pending: list[np.ndarray] = []
        self.buffered = 0
        self.rows_written = 0
        self.next_row = 0  # where the next whole chunk goes
        self.workers = _cores()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deflate")
        self.in_flight: deque = deque()

    def __enter__(self) -> _ChunkWriter:
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (float32 ``[n, D]``) after the rows written so far."""
        self.pending.append(np.asarray(rows, dtype=np.float32))
        self.buffered += len(rows)
        self.rows_written += len(rows)
        if self.buffered >= self.chunk_rows:
            block = np.concatenate(self.pending)
            whole = len(block) - len(block) % self.chunk_rows
            for start in range(0, whole, self.chunk_rows):
                self._submit(block[start : start + self.chunk_rows])
            self.pending = [block[whole:]] if whole < len(block) else []
            self.buffered = len(block) - whole

    def __exit__(self, *error: object) -> None:
        try:
            if self.buffered and not error[0]:
                last = np.concatenate(self.pending)
                padded = np.zeros((self.chunk_rows, last.shape[1]), np.float32)  # HDF5 stores edge chunks whole
                padded[: len(last)] = last
                self._submit(padded)
            while self.in_flight and not error[0]:
                self._write_oldest()
            if not error[0] and self.rows_written != self.dataset.shape[0]:
                raise RuntimeError(f"{self.dataset.name}: {self.rows_written} rows written for {self.dataset.shape[0]}")
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, chunk: np.ndarray) -> None:
        self.in_flight.append((self.next_row, self.pool.submit(_deflate, chunk, self.level)))
        self.next_row += self.chunk_rows
        while len(self.in_flight) > 2 * self.workers:
            self._write_oldest()

    def _write_oldest(self) -> None:
        row, future = self.in_flight.popleft()
        self.dataset.id.write_direct_chunk((row, 0), future.result())


def _deflate(chunk: np.ndarray, level: int) -> bytes:
    """HDF5's shuffle filter (byte planes of the 4-byte elements), then its deflate filter (zlib)."""
    planes = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1, 4).T
    return zlib.compress(planes.tobytes(), level)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _write_strings(group: h5py.Group, name: str, values: Iterable[str]) -> None:
    data = np.array(list(values), dtype=object)
    group.create_dataset(
        name, data=data, dtype=_STRING, maxshape=(None,),
        chunks=(max(1, min(len(data), 4096)),), compression="gzip", compression_opts=4,
    )


def _write_row_fields(
    group: h5py.Group,
    paths: Sequence[str],
    states: Sequence[FileState],
    current: dict[str, ImageRecord],
    class_index: dict[str, int],
) -> None:
    records = [current[p] for p in paths]
    _write_strings(group, "paths", paths)
    group.create_dataset(
        "labels", data=np.array([class_index[r.label] if r.label else -1 for r in records], dtype=np.int32)
    )
    _write_strings(group, "split", [r.split for r in records])
    _write_strings(group, "sha256", [s.sha256 for s in states])
    group.create_dataset("file_size", data=np.array([s.size for s in states], dtype=np.int64))
    group.create_dataset("file_mtime_ns", data=np.array([s.mtime_ns for s in states], dtype=np.int64))
