"""``python -m pipeline.doctor`` and ``--device cuda`` on a machine without a GPU: one sentence with the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.models import cuda
from tests.test_cuda import needs_cuda_provider, needs_no_driver


def doctor(preload: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, cuda.PRELOAD_SWITCH: "1" if preload else "0"}
    return subprocess.run([sys.executable, "-m", "pipeline.doctor"], capture_output=True, text=True, env=env,
                          timeout=120)


@needs_cuda_provider
@needs_no_driver
def test_the_doctor_reports_every_library_found_and_only_the_driver_missing():
    result = doctor()
    assert result.returncode == 1 and "Traceback" not in result.stderr and not result.stderr.strip()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"onnxruntime {cuda.onnxruntime.__version__} (onnxruntime-gpu), built for CUDA 13")
    missing = [line for line in lines if line.startswith("  MISSING")]
    assert len(missing) == 1 and "libcuda.so.1 (the NVIDIA driver's)" in missing[0]
    assert sum(line.startswith("  ok") for line in lines) == len(cuda.needed_libraries()) - 1
    assert "a session on a one-node graph runs on: CPUExecutionProvider" in result.stdout
    assert lines[-1].startswith("fix: no NVIDIA driver: libcuda.so.1 does not load")


@needs_cuda_provider
@needs_no_driver
def test_without_the_preload_the_doctor_names_the_missing_libraries():
    result = doctor(preload=False)
    if "libcublas.so.13" not in result.stdout.split("fix:")[-1]:
        pytest.skip("a CUDA toolkit on the loader's path provides the libraries without the preload")
    assert (result.returncode == 1 and "MISSING libcublas.so.13" in result.stdout
            and "MISSING libcudnn.so.9" in result.stdout)
    assert "pip install -e '.[gpu]'" in result.stdout.splitlines()[-1]


@needs_no_driver
def test_device_cuda_without_a_gpu_is_one_sentence_naming_the_driver(tmp_path, small_models, seeded_weights):
    from tests.images import class_folders

    data = class_folders(tmp_path / "pets", {"cat": 1})
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.extract", str(data), "--models", "resnet50", "--models-dir", str(small_models),
         "--weights", seeded_weights, "--cache", str(tmp_path / "e.h5"), "--device", "cuda"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --device cuda was asked for, but ") and (
        "NVIDIA driver" in line or "CUDA provider" in line)
