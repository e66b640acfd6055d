"""``python -m pipeline.doctor``: can onnxruntime run on CUDA here, and if not, what to do first."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from contextlib import suppress
from importlib import metadata

import numpy as np
import onnxruntime
from onnx import TensorProto, helper

from pipeline.models import cuda

EXIT_NO_CUDA = 1


def tiny_session_provider() -> tuple[str, str]:
    """The provider a real session on a one-node graph gets when CUDA is asked for first, and the error if any."""
    cuda.load_libraries()
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any runtime reads 8
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failing CUDA provider logs its own errors: the report says it once
    providers = [p for p in (cuda.CUDA, "CPUExecutionProvider") if p in onnxruntime.get_available_providers()]
    onnxruntime.set_default_logger_severity(4)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=providers)
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception as error:  # whatever the provider raises, the report shows it
        return "", str(error).splitlines()[0]
    finally:
        onnxruntime.set_default_logger_severity(2)
    return session.get_providers()[0], ""


def torch_cuda() -> str:
    """The CUDA major version of the installed torch's CUDA wheels (``""`` without torch or CUDA wheels)."""
    with suppress(metadata.PackageNotFoundError):
        for requirement in metadata.requires("torch") or []:
            found = re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*==\s*(\d+)", requirement)
            if found:
                return found[1]
    return ""


def report() -> tuple[str, bool]:
    """The diagnosis in lines, and whether CUDA works."""
    built_cuda, built_cudnn = cuda.built_for()
    package = "onnxruntime-gpu" if cuda.CUDA in onnxruntime.get_available_providers() else "onnxruntime (CPU only)"
    lines = [
        f"onnxruntime {onnxruntime.__version__} ({package}), built for CUDA {built_cuda or '-'} and cuDNN "
        f"{built_cudnn or '-'}; providers: {', '.join(onnxruntime.get_available_providers())}",
    ]
    preloading = "off (PIPELINE_CUDA_PRELOAD=0)" if os.environ.get(cuda.PRELOAD_SWITCH) == "0" else "on"
    lines.append(f"libraries the CUDA provider needs (loaded from the installed nvidia wheels first: {preloading}):")
    for library in cuda.libraries():
        where = library.path or ("loads" if library.loads else library.error)
        role = " (the NVIDIA driver's)" if library.name == cuda.DRIVER else ""
        lines.append(f"  {'ok     ' if library.loads else 'MISSING'} {library.name}{role}: {where}")
    lines.append(f"NVIDIA driver: {cuda.driver_version() or 'none (/proc/driver/nvidia/version is absent)'}")
    torch = torch_cuda()
    if torch:
        agree = ("agrees" if torch == built_cuda
                 else "does NOT agree: install torch and onnxruntime-gpu for one CUDA major")
        lines.append(f"torch's CUDA wheels: CUDA {torch}, which {agree} with onnxruntime's CUDA {built_cuda}")
    provider, error = tiny_session_provider()
    lines.append(f"a session on a one-node graph runs on: {provider or 'nothing'}" + (f" ({error})" if error else ""))
    works = provider == cuda.CUDA
    problem = cuda.problem()
    if works:
        lines.append("CUDA works: extract, classify and the bench will use it (--device auto or cuda).")
    else:
        lines.append(f"fix: {problem or 'onnxruntime did not place the graph on CUDA: ' + (error or 'see its log')}.")
    return "\n".join(lines), works


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.doctor``."""
    return argparse.ArgumentParser(
        prog="python -m pipeline.doctor",
        description=(
            "Say whether onnxruntime can run on CUDA here: its version and the CUDA and cuDNN it was built for, "
            "each library its CUDA provider needs and where it loads from, the NVIDIA driver, the provider a real "
            "session gets, and one sentence with the fix for the first thing missing."
        ),
        epilog=f"Exit status: 0 when a session runs on CUDA; {EXIT_NO_CUDA} when it cannot (the last line says why).",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the diagnosis."""
    build_parser().parse_args(argv)
    text, works = report()
    print(text)
    return 0 if works else EXIT_NO_CUDA
