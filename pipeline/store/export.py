"""Export a feature set as one flat file (path, label, split, sha256, embedding per live row) for other tools:
Parquet (pandas, polars, DuckDB, Lance), HDF5 or NumPy's npz; streamed a block of rows at a time."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.store.embedding_store import EmbeddingStore
from pipeline.store.index import SetIndex
from pipeline.store.shards import ShardReader
from pipeline.store.spec import SPLITS

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("parquet", "hdf5", "npz")
BLOCK_ROWS = 8192  # rows in memory at once: 64 MiB of 2,048-d float32
PARQUET_MISSING = "--format parquet needs pyarrow: pip install -e '.[parquet]' (or use --format hdf5 or npz)."


@dataclass
class Block:
    """Consecutive live rows of a set: their files' paths, label names (``""`` when unlabelled), splits,
    sha256 and embeddings."""

    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    sha256: np.ndarray
    embeddings: np.ndarray


def export_set(store: EmbeddingStore, name: str, out: Path, file_format: str, block_rows: int = BLOCK_ROWS) -> int:
    """Write feature set ``name``'s live rows, in store order, to ``out`` as ``file_format``, one block at a time.

    The file appears whole or not at all (written under a temporary name, then renamed).

    Returns
    -------
    int
        The rows written.

    Raises
    ------
    UserError
        An unknown format or set, or pyarrow missing for Parquet.
    """
    if file_format not in EXPORT_FORMATS:
        raise UserError(f"--format {file_format} is not one of {', '.join(EXPORT_FORMATS)}.")
    asked = store.described
    store = store.snapshot()  # one version, whatever commits meanwhile
    index = store.index(arrays=False)
    if name not in index.sets:
        present = ", ".join(sorted(index.sets)) or "none"
        raise UserError(f"{asked} has no {name!r} features (it has: {present}); --set names one of them.")
    set_index = index.sets[name]
    rows = set_index.counts()[0]
    writer = {"parquet": _write_parquet, "hdf5": _write_hdf5, "npz": _write_npz}[file_format]
    with atomic_path(out) as tmp:
        writer(tmp, lambda: blocks(store, name, set_index, index.classes, block_rows), rows, set_index.dim)
    logger.debug(f"{out}: {rows} rows of {name} ({store.described}).")
    return rows


def blocks(store: EmbeddingStore, name: str, set_index: SetIndex, classes: list[str],
           block_rows: int) -> Iterator[Block]:
    """The set's live rows in store order, ``block_rows`` at most at a time (a block never spans two shards)."""
    class_names = np.array([*classes, ""], dtype=object)  # label -1 -> ""
    split_names = np.array(SPLITS, dtype=object)
    live, offsets = set_index.live(), set_index.offsets()
    with h5py.File(store.index_file(), "r") as index:
        labels_of, splits_of = index[name]["labels"], index[name]["split"]
        for number, entry in enumerate(set_index.shards):
            alive = np.flatnonzero(live[offsets[number] : offsets[number + 1]])
            if not len(alive):
                continue
            labels = labels_of[offsets[number] : offsets[number + 1]][alive]
            splits = splits_of[offsets[number] : offsets[number + 1]][alive]
            with ShardReader(store.shards, entry, store.path, verify=True) as reader:
                for start in range(0, len(alive), block_rows):
                    rows = alive[start : start + block_rows]
                    table = reader.table(rows=rows)
                    yield Block(table.paths.astype(object), class_names[labels[start : start + block_rows]],
                                split_names[splits[start : start + block_rows]], table.sha256.astype(object),
                                reader.embeddings(rows))


def _write_parquet(path: Path, make_blocks, rows: int, dim: int) -> None:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(PARQUET_MISSING) from None
    schema = pyarrow.schema([
        ("path", pyarrow.string()), ("label", pyarrow.string()), ("split", pyarrow.string()),
        ("sha256", pyarrow.string()), ("embedding", pyarrow.list_(pyarrow.float32(), dim)),
    ])
    with pyarrow.parquet.ParquetWriter(path, schema, compression="zstd") as writer:
        for block in make_blocks():
            embedding = pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(block.embeddings.reshape(-1)), dim)
            labels = pyarrow.array(block.labels.tolist(), pyarrow.string(), mask=block.labels == "")
            writer.write_table(pyarrow.Table.from_arrays(
                [pyarrow.array(block.paths.tolist(), pyarrow.string()), labels,
                 pyarrow.array(block.splits.tolist(), pyarrow.string()),
                 pyarrow.array(block.sha256.tolist(), pyarrow.string()), embedding], schema=schema))


def _write_hdf5(path: Path, make_blocks, rows: int, dim: int) -> None:
    text = h5py.string_dtype("utf-8")
    compressed = {"chunks": (max(1, min(rows, (1 << 20) // (4 * max(dim, 1)))), dim), "compression": "gzip",
                  "shuffle": True} if rows else {}
    with h5py.File(path, "w") as out:
        columns = {name: out.create_dataset(name, shape=(rows,), dtype=text) for name in ("path", "label", "split")}
        columns["sha256"] = out.create_dataset("sha256", shape=(rows,), dtype="S64")
        embeddings = out.create_dataset("embedding", shape=(rows, dim), dtype=np.float32, **compressed)
        position = 0
        for block in make_blocks():
            stop = position + len(block.paths)
            for name, values in (("path", block.paths), ("label", block.labels), ("split", block.splits)):
                columns[name][position:stop] = values
            columns["sha256"][position:stop] = block.sha256.astype("S64")
            embeddings[position:stop] = block.embeddings
            position = stop


def _write_npz(path: Path, make_blocks, rows: int, dim: int) -> None:
    """NumPy's npz, one member at a time: each ``.npy`` is a header and then its blocks' bytes (np.savez would
    hold every array in memory). Strings are fixed width, so one pass finds the widths first."""
    def column(block: Block, name: str) -> np.ndarray:
        return {"path": block.paths, "label": block.labels, "split": block.splits, "sha256": block.sha256,
                "embedding": block.embeddings}[name]

    widths = {"path": 1, "label": 1, "split": 1}
    for block in make_blocks():
        for name in widths:
            widths[name] = max(widths[name], max((len(value) for value in column(block, name)), default=1))
    members = {**{name: f"<U{width}" for name, width in widths.items()}, "sha256": "<U64", "embedding": "<f4"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, dtype in members.items():
            shape = (rows, dim) if name == "embedding" else (rows,)
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
                for block in make_blocks():
                    member.write(np.ascontiguousarray(column(block, name), dtype=dtype).tobytes())
