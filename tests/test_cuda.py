"""The CUDA provider's libraries: loaded from the installed wheels, each checked, the first missing one named."""

from __future__ import annotations

import os
import subprocess
import sys

import onnxruntime
import pytest

from pipeline.models import cuda

needs_cuda_provider = pytest.mark.skipif(cuda.CUDA not in onnxruntime.get_available_providers(),
                                         reason="the CPU-only onnxruntime is installed")
needs_no_driver = pytest.mark.skipif(cuda.check(cuda.DRIVER).loads, reason="an NVIDIA driver is present here")


def run(code: str, preload: bool = True) -> str:
    """``code`` in a fresh process (the libraries load once per process), its stdout."""
    env = {**os.environ, cuda.PRELOAD_SWITCH: "1" if preload else "0"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


@needs_cuda_provider
def test_the_provider_needs_cuda_13_cudnn_9_and_the_driver():
    names = cuda.needed_libraries()
    assert cuda.DRIVER in names and names[-1] == f"libcudnn.so.{cuda.built_for()[1]}"
    assert any(name.startswith("libcublas.so.") for name in names) and any(
        name.startswith("libcudart.so.") for name in names)
    assert not any(name.startswith(("libc.so", "libstdc++", "libm.so")) for name in names)  # system libraries left out
    assert cuda.built_for()[0].isdigit()


@needs_cuda_provider
@needs_no_driver
def test_after_the_preload_only_the_driver_is_missing():
    report = run("from pipeline.models import cuda; "
                 "print([(l.name, l.loads, l.path) for l in cuda.libraries()]); print(cuda.problem())")
    libraries, problem = report.strip().splitlines()
    for name, loads, path in eval(libraries):
        assert loads == (name != cuda.DRIVER), name
        assert not loads or path  # and we can say where it came from
    assert problem.startswith("no NVIDIA driver: libcuda.so.1 does not load")


@needs_cuda_provider
@needs_no_driver
def test_without_the_preload_the_project_libraries_are_named_with_the_fix():
    problem = run("from pipeline.models import cuda; print(cuda.problem())", preload=False)
    if problem.startswith("no NVIDIA driver"):
        pytest.skip("a CUDA toolkit on the loader's path provides the libraries without the preload")
    assert "libcublas.so.13" in problem and "libcudnn.so.9" in problem and "do not load" in problem
    assert "pip install -e '.[gpu]'" in problem and "LD_LIBRARY_PATH" in problem


def test_the_driver_library_is_never_mistaken_for_a_project_one(monkeypatch):
    monkeypatch.setattr(cuda, "libraries", lambda: [cuda.Library("libcublas.so.13", True, "/x"),
                                                    cuda.Library(cuda.DRIVER, False, error="not found")])
    monkeypatch.setattr(cuda.onnxruntime, "get_available_providers", lambda: [cuda.CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(cuda, "check", lambda name: cuda.Library(name, False))
    cuda.problem.cache_clear()
    try:
        assert cuda.problem().startswith("no NVIDIA driver")
        monkeypatch.setattr(cuda.onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
        cuda.problem.cache_clear()
        assert cuda.problem().startswith("this onnxruntime has no CUDA provider")
    finally:
        cuda.problem.cache_clear()
