"""The one-command demo: runs every stage that exists on data that needs no download."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.backbones import BACKBONES
from pipeline.errors import run_cli
from pipeline.export import UNTRAINED_BANNER, describe, export_backbone
from pipeline.weights import imagenet_cache_file


def demo_weights(model: str) -> str:
    """``imagenet`` when the backbone's ImageNet weights are already in the torch hub cache, else ``random``."""
    backbone = BACKBONES[model]
    _, cache_file = imagenet_cache_file(backbone, backbone.default_imagenet_weights)
    return "imagenet" if cache_file.exists() else "random"


def main(argv: Sequence[str] | None = None) -> int:
    """Export both backbones for the demo and say what was made."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where models go (default: models/)")
    parser.add_argument("--image-size", type=int, default=224, help="input crop size in pixels (default: 224)")
    args = parser.parse_args(argv)
    for model in BACKBONES:
        weights = demo_weights(model)
        if weights == "random":
            _, cache_file = imagenet_cache_file(BACKBONES[model], BACKBONES[model].default_imagenet_weights)
            print(UNTRAINED_BANNER.format(model=model), file=sys.stderr)
            print(f"   (no ImageNet weights at {cache_file}; the demo uses seeded random weights)", file=sys.stderr)
        result = export_backbone(model, weights, args.image_size, args.models_dir)
        print(describe(result))
    print("\nNext stages (extract, fit, classify) join this demo as they land; see README.md.")
    return 0


if __name__ == "__main__":
    run_cli(main)
