"""The index file: which shards make up each feature set, its deleted rows, labels and splits; written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.store.shards import ShardEntry, ShardReader, read_strings
from pipeline.store.spec import (
    ENCODING,
    FORMAT_VERSION,
    LEGACY_VERSION,
    SPEC,
    SPLITS,
    STRING,
    VIEW_PIECES,
    storage_dtype,
)


@dataclass
class SetIndex:
    """One feature set in the index.

    Attributes
    ----------
    attrs : dict
        How its rows were computed (``fingerprint``, ``embedding_dim``, weights, ...).
    shards : list of ShardEntry
        Its shards, in order; rows are numbered across them in that order.
    labels : numpy.ndarray
        int32 ``[R]``, each row's index into the classes (-1 when unlabelled or deleted).
    splits : numpy.ndarray
        uint8 ``[R]``, each row's split as a code into :data:`pipeline.store.spec.SPLITS`.
    deleted, deleted_failures : numpy.ndarray
        int64, sorted positions of the rows (and the failure rows) that are no longer live.
    """

    attrs: dict[str, Any]
    shards: list[ShardEntry] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    splits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    deleted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    deleted_failures: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))

    @property
    def dim(self) -> int:
        return int(self.attrs["embedding_dim"])

    def offsets(self, failures: bool = False) -> np.ndarray:
        """int64 ``[S + 1]``: where each shard's rows (or failures) start in the set's numbering."""
        counts = [entry.failures if failures else entry.rows for entry in self.shards]
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def live(self, failures: bool = False) -> np.ndarray:
        """bool ``[R]`` (or ``[F]``): which rows (failure rows) are live."""
        alive = np.ones(int(self.offsets(failures)[-1]), bool)
        alive[self.deleted_failures if failures else self.deleted] = False
        return alive

    def counts(self) -> tuple[int, int]:
        """``(live rows, live failures)``."""
        rows, failures = self.offsets()[-1], self.offsets(True)[-1]
        return int(rows - len(self.deleted)), int(failures - len(self.deleted_failures))


@dataclass
class Index:
    """A whole index in memory: what one version of the store is.

    ``committed`` (ISO 8601, UTC), ``run`` (the writer's run name) and ``changes`` (per feature set, rows
    ``added`` and ``deleted`` by the commit that made it, or ``compacted``) describe how the version came to
    be; they are empty for versions written before history was kept.
    """

    version: int
    dataset_root: str
    classes: list[str]
    sets: dict[str, SetIndex]
    format_version: int = FORMAT_VERSION
    committed: str = ""
    run: str = ""
    changes: dict[str, dict[str, int]] = field(default_factory=dict)

    def listed(self) -> set[str]:
        """The shard files this version lists, relative to the shards folder."""
        return {entry.file for set_index in self.sets.values() for entry in set_index.shards}

    @staticmethod
    def empty() -> Index:
        return Index(0, "", [], {})


def check_store_file(store: h5py.File, path: Path) -> int:
    """The format version of an open store file; refuses files that are not stores of a version read here."""
    if store.attrs.get("encoding") != ENCODING:
        raise UserError(f"{path} is not an embedding store written by this pipeline; use another --cache.")
    version = store.attrs.get("format_version")
    if version not in (LEGACY_VERSION, FORMAT_VERSION):
        raise UserError(
            f"{path} is embedding store format {version}, and this version of the pipeline reads formats "
            f"{LEGACY_VERSION} and {FORMAT_VERSION}; extract into another --cache, or use the pipeline version that "
            "wrote it."
        )
    return int(version)


def open_store_file(path: Path) -> h5py.File:
    """Open a store's file for reading, with a clear error when it is no store."""
    try:
        store = h5py.File(path, "r")
    except OSError as error:
        reason = str(error).split(" (", 1)[0]  # HDF5's own text goes on with file descriptors and addresses
        raise UserError(f"{path} is not a readable HDF5 store ({reason}); if it is no store of yours, give another "
                        "--cache.") from None
    try:
        check_store_file(store, path)
    except UserError:
        store.close()
        raise
    return store


def read_index(store: h5py.File, arrays: bool = True) -> Index:
    """The format-2 index in an open file; without ``arrays``, labels and splits are left empty."""
    sets = {name: read_index_set(store[name], arrays) for name in sorted(n for n in store
                                                                            if isinstance(store[n], h5py.Group))}
    return Index(int(store.attrs["version"]), str(store.attrs["dataset_root"]), list(read_strings(store["classes"])),
                 sets, committed=str(store.attrs.get("committed", "")), run=str(store.attrs.get("run", "")),
                 changes=json.loads(store.attrs.get("changes", "{}")))


def read_index_set(group: h5py.Group, arrays: bool = False) -> SetIndex:
    """One feature set's group of a format-2 index; without ``arrays``, labels and splits are left empty."""
    table = group["shards"]
    shards = [
        ShardEntry(str(f), str(s), int(b), int(r), int(x))
        for f, s, b, r, x in zip(read_strings(table["file"]), read_strings(table["sha256"]), table["bytes"][()],
                                 table["rows"][()], table["failures"][()])
    ]
    return SetIndex(
        dict(group.attrs), shards,
        group["labels"][()] if arrays else np.zeros(0, np.int32),
        group["split"][()] if arrays else np.zeros(0, np.uint8),
        group["deleted"][()], group["deleted_failures"][()],
    )


def write_index(path: Path, index: Index, shards_folder: Path) -> None:
    """Write ``index`` to ``path`` atomically, with each set's live rows as any HDF5 tool reads them: the
    embeddings and their files' sha256 as virtual datasets over the shards, their paths, labels and splits as
    copies (see :func:`_write_rows`)."""
    previous = _previous_paths(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as store:
        store.attrs.update({
            "encoding": ENCODING, "format_version": FORMAT_VERSION, "version": index.version,
            "dataset_root": index.dataset_root, "shards_folder": shards_folder.name, "spec": SPEC,
            "committed": index.committed or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run": index.run, "changes": json.dumps(index.changes),
        })
        store.create_dataset("classes", data=np.array(index.classes, dtype=object), dtype=STRING)
        store.create_dataset("split_names", data=np.array(SPLITS, dtype=object), dtype=STRING)
        for name, entry in sorted(index.sets.items()):
            group = store.create_group(name)
            group.attrs.update(entry.attrs)
            table = group.create_group("shards")
            table.create_dataset("file", data=np.array([s.file for s in entry.shards], dtype=object), dtype=STRING)
            table.create_dataset("sha256", data=np.array([s.sha256 for s in entry.shards], dtype="S64"))
            for column in ("bytes", "rows", "failures"):
                table.create_dataset(column, data=np.array([getattr(s, column) for s in entry.shards], np.int64))
            _compressed(group, "labels", np.asarray(entry.labels, np.int32))
            _compressed(group, "split", np.asarray(entry.splits, np.uint8))
            _compressed(group, "deleted", np.asarray(entry.deleted, np.int64))
            _compressed(group, "deleted_failures", np.asarray(entry.deleted_failures, np.int64))
            pieces = _write_view(group, entry, shards_folder.name)
            _write_rows(group, entry, pieces, previous.get(name, {}), shards_folder, path)


def _write_view(group: h5py.Group, entry: SetIndex, folder: str) -> list[tuple[int, int, int]] | None:
    """``embeddings``: the live rows of every shard in order, as an HDF5 virtual dataset over the shard files.

    Source files are named relative to the index, which HDF5 resolves from the index's own folder. A view
    of more than :data:`VIEW_PIECES` pieces (runs of live rows) is left out: opening it would be slow.

    Returns
    -------
    list of tuple or None
        The pieces ``(shard number, first row, stop row)``; None when the view was left out.
    """
    pieces = []
    live = entry.live()
    offsets = entry.offsets()
    for number, _shard in enumerate(entry.shards):
        alive = live[offsets[number] : offsets[number + 1]].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], alive, [0]])))
        pieces += [(number, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
        if len(pieces) > VIEW_PIECES:
            group.attrs["view"] = f"left out: more than {VIEW_PIECES} pieces; python -m pipeline.store compact makes it"
            return None
    _virtual(group, "embeddings", entry, pieces, folder, (entry.dim,), storage_dtype(entry.attrs))
    return pieces


def _virtual(group: h5py.Group, name: str, entry: SetIndex, pieces: list[tuple[int, int, int]], folder: str,
             row_shape: tuple[int, ...], dtype: np.dtype | str) -> None:
    """Dataset ``name`` of the shards at ``pieces``, one after the other, as a virtual dataset of the index."""
    if not pieces:
        group.create_dataset(name, shape=(0, *row_shape), dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape=(sum(b - a for _, a, b in pieces), *row_shape), dtype=dtype)
    sources = {}
    position = 0
    for number, start, stop in pieces:
        shard = entry.shards[number]
        if number not in sources:
            sources[number] = h5py.VirtualSource(f"{folder}/{shard.file}", name, shape=(shard.rows, *row_shape),
                                                 dtype=dtype)
        layout[position : position + stop - start] = sources[number][start:stop]
        position += stop - start
    fill = np.array(np.nan, dtype) if name == "embeddings" else None
    group.create_virtual_dataset(name, layout, fillvalue=fill)


def _write_rows(group: h5py.Group, entry: SetIndex, pieces: list[tuple[int, int, int]] | None,
                previous: dict[str, tuple[np.ndarray, np.ndarray]], folder: Path, index_path: Path) -> None:
    """``rows/``: per live row, aligned with ``embeddings``: ``path`` (a copy: HDF5 cannot map variable-length
    strings), ``label`` and ``split`` (copies, from the index's own arrays) and ``sha256`` (a virtual dataset
    over the shards, left out with the view).

    Paths of shards the replaced index listed are carried from it (a deleted row never lives again), so a
    commit reads the paths of its new shards only.
    """
    rows = group.create_group("rows")
    live, offsets = entry.live(), entry.offsets()
    paths = []
    for number, shard in enumerate(entry.shards):
        alive = live[offsets[number] : offsets[number + 1]]
        carried = previous.get(shard.file)
        if carried is not None and not (alive & ~carried[0]).any():
            paths.append(carried[1][alive[carried[0]]])
        elif alive.any():
            with ShardReader(folder, shard, index_path) as reader:
                paths.append(np.char.encode(reader.table(rows=np.flatnonzero(alive)).paths, "utf-8"))
    # UTF-8 bytes all the way (a str array would take 4 bytes a character), of fixed length so that gzip
    # compresses them with the rest (HDF5 keeps variable-length strings uncompressed in its heap).
    encoded = np.concatenate(paths) if paths else np.zeros(0, "S1")
    utf8 = h5py.string_dtype("utf-8", max(encoded.dtype.itemsize, 1))
    _compressed(rows, "path", encoded.astype(f"S{utf8.itemsize}", copy=False).view(utf8), utf8)
    if len(entry.labels) == len(live):
        _compressed(rows, "label", np.asarray(entry.labels[live], np.int32))
        _compressed(rows, "split", np.asarray(entry.splits[live], np.uint8))
    if pieces is not None:
        _virtual(rows, "sha256", entry, pieces, folder.name, (), "S64")


def _previous_paths(path: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per set and shard of the index at ``path`` (about to be replaced): which rows were live, and their paths."""
    try:
        store = h5py.File(path, "r")
    except OSError:
        return {}
    with store:
        if store.attrs.get("format_version") != FORMAT_VERSION:
            return {}
        carried = {}
        for name in (n for n in store if isinstance(store[n], h5py.Group) and "rows" in store[n]):
            group = store[name]
            entry = read_index_set(group)
            live, offsets = entry.live(), entry.offsets()
            paths = np.asarray(group["rows"]["path"][()], dtype="S")  # UTF-8 bytes, as written
            starts = np.concatenate([[0], np.cumsum([live[offsets[n] : offsets[n + 1]].sum()
                                                     for n in range(len(entry.shards))])]).astype(np.int64)
            carried[name] = {
                shard.file: (live[offsets[n] : offsets[n + 1]], paths[starts[n] : starts[n + 1]])
                for n, shard in enumerate(entry.shards)
            }
        return carried


def _compressed(group: h5py.Group, name: str, data: np.ndarray, dtype: object = None) -> None:
    options = {"chunks": True, "compression": "gzip", "compression_opts": 4, "shuffle": True} if len(data) else {}
    group.create_dataset(name, data=data, dtype=dtype, **options)
