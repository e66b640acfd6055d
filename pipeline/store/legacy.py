"""Format 1 (one HDF5 file rewritten by every run): read as an index of one shard per set, and converted once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.commit import RunName, Segment, write_segment
from pipeline.store.index import Index, SetIndex, open_store_file, write_index
from pipeline.store.shards import ShardEntry, ShardHeader, ShardReader, ShardTable, read_strings, write_shard_blocks
from pipeline.store.spec import LEGACY_VERSION, FileState, ImageRecord, shard_rows, split_codes

BLOCK_ROWS = 1024  # rows copied at a time


def legacy_index(store: h5py.File, path: Path) -> Index:
    """A format-1 file as an index: each group is the one shard of its set, nothing deleted, version 0."""
    size = path.stat().st_size
    sets = {}
    for name in sorted(n for n in store if isinstance(store[n], h5py.Group)):
        group = store[name]
        entry = ShardEntry(str(path.resolve()), "", size, group["paths"].shape[0], group["failures/paths"].shape[0],
                           group=f"/{name}")
        sets[name] = SetIndex(dict(group.attrs), [entry], group["labels"][()].astype(np.int32),
                              split_codes(read_strings(group["split"])))
    classes = list(read_strings(store["classes"]))
    return Index(0, str(store.attrs["dataset_root"]), classes, sets, format_version=LEGACY_VERSION)


def convert(path: Path, folder: Path, journal: Path) -> Index:
    """Convert the format-1 store at ``path`` to format 2 in place, crash-safely; returns the new index.

    Each set's rows are copied, in order, into full shards (marked as conversion shards, so that a crash
    leaves only garbage), then the format-2 index replaces the file in one rename. Results of an
    interrupted format-1 run (its ``journal`` folder) become pending shards of the new index.
    """
    with open_store_file(path) as store:
        legacy = legacy_index(store, path)
    name = RunName(0, writer="conversion")
    sets = {}
    for set_name, set_index in legacy.sets.items():
        entry = set_index.shards[0]
        header = ShardHeader(set_name, set_index.fingerprint, legacy.dataset_root, 0, "conversion", set_index.attrs)
        written = []
        if entry.rows or entry.failures:
            full = shard_rows(set_index.dim)
            with ShardReader(folder, entry, path) as reader:
                rows, failures = reader.table(), reader.table(True)
                for number, start in enumerate(range(0, max(entry.rows, 1), full)):
                    stop = min(entry.rows, start + full)
                    written.append(write_shard_blocks(
                        folder, name.shard(set_name, number), header, stop - start, _copied(reader, rows, start, stop),
                        failures if number == 0 else ShardTable.empty(),
                    ))
        sets[set_name] = SetIndex(set_index.attrs, written, set_index.labels, set_index.splits)
    index = Index(1, legacy.dataset_root, legacy.classes, sets)
    write_index(path, index, folder)
    adopt_journal(journal, folder, index.version)
    return index


def _copied(reader: ShardReader, rows: ShardTable, start: int, stop: int) -> Iterator[tuple[ShardTable, np.ndarray]]:
    """Rows ``start..stop-1`` of a format-1 group, a block at a time (a few MB in memory)."""
    for first in range(start, stop, BLOCK_ROWS):
        picked = np.arange(first, min(first + BLOCK_ROWS, stop))
        yield rows.take(picked), reader.embeddings(picked)


def adopt_journal(journal: Path, folder: Path, base_version: int) -> int:
    """Turn a format-1 journal's segments into pending shards on ``base_version``, then remove it.

    Returns how many segments there were. Killed midway, it is simply done again: the shards it made
    twice hold the same rows, and the commit keeps one of each.
    """
    if not journal.is_dir():
        return 0
    segments = sorted(journal.glob("*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    name = RunName(base_version)
    for order, path in enumerate(segments):
        with np.load(path, allow_pickle=False) as data:
            write_segment(folder, _segment(data), name.shard(str(data["name"]), order), base_version)
    shutil.rmtree(journal, ignore_errors=True)
    return len(segments)


def _segment(data: np.lib.npyio.NpzFile) -> Segment:
    """A format-1 journal segment (an ``.npz`` file) as a :class:`Segment`."""
    segment = Segment(str(data["name"]), str(data["fingerprint"]), json.loads(str(data["attrs"])),
                      str(data["dataset_root"]))
    for path, sha256, size, mtime, row in zip(data["paths"], data["sha256"], data["file_size"], data["file_mtime_ns"],
                                              data["embeddings"]):
        segment.records.append(ImageRecord(str(path)))
        segment.states.append(FileState(str(sha256), int(size), int(mtime)))
        segment.embeddings.append(row)
    for path, sha256, size, mtime, reason in zip(data["failed_paths"], data["failed_sha256"], data["failed_file_size"],
                                                 data["failed_file_mtime_ns"], data["failed_reasons"]):
        segment.failures.append((str(path), FileState(str(sha256), int(size), int(mtime)), str(reason)))
    return segment
