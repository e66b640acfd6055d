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
import numpy as np

from pipeline.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 20


def available_cores() -> int:
    """CPU cores this process may run on (affinity and container limits included where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plain(value: Any) -> Any:
    """A numpy scalar (as HDF5 attributes read back) as the Python value JSON takes; any other value as it is."""
    return value.item() if isinstance(value, np.generic) else value


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

    On POSIX systems the lock is ``flock`` on the file, which is removed again before it is released, so no
    empty lock file stays behind (a run that opens it at that moment sees it gone and takes a new one). On
    other systems filelock's lock, whose file stays.

    Raises
    ------
    UserError
        With ``busy``, when another run holds the lock.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # Windows
        lock = filelock.FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise UserError(busy) from None
        try:
            yield
        finally:
            lock.release()
        return
    descriptor = _flock(lock_path, busy)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: nobody can take this inode's lock after us
        os.close(descriptor)


def _flock(lock_path: Path, busy: str) -> int:
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise UserError(busy) from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        held = os.fstat(descriptor)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return descriptor
        os.close(descriptor)  # the holder removed it as we opened it: take the new one


CLASSIFIERS_ROOT = Path("models/classifiers")


def classifiers_dir(cache: str | os.PathLike) -> Path:
    """Where fit writes, and classify looks for, the classifiers fitted on the store ``cache``:
    ``models/classifiers/<store name>/``, so that fitting one store never replaces another's classifiers."""
    return CLASSIFIERS_ROOT / Path(cache).stem
