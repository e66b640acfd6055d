"""The ``transfer`` command: every stage behind one entry point (``transfer extract DATA`` runs extract)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from pipeline.errors import EXIT_USER_ERROR, run_cli

STAGES = {
    "models": ("pipeline.models.__main__", "list the curated backbones: size, licence, published and measured figures"),
    "export": ("pipeline.export", "export backbones (vgg16, resnet50, timm/..., torchvision/...) to ONNX"),
    "quantize": ("pipeline.quantize", "make an int8 or fp16 variant of an export"),
    "extract": ("pipeline.extract.run", "embed a folder or CSV of images into the store"),
    "fit": ("pipeline.fit.run", "fit and compare classifiers on the store"),
    "classify": ("pipeline.serve.classify", "predict a class for every image of a folder"),
    "report": ("pipeline.report.build", "make a fit's report.html again, without fitting"),
    "duplicates": ("pipeline.report.duplicates", "find groups of the same or nearly the same image in a store"),
    "neighbors": ("pipeline.serve.neighbors", "the stored images most like each query image"),
    "deploy": ("pipeline.serve.deploy", "merge a fitted classifier behind its backbone into one ONNX file"),
    "bundles": ("pipeline.fit.upgrade", "rewrite the joblib bundles of an earlier version as safe skops files"),
    "store": ("pipeline.store.__main__", "look into, check, convert or compact a store"),
    "doctor": ("pipeline.models.doctor", "say whether onnxruntime can run on CUDA here"),
    "demo": ("pipeline.demo", "run every stage on built-in data"),
}


def usage() -> str:
    lines = ["usage: transfer STAGE [options]   (transfer STAGE --help for the stage's options)", "", "stages:"]
    lines += [f"  {name:10} {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``transfer STAGE ...``: the stage's own ``main`` with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else EXIT_USER_ERROR)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: transfer has no stage {stage!r}; choose one of: {', '.join(STAGES)}.", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    module = importlib.import_module(STAGES[stage][0])
    run_cli(module.main, rest)


if __name__ == "__main__":
    main()
