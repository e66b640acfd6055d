"""Shard files: immutable HDF5 files holding a block of rows of one feature set, written whole, then read by row."""

from __future__ import annotations

import json
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError, command
from pipeline.files import atomic_path, available_cores, plain, sha256_file
from pipeline.store.spec import (
    FORMAT_VERSION,
    SHARD_ENCODING,
    STRING,
    keys_from_bytes,
    keys_to_bytes,
    path_keys,
    storage_dtype,
)

GZIP_LEVEL = 1  # level 4 compressed synthetic embeddings 1.5 % smaller at 80 % of the speed
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the index lists it.

    Attributes
    ----------
    file : str
        POSIX path relative to the shards folder (a format-1 store's own file, absolute, for its groups).
    sha256 : str
        Hex sha256 of the file's bytes; ``""`` where none is recorded (a format-1 group).
    bytes : int
        The file's size.
    rows, failures : int
        Rows of embeddings, and rows of files that could not be decoded, that the shard holds.
    group : str
        Where its rows are in the file: ``/`` for a shard, the feature set's group in a format-1 file.
    """

    file: str
    sha256: str
    bytes: int
    rows: int
    failures: int
    group: str = "/"


@dataclass
class ShardTable:
    """Per-file data of a block of rows (or of failures): what a shard holds besides the embeddings.

    ``reasons`` is set for failures, empty for rows.
    """

    paths: np.ndarray  # str [n]
    sha256: np.ndarray  # str [n]
    sizes: np.ndarray  # int64 [n]
    mtimes: np.ndarray  # int64 [n]
    reasons: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def empty() -> ShardTable:
        nothing = np.array([], dtype=str)
        return ShardTable(nothing, nothing, np.zeros(0, np.int64), np.zeros(0, np.int64))

    def take(self, rows: np.ndarray) -> ShardTable:
        """The entries at ``rows``."""
        reasons = self.reasons[rows] if len(self.reasons) else self.reasons
        return ShardTable(self.paths[rows], self.sha256[rows], self.sizes[rows], self.mtimes[rows], reasons)

    @staticmethod
    def joined(tables: Sequence[ShardTable]) -> ShardTable:
        """The tables one after the other."""
        if not tables:
            return ShardTable.empty()
        reasons = [t.reasons for t in tables if len(t.reasons)]
        return ShardTable(
            np.concatenate([t.paths for t in tables]), np.concatenate([t.sha256 for t in tables]),
            np.concatenate([t.sizes for t in tables]), np.concatenate([t.mtimes for t in tables]),
            np.concatenate(reasons) if reasons else np.array([], dtype=str),
        )


@dataclass(frozen=True)
class ShardHeader:
    """What a shard says of itself: which feature set, computed how, on which index version and by whom."""

    feature_set: str
    fingerprint: str
    dataset_root: str
    base_version: int
    origin: str  # "extract", "compaction" or "conversion"
    set_attrs: dict[str, Any]


def write_shard(folder: Path, name: str, header: ShardHeader, rows: ShardTable, embeddings: np.ndarray,
                failures: ShardTable) -> ShardEntry:
    """Write a shard at ``folder / name`` atomically (a temporary name, flushed, then renamed).

    Parameters
    ----------
    folder : Path
        The store's shards folder.
    name : str
        The shard's POSIX path relative to ``folder``.
    header : ShardHeader
    rows : ShardTable
        The rows' paths, hashes and file states, aligned with ``embeddings``.
    embeddings : numpy.ndarray
        float32 ``[n, D]``.
    failures : ShardTable
        Files that could not be decoded, with their ``reasons``.

    Returns
    -------
    ShardEntry
        The entry an index lists it by.
    """
    return write_shard_blocks(folder, name, header, len(rows), [(rows, embeddings)], failures)


def write_shard_blocks(folder: Path, name: str, header: ShardHeader, count: int,
                       blocks: Iterable[tuple[ShardTable, np.ndarray]], failures: ShardTable) -> ShardEntry:
    """:func:`write_shard` for rows that come in blocks (``count`` rows in all), so that a shard written from
    other shards (compaction, conversion) holds one block in memory at a time."""
    path = folder / name
    dim = int(header.set_attrs["embedding_dim"])
    dtype = storage_dtype(header.set_attrs)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as shard:
            shard.attrs.update({
                "encoding": SHARD_ENCODING, "format_version": FORMAT_VERSION, "feature_set": header.feature_set,
                "fingerprint": header.fingerprint, "dataset_root": header.dataset_root,
                "base_version": header.base_version, "origin": header.origin,
                "set_attrs": json.dumps(header.set_attrs, sort_keys=True, default=plain),
            })
            tables = []
            with ChunkWriter(_create_embeddings(shard, dim, count, dtype)) as writer:
                for table, embeddings in blocks:
                    writer.write(np.asarray(embeddings).reshape(len(table), dim))
                    tables.append(table)
            rows = ShardTable.joined(tables)
            _write_table(shard, rows)
            _write_table(shard.create_group("failures"), failures)
            shard["failures"].create_dataset("reason", data=_objects(failures.reasons), dtype=STRING)
        sha256, size = sha256_file(tmp), tmp.stat().st_size
    return ShardEntry(name, sha256, size, len(rows), len(failures))


def read_header(path: Path) -> ShardHeader | None:
    """A shard file's header; None when it is not a readable shard (a file killed mid-write, or foreign)."""
    try:
        with h5py.File(path, "r") as shard:
            attrs = shard.attrs
            if attrs.get("encoding") != SHARD_ENCODING:
                return None
            return ShardHeader(
                str(attrs["feature_set"]), str(attrs["fingerprint"]), str(attrs["dataset_root"]),
                int(attrs["base_version"]), str(attrs["origin"]), json.loads(attrs["set_attrs"]),
            )
    except (OSError, KeyError, ValueError):
        return None


class ShardReader:
    """An open shard (or a format-1 group): its rows' and failures' file data and embeddings, by row.

    Opening checks that the file exists with the listed size; with ``verify``, also its sha256.

    Raises
    ------
    UserError
        The shard is missing, or is not the file the index lists (size or sha256 differ).
    """

    def __init__(self, folder: Path, entry: ShardEntry, index_path: Path, verify: bool = False) -> None:
        self.path = folder / entry.file
        self.entry = entry
        recovery = (
            f"restore that file, or compute that feature set anew: {command('store')} drop {_set_of(entry)} "
            f"--cache {index_path}, then extract again"
        )
        try:
            size = self.path.stat().st_size
        except OSError:
            raise UserError(f"{self.path} is missing, and {index_path} lists it as a shard; {recovery}.") from None
        if size != entry.bytes or (verify and entry.sha256 and sha256_file(self.path) != entry.sha256):
            raise UserError(
                f"{self.path} is not the shard {index_path} lists (its size or sha256 differs); {recovery}."
            )
        self.file = h5py.File(self.path, "r")
        self.group = self.file[entry.group]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *error: object) -> None:
        self.close()

    def keys(self, failures: bool = False) -> np.ndarray:
        """``S16`` path keys of the rows (or failures), in order."""
        table = self._table(failures)
        if "path_key" in table:
            return keys_from_bytes(table["path_key"][()])
        return path_keys(read_strings(table["paths"]))  # a format-1 group has none stored

    def states(self, failures: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(file_size, file_mtime_ns, readable)`` of the rows (or failures); readable: a hash was taken."""
        table = self._table(failures)
        readable = np.ones(table["file_size"].shape[0], bool)
        if failures:
            readable = np.char.str_len(read_strings(table["sha256"])) > 0
        return table["file_size"][()], table["file_mtime_ns"][()], readable

    def table(self, failures: bool = False, rows: np.ndarray | None = None) -> ShardTable:
        """Paths, hashes and file states of the rows (or failures, with their reasons), all or at ``rows``."""
        table = self._table(failures)
        pick = slice(None) if rows is None else np.asarray(rows)
        return ShardTable(
            read_strings(table["paths"])[pick], read_strings(table["sha256"])[pick], table["file_size"][()][pick],
            table["file_mtime_ns"][()][pick],
            read_strings(table["reason"])[pick] if failures else np.array([], dtype=str),
        )

    def embeddings(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[n, D]`` embeddings (whatever the storage), all or at the sorted ``rows`` (read as one span,
        then picked)."""
        dataset = self.group["embeddings"]
        if rows is None:
            return dataset[()].astype(np.float32, copy=False)
        rows = np.asarray(rows)
        if not len(rows):
            return np.zeros((0, dataset.shape[1]), np.float32)
        first, last = int(rows[0]), int(rows[-1]) + 1
        block = dataset[first:last].astype(np.float32, copy=False)
        return block if last - first == len(rows) else block[rows - first]

    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk of the embeddings: reading whole chunks decompresses each once."""
        chunks = self.group["embeddings"].chunks
        return chunks[0] if chunks else 4096

    def sha256_of(self, rows: np.ndarray) -> np.ndarray:
        """Hex sha256 of the files at ``rows`` (of embeddings)."""
        return read_strings(self.group["sha256"])[rows] if len(rows) else np.array([], dtype=str)

    def _table(self, failures: bool) -> h5py.Group:
        return self.group["failures"] if failures else self.group




def _set_of(entry: ShardEntry) -> str:
    return entry.group.strip("/") or Path(entry.file).parts[0]


def _create_embeddings(group: h5py.Group, dim: int, rows: int, dtype: np.dtype) -> h5py.Dataset:
    chunk_rows = max(1, min(max(rows, 1), CHUNK_BYTES // (dtype.itemsize * dim)))
    return group.create_dataset(
        "embeddings", shape=(rows, dim), dtype=dtype, chunks=(chunk_rows, dim),
        compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True,
    )


def _write_table(group: h5py.Group, table: ShardTable) -> None:
    group.create_dataset("paths", data=_objects(table.paths), dtype=STRING, **_compressed(len(table)))
    group.create_dataset("path_key", data=keys_to_bytes(path_keys(table.paths)), **_compressed(len(table)))
    group.create_dataset("sha256", data=np.asarray(table.sha256, dtype="S64"), **_compressed(len(table)))
    group.create_dataset("file_size", data=np.asarray(table.sizes, np.int64))
    group.create_dataset("file_mtime_ns", data=np.asarray(table.mtimes, np.int64))


def _compressed(rows: int) -> dict[str, Any]:
    return {"chunks": True, "compression": "gzip", "compression_opts": GZIP_LEVEL} if rows else {}


def _objects(values: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def read_strings(dataset: h5py.Dataset) -> np.ndarray:
    """A string dataset (UTF-8 of variable or fixed length, or fixed-length ASCII) as a numpy ``str`` array."""
    if not dataset.shape[0]:
        return np.array([], dtype=str)
    info = h5py.check_string_dtype(dataset.dtype)
    if info is not None and (info.length is None or info.encoding == "utf-8"):
        return dataset.asstr()[()].astype(str)
    return dataset[()].astype(str)


class ChunkWriter:
    """Fills a float dataset (float32 or float16) front to back, compressing whole chunks in threads.

    HDF5 compresses chunk by chunk on one thread; zlib releases the GIL, so chunks are shuffled and deflated
    in a thread pool, as HDF5's shuffle and gzip filters would, and written with ``write_direct_chunk``:
    the file is the same standard gzip + shuffle dataset.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.chunk_rows = dataset.chunks[0]
        self.level = dataset.compression_opts
        self.pending: list[np.ndarray] = []
        self.buffered = 0
        self.rows_written = 0
        self.next_row = 0  # where the next whole chunk goes
        self.workers = available_cores()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deflate")
        self.in_flight: deque = deque()

    def __enter__(self) -> ChunkWriter:
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``[n, D]``, converted to the dataset's dtype) after the rows written so far."""
        self.pending.append(np.asarray(rows, dtype=self.dataset.dtype))
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
                padded = np.zeros((self.chunk_rows, last.shape[1]), last.dtype)  # HDF5 stores edge chunks whole
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
    """HDF5's shuffle filter (byte planes of the elements), then its deflate filter (zlib)."""
    planes = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1, chunk.itemsize).T
    return zlib.compress(planes.tobytes(), level)
