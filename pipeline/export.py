"""``python -m pipeline.export --model MODEL``: export backbones without their heads to ONNX."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import run_cli
from pipeline.models import ModelRepository, parse_model_name
from pipeline.models.registry import DEFAULT_BACKBONES
from pipeline.models.repository import UNTRAINED_BANNER, describe_export
from pipeline.models.weights import PRETRAINED, weights_per_model


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=(
            "Export image classifiers without their classification head to ONNX. The model takes a batch of uint8 "
            "RGB crops [N, H, W, 3] and returns the penultimate embedding; normalisation is inside the graph. "
            "Writes STEM.onnx and STEM.json (the manifest: weights provenance and licence, input recipe, hashes) to "
            "--out, STEM being the name without / and . (timm/convnext_atto.d2_in1k: timm-convnext_atto-d2_in1k)."
        ),
        epilog="transfer models lists the curated models; docs/backbones.md says how to choose.",
    )
    parser.add_argument(
        "--model", nargs="+", required=True, metavar="MODEL",
        help=f"model(s) to export: {', '.join(DEFAULT_BACKBONES)} (vgg16: fc7 after ReLU, 4096-d; resnet50: global "
        "average pool, 2048-d), timm/NAME[.TAG] (any model timm creates; the embedding is its pooled pre-logits, "
        "num_classes=0) or torchvision/NAME (any classification model of torchvision.models; its last Linear layer "
        "removed)",
    )
    parser.add_argument(
        "--weights", nargs="+", default=None, metavar="[MODEL=]WEIGHTS",
        help="pretrained: the library's weights (timm: from its Hugging Face repository, HF_HOME honoured; "
        "torchvision: downloaded once into the torch hub cache, TORCH_HOME honoured); for vgg16 and resnet50 also "
        "imagenet (IMAGENET1K_V1) or IMAGENET1K_V2 (resnet50), for torchvision models any name of their weights enum; "
        "random (seeded, untrained: for tests and dry runs only); or PATH to a state dict of the model (.safetensors, "
        ".pth, .pt or .bin, keys as the library names them); for every model, or MODEL=WEIGHTS for one "
        "(--weights resnet50=PATH vgg16=imagenet). Default: pretrained",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --weights random (default: 0)")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="side of the square input crop in pixels; the resize before it keeps the model's ratio (default: the "
        "model's own, 224 for vgg16 and resnet50 with resize 256; a timm ViT resamples its position embeddings)",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models/)")
    parser.add_argument("--force", action="store_true", help="export even if an identical export exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export each requested model; print one line per model."""
    args = build_parser().parse_args(argv)
    names = [parse_model_name(name).name for name in args.model]  # unknown names fail before anything is built
    weights = weights_per_model(args.weights, names)
    repository = ModelRepository(args.out)
    for name in names:
        started = time.perf_counter()
        result = repository.export(name, weights[name] or PRETRAINED, args.image_size, args.seed, args.force)
        if result.exported and result.manifest.untrained:
            print(UNTRAINED_BANNER.format(model=name), file=sys.stderr)
        suffix = f" [{time.perf_counter() - started:.1f} s]" if result.exported else ""
        print(describe_export(result) + suffix)
    return 0


if __name__ == "__main__":
    run_cli(main)
