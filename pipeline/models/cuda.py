"""What onnxruntime's CUDA provider needs: its libraries loaded from the installed wheels, and what is missing."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import re
import struct
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import onnxruntime

CUDA = "CUDAExecutionProvider"
PRELOAD_SWITCH = "PIPELINE_CUDA_PRELOAD"  # "0" leaves the libraries to the system's loader (for tests and diagnosis)
DRIVER = "libcuda.so.1"
_SYSTEM = ("libc.", "libm.", "libdl.", "librt.", "libpthread.", "libstdc++.", "libgcc_s.", "ld-linux")


@dataclass(frozen=True)
class Library:
    """One shared library the CUDA provider needs, and whether this process can load it.

    ``path`` is where it was loaded from (empty when it did not load, or cannot be told); ``error`` is the
    loader's message when it did not.
    """

    name: str
    loads: bool
    path: str = ""
    error: str = ""


@functools.cache
def load_libraries() -> bool:
    """Load the CUDA and cuDNN libraries onnxruntime-gpu needs from the pip wheels in this environment, once.

    The dynamic loader does not search ``site-packages/nvidia/...``, where the CUDA wheels put them: without
    this, a CUDA session fails unless a matching CUDA toolkit is on the loader's path (or torch was
    imported first). Set ``PIPELINE_CUDA_PRELOAD=0`` to skip it. Returns whether it ran.
    """
    if os.environ.get(PRELOAD_SWITCH) == "0" or CUDA not in onnxruntime.get_available_providers():
        return False
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:  # onnxruntime older than 1.21: nothing to do but rely on the loader's path
        return False
    with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it cannot load: the doctor says it better
        try:
            preload(directory="")  # the nvidia wheels first, then the loader's own path
        except (OSError, RuntimeError):
            return False
    return True


def built_for() -> tuple[str, str]:
    """The CUDA and cuDNN major versions this onnxruntime was built for, e.g. ``("13", "9")`` (``""`` when unknown)."""
    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda = str(getattr(info, "cuda_version", "") or "").split(".")[0]
    except ImportError:
        cuda = ""
    cudnn = ""
    for requirement in _requirements():
        found = re.match(r"nvidia-cudnn-cu\d+\s*~=\s*(\d+)", requirement)
        if found:
            cudnn = found[1]
    return cuda, cudnn


def provider_library() -> Path:
    """onnxruntime's CUDA provider, ``libonnxruntime_providers_cuda.so``."""
    return Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"


def needed_libraries() -> list[str]:
    """The CUDA libraries the provider links against (its ELF ``DT_NEEDED`` entries, system ones left out),
    then the cuDNN library it opens at run time."""
    path = provider_library()
    names = [n for n in _elf_needed(path) if not n.startswith(_SYSTEM)] if path.exists() else []
    cudnn = built_for()[1] or "9"
    return names + [f"libcudnn.so.{cudnn}"]


def check(name: str) -> Library:
    """Whether ``name`` loads in this process, and from where."""
    try:
        ctypes.CDLL(name)
    except OSError as error:
        return Library(name, False, error=str(error))
    return Library(name, True, _loaded_from(name))


def libraries() -> list[Library]:
    """Every library the CUDA provider needs, checked (after :func:`load_libraries`)."""
    load_libraries()
    return [check(name) for name in needed_libraries()]


def driver_version() -> str:
    """The NVIDIA kernel driver's version line, or ``""`` without one."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return ""


@functools.cache
def problem() -> str:
    """Why onnxruntime cannot use CUDA here, in one sentence with the fix; ``""`` when nothing is missing.

    The first thing missing is named: the CUDA provider itself, then the CUDA and cuDNN libraries this
    project installs, then the NVIDIA driver.
    """
    if CUDA not in onnxruntime.get_available_providers():
        return ("this onnxruntime has no CUDA provider (the CPU-only package is installed); install onnxruntime-gpu "
                "(pip install -e '.[gpu]', on Linux or Windows x86_64)")
    found = libraries()
    missing = [lib.name for lib in found if not lib.loads and lib.name != DRIVER]
    if missing:
        cuda, cudnn = built_for()
        return (f"{', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not load: install the CUDA "
                f"{cuda or '?'} and cuDNN {cudnn or '?'} libraries onnxruntime-gpu {onnxruntime.__version__} was built "
                f"for (pip install -e '.[gpu]'), or put a CUDA {cuda or ''} toolkit's lib folder on LD_LIBRARY_PATH")
    if not check(DRIVER).loads:
        return ("no NVIDIA driver: libcuda.so.1 does not load, so there is no GPU to run on here; install the NVIDIA "
                "driver on a machine with a GPU, or use --device cpu")
    return ""


def _loaded_from(name: str) -> str:
    """The file a loaded library was mapped from, as ``/proc/self/maps`` shows (Linux)."""
    stem = name.split(".so")[0] + ".so"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith(stem):
            return path
    return ""


def _requirements() -> list[str]:
    for package in ("onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.requires(package) or []
    return []


def _elf_needed(path: Path) -> list[str]:
    """The ``DT_NEEDED`` names of a 64-bit little-endian ELF shared library."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, _ = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + n * entry_size) for n in range(count)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strings = sections[link][4]
        for start in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, start)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strings + value)
                needed.append(data[strings + value : end].decode())
    return needed
