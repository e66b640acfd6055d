"""The store's on-disk format 2: its names, version and written spec, thresholds, the record of one image, and the
path keys runs plan with."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import h5py
import numpy as np

FORMAT_VERSION = 2
LEGACY_VERSION = 1  # one HDF5 file rewritten whole by every run: read as it is, converted by the first write
ENCODING = "pipeline.embedding-store"
SHARD_ENCODING = "pipeline.embedding-shard"
PIXELS = "pixels"
SPLITS = ("", "train", "validation", "test")  # codes 0..3 of the index's split datasets
STRING = h5py.string_dtype("utf-8")
KEY_BYTES = 16

# Compaction (see :mod:`pipeline.store.compact`): a shard holds up to SHARD_BYTES of embeddings; one with
# fewer live rows than a quarter of that is small. A commit compacts a feature set by itself when it holds
# more than SMALL_SHARDS small shards, or a shard whose rows are more than DEAD_SHARE deleted.
SHARD_BYTES = 128 << 20
SMALL_SHARE = 0.25
SMALL_SHARDS = 64
DEAD_SHARE = 0.25
VIEW_PIECES = 65_536  # the index's virtual-dataset view is left out beyond this many pieces
# Versions: the index of every version, and the shards it lists, are kept this long after a commit supersedes
# it (and the previous version always), so that a reader that opened it reads it whole.
RETENTION_SECONDS = 24 * 3600


def duration_text(seconds: float) -> str:
    """A duration as people say it: ``24 hours``, ``90 minutes``, ``30 seconds``, ``2 days``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds and seconds % size == 0 and (unit != "day" or seconds >= 2 * size):
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


def parse_duration(text: str) -> float:
    """``30s``, ``90m``, ``24h``, ``7d`` (or a number of seconds) in seconds.

    Raises
    ------
    ValueError
        For any other text.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30s, 90m, 24h or 7d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]

@dataclass(frozen=True, slots=True)  # slots: a listing of 100M images holds 100M of these
class ImageRecord:
    """One image of a dataset.

    Attributes
    ----------
    path : str
        POSIX path relative to the dataset root: the image's identity in the store.
    label : str or None
        Class name, None when unlabelled.
    split : str
        ``train``, ``validation``, ``test``, or ``""`` when the layout has no splits.
    """

    path: str
    label: str | None = None
    split: str = ""


SPEC = (
    "Embedding store, format 2: this index file, and immutable HDF5 shard files in the folder named by the "
    "shards_folder attribute, beside it. INDEX: root attributes encoding = 'pipeline.embedding-store', "
    "format_version = 2, version (the commit counter, +1 per commit), dataset_root (absolute path), shards_folder, "
    "spec; /classes UTF-8 [C] (class names; an index never changes once written); /split_names UTF-8 "
    "['', 'train', 'validation', 'test']. One group per feature set (a backbone such as 'resnet50', a precision "
    "variant such as 'resnet50-int8', or 'pixels' for the 32x32 raw-pixel baseline), whose attributes say how "
    "its rows were computed (fingerprint = ONNX sha256, weights provenance, image size, precision, provider...), "
    "holding: shards/file UTF-8 [S] (POSIX paths relative to the shards folder), shards/sha256 [S] (hex sha256 "
    "of each shard file), shards/bytes, shards/rows, shards/failures int64 [S]: the set's shards, in order; "
    "labels int32 [R] (index into /classes, -1 when unlabelled) and split uint8 [R] (index into /split_names) of "
    "every row of those shards in order, R being the sum of their rows; deleted and deleted_failures int64: "
    "sorted positions, over the rows (the failure rows) of the set's shards in order, that are no longer live; "
    "embeddings: a virtual dataset float32 [N, D] of the live rows in order, for plain HDF5 tools (it reads NaN "
    "where a shard is missing; it MAY be absent, when it would need more than 65536 pieces); rows/ MUST hold, "
    "per live row in the same order: path UTF-8 [N] (relative to dataset_root), label int32 [N] (into /classes, "
    "-1 unlabelled), split uint8 [N] (into /split_names), and sha256 ASCII [N] (a virtual dataset over the "
    "shards, absent when embeddings is). SHARD: root "
    "attributes encoding = 'pipeline.embedding-shard', format_version = 2, feature_set, fingerprint, "
    "dataset_root, base_version (the index version it was written on), origin (extract, compaction or "
    "conversion), set_attrs (the set's attributes as JSON); datasets embeddings float32 [n, D] (float16 where the "
    "set's storage attribute says float16; gzip + shuffle), "
    "paths UTF-8 [n] (POSIX, relative to dataset_root), path_key uint8 [n, 16] (BLAKE2b-128 of each path's "
    "UTF-8 bytes), sha256 ASCII [n] (hex sha256 of each file's bytes), file_size and file_mtime_ns int64 [n] "
    "(the file as read); failures/ with paths, path_key, sha256 ('' when unreadable), file_size, file_mtime_ns "
    "and reason [f] for the files that could not be decoded. RULES: a writer MUST hold the lock file "
    "<index>.lock; MUST write each shard whole under a temporary name, then rename it, and never change it "
    "again; commits by writing a new index under a temporary name and renaming it over the old one; MUST NOT "
    "delete a shard before an index that does not list it is in place; before replacing the index MUST keep it as "
    "<index>.versions/<version, 8 digits>.h5 (a hard link or a whole copy) and MUST NOT delete a shard a kept "
    "version lists; MAY remove a kept version superseded longer ago than its retention, except the previous one, "
    "and then the shards no kept version lists. Root attributes committed (ISO 8601), run and changes (JSON) "
    "describe how a version came to be. An unlisted shard whose base_version "
    "equals the index's version and whose origin is extract is pending (a run's results not yet committed): "
    "the next commit lists it. Where a path has rows in several listed or pending shards, the row of the latest "
    "shard wins (listed shards in order, then pending ones by file name); the others are deleted. Any other "
    "unlisted file in the shards folder MAY be deleted by a writer. A reader MUST check that each shard it reads "
    "has the listed size and sha256, and MUST NOT return deleted rows."
)


@dataclass(frozen=True)
class FileState:
    """What a store knows of one file: its content hash and the size and mtime it had when read."""

    sha256: str
    size: int
    mtime_ns: int


def path_keys(paths: Iterable[str]) -> np.ndarray:
    """BLAKE2b-128 of each path's UTF-8 bytes, as ``S16``: how runs match files to rows without reading paths.

    128 bits make an accidental collision negligible (about 1e-23 for 100 million paths).
    """
    keys = bytearray()
    for path in paths:  # appended in place: no list of a million digests on the way
        keys += hashlib.blake2b(path.encode("utf-8"), digest_size=KEY_BYTES).digest()
    return np.frombuffer(bytes(keys), dtype=f"S{KEY_BYTES}")


def keys_from_bytes(raw: np.ndarray) -> np.ndarray:
    """Keys read from an HDF5 ``uint8 [n, 16]`` dataset, as ``S16``."""
    return np.ascontiguousarray(raw, dtype=np.uint8).view(f"S{KEY_BYTES}").reshape(-1)


def keys_to_bytes(keys: np.ndarray) -> np.ndarray:
    """``S16`` keys as ``uint8 [n, 16]``, for HDF5 (numpy drops trailing NUL bytes of ``S`` values it returns)."""
    return np.frombuffer(np.ascontiguousarray(keys, dtype=f"S{KEY_BYTES}").tobytes(), np.uint8).reshape(-1, KEY_BYTES)


def split_codes(splits: Iterable[str]) -> np.ndarray:
    """Split names as uint8 codes into :data:`SPLITS`."""
    code = {name: number for number, name in enumerate(SPLITS)}
    return np.array([code[s] for s in splits], dtype=np.uint8)


STORAGES = ("float32", "float16")  # how a feature set's embeddings are kept; readers return float32 either way


def storage_dtype(attrs: dict) -> np.dtype:
    """The dtype a feature set's embeddings are stored as: its ``storage`` attribute, float32 without one."""
    return np.dtype(str(attrs.get("storage", "float32")))


def shard_rows(dim: int) -> int:
    """Rows of ``dim`` float32 values a full shard holds."""
    return max(1, SHARD_BYTES // (4 * max(dim, 1)))
