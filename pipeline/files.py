"""File helpers shared by the stages: content hashes, writes that never leave a half-written file, run locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

from pipeline.errors import UserError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed.

    Readers therefore see either the old file or the complete new one, never a partial write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600 files; a replaced file gets the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as written:  # on disk before the rename, so a power cut leaves old or new
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def exclusive(lock_path: Path, busy: str) -> Iterator[None]:
    """Hold the lock file ``lock_path`` without waiting; when another process holds it, ``busy`` is the error.

    Raises
    ------
    UserError
        With ``busy``, when another run holds the lock.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(busy) from None
    try:
        yield
    finally:
        lock.release()
