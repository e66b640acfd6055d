"""Reading: a feature set into memory, its rows streamed in blocks across shards, embeddings looked up by hash."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store.index import SetIndex, open_store_file, read_index
from pipeline.store.shards import ShardEntry, ShardReader
from pipeline.store.spec import SPLITS

OPEN_SHARDS = 16  # shard files a streaming reader keeps open


@dataclass(frozen=True)
class FeatureSet:
    """One feature set of a store loaded into memory (see :meth:`EmbeddingStore.load`).

    Attributes
    ----------
    embeddings : numpy.ndarray or None
        float32 ``[N, D]``; None when loaded without them (stream them with :meth:`EmbeddingStore.rows`).
    labels : numpy.ndarray
        int32 ``[N]``, indices into ``classes``; -1 for unlabelled images.
    paths : numpy.ndarray
        str ``[N]``, POSIX paths relative to ``root``.
    classes : numpy.ndarray
        str ``[C]``.
    splits : numpy.ndarray
        str ``[N]``: ``train``, ``validation``, ``test`` or ``""``.
    sha256 : numpy.ndarray
        str ``[N]``, hex sha256 of each file's bytes.
    attrs : dict
        The set's attributes: how the embeddings were computed.
    root : str
        The dataset root the paths are relative to.
    version : int
        The store version these rows are.
    """

    embeddings: np.ndarray | None
    labels: np.ndarray
    paths: np.ndarray
    classes: np.ndarray
    splits: np.ndarray
    sha256: np.ndarray
    attrs: dict[str, Any]
    root: str = ""
    version: int = 0

    def files(self) -> list[Path]:
        """The images' absolute paths, row by row."""
        return [Path(self.root) / path for path in self.paths]


@dataclass(frozen=True)
class Failures:
    """The files of a feature set that could not be decoded (or were too large), with why."""

    paths: np.ndarray
    reasons: np.ndarray
    sha256: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Layout:
    """Where a set's live rows are: per shard, the local rows that are live, and where each shard starts."""

    set_index: SetIndex
    local: list[np.ndarray] = field(init=False)
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        live, offsets = self.set_index.live(), self.set_index.offsets()
        self.local = [np.flatnonzero(live[offsets[n] : offsets[n + 1]]) for n in range(len(self.set_index.shards))]
        self.starts = np.concatenate([[0], np.cumsum([len(rows) for rows in self.local], dtype=np.int64)])

    def live_failures(self) -> list[np.ndarray]:
        live, offsets = self.set_index.live(True), self.set_index.offsets(True)
        return [np.flatnonzero(live[offsets[n] : offsets[n + 1]]) for n in range(len(self.set_index.shards))]


class Shards:
    """Opened shard files of one set, a few at a time (least recently used closed first).

    With ``verify``, each shard's sha256 is checked the first time it is opened; ``verified`` (shared by
    the readers of one store) remembers which were, so a shard opened again is not hashed again.
    """

    def __init__(self, folder: Path, index_path: Path, set_index: SetIndex, verify: bool,
                 verified: set[str] | None = None) -> None:
        self.folder, self.index_path, self.set_index, self.verify = folder, index_path, set_index, verify
        self.verified = verified if verified is not None else set()
        self.open: OrderedDict[int, ShardReader] = OrderedDict()

    def __getitem__(self, number: int) -> ShardReader:
        if number in self.open:
            self.open.move_to_end(number)
            return self.open[number]
        entry = self.set_index.shards[number]
        try:
            reader = ShardReader(self.folder, entry, self.index_path, self.verify and entry.sha256 not in self.verified)
        except UserError:
            self._refuse_if_replaced(entry)
            raise
        if self.verify:
            self.verified.add(entry.sha256)
        self.open[number] = reader
        if len(self.open) > OPEN_SHARDS:
            self.open.popitem(last=False)[1].close()
        return reader

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()
        self.open.clear()

    def _refuse_if_replaced(self, entry: ShardEntry) -> None:
        """A shard gone because a commit compacted it while this reader ran is not a lost file: say so."""
        try:
            with open_store_file(self.index_path) as store:
                listed = read_index(store, arrays=False).listed()
        except UserError:
            return
        if entry.file not in listed:
            raise UserError(
                f"{self.index_path} changed while this was reading it: the version it read is past the store's "
                f"retention, and a writer removed {entry.file}; run it again."
            ) from None


def load_set(folder: Path, index_path: Path, set_index: SetIndex, classes: list[str], root: str,
             embeddings: bool, verified: set[str] | None = None) -> FeatureSet:
    """A set's live rows in memory, in order; each shard whose embeddings are read is checked by sha256."""
    layout = Layout(set_index)
    total = int(layout.starts[-1])
    matrix = np.empty((total, set_index.dim), np.float32) if embeddings else None
    paths, hashes = [], []
    shards = Shards(folder, index_path, set_index, embeddings, verified)
    try:
        for number, rows in enumerate(layout.local):
            if not len(rows):
                continue
            reader = shards[number]
            table = reader.table(rows=rows)
            paths.append(table.paths)
            hashes.append(table.sha256)
            if embeddings:
                matrix[layout.starts[number] : layout.starts[number + 1]] = reader.embeddings(rows)
    finally:
        shards.close()
    live = set_index.live()
    return FeatureSet(
        embeddings=matrix,
        labels=set_index.labels[live].astype(np.int32),
        paths=np.concatenate(paths) if paths else np.array([], dtype=str),
        classes=np.array(classes, dtype=str),
        splits=np.array(SPLITS, dtype=str)[set_index.splits[live]],
        sha256=np.concatenate(hashes) if hashes else np.array([], dtype=str),
        attrs=dict(set_index.attrs),
        root=root,
    )


def load_failures(folder: Path, index_path: Path, set_index: SetIndex) -> Failures:
    """A set's live failures, in order."""
    tables = []
    for entry, rows in zip(set_index.shards, Layout(set_index).live_failures()):
        if len(rows):
            with ShardReader(folder, entry, index_path) as reader:
                tables.append(reader.table(True, rows))
    if not tables:
        nothing = np.array([], dtype=str)
        return Failures(nothing, nothing, nothing)
    return Failures(*(np.concatenate([getattr(t, f) for t in tables]) for f in ("paths", "reasons", "sha256")))


class RowReader:
    """A set's live rows, numbered ``0..N-1`` in the order :meth:`EmbeddingStore.load` gives them, read in blocks.

    Each shard is checked by sha256 the first time it is read; a few stay open.
    """

    def __init__(self, folder: Path, index_path: Path, set_index: SetIndex, verified: set[str] | None = None) -> None:
        self.layout = Layout(set_index)
        self.shards = Shards(folder, index_path, set_index, True, verified)
        self.dim = set_index.dim

    def __len__(self) -> int:
        return int(self.layout.starts[-1])

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` row ranges, each within one HDF5 chunk of one shard: read whole, each decompresses once."""
        for number, rows in enumerate(self.layout.local):
            if not len(rows):
                continue
            chunk = self.shards[number].chunk_rows()
            edges = np.flatnonzero(np.diff(rows // chunk)) + 1
            start = int(self.layout.starts[number])
            for first, stop in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(rows)]])):
                yield start + int(first), start + int(stop)

    def read(self, start: int, stop: int) -> np.ndarray:
        """float32 ``[stop - start, D]``: the live rows ``start..stop-1``."""
        first = int(np.searchsorted(self.layout.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            begin, end = int(self.layout.starts[first]), int(self.layout.starts[first + 1])
            if end > start:
                local = self.layout.local[first][start - begin : min(stop, end) - begin]
                parts.append(self.shards[first].embeddings(local))
                start = min(stop, end)
            first += 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def close(self) -> None:
        self.shards.close()


class StoredEmbeddings(Mapping):
    """A set's embeddings by content hash (hex sha256), found without reading any embedding until asked.

    Holds 40 bytes per stored row: each hash as 32 bytes, sorted, and where its row is. Looking a hash up
    costs a binary search; reading its embedding, one HDF5 chunk.
    """

    def __init__(self, folder: Path, index_path: Path, set_index: SetIndex, verified: set[str] | None = None) -> None:
        self.shards = Shards(folder, index_path, set_index, True, verified)
        digests, numbers, rows = [], [], []
        for number, local in enumerate(Layout(set_index).local):
            if len(local):
                with ShardReader(folder, set_index.shards[number], index_path) as reader:
                    digests.append(hash_digests(reader.sha256_of(local)))
                numbers.append(np.full(len(local), number, np.int32))
                rows.append(local.astype(np.int32))
        if not digests:
            digests, numbers, rows = [np.zeros(0, "S32")], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        digest = np.concatenate(digests)
        order = np.argsort(digest)
        self.digests, self.numbers, self.rows = (
            digest[order], np.concatenate(numbers)[order], np.concatenate(rows)[order]
        )
        self.lock = threading.Lock()

    def _find(self, sha256: object) -> int:
        if not isinstance(sha256, str) or len(sha256) != 64 or not len(self.digests):
            return -1
        try:
            key = hash_digests(np.array([sha256]))[0]
        except ValueError:
            return -1
        at = int(np.searchsorted(self.digests, key))
        return at if at < len(self.digests) and self.digests[at] == key else -1

    def __contains__(self, sha256: object) -> bool:
        return self._find(sha256) >= 0

    def __getitem__(self, sha256: str) -> np.ndarray:
        at = self._find(sha256)
        if at < 0:
            raise KeyError(sha256)
        with self.lock:  # decoding threads may ask at once; h5py serialises, the open-file cache must too
            return self.shards[int(self.numbers[at])].embeddings(np.array([self.rows[at]]))[0]

    def __len__(self) -> int:
        return len(self.digests)

    def __iter__(self) -> Iterator[str]:
        for number in np.unique(self.numbers):
            yield from self.shards[int(number)].sha256_of(np.sort(self.rows[self.numbers == number])).tolist()

    def close(self) -> None:
        self.shards.close()


_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def hash_digests(hashes: np.ndarray) -> np.ndarray:
    """Hex sha256 strings as their 32 bytes, ``S32`` (half the memory, and a fixed width numpy sorts fast)."""
    hex_digits = np.frombuffer(np.asarray(hashes, dtype="S64").tobytes(), np.uint8).reshape(-1, 64)
    nibbles = _NIBBLE[hex_digits]
    if (nibbles == 255).any():
        raise ValueError("not a hex sha256")
    return np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view("S32").reshape(-1)
