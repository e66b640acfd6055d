"""``python -m pipeline.quantize --model MODEL --precision int8``: derive precision variants."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UserError, run_cli
from pipeline.extract.decode import calibration_crops
from pipeline.extract.discover import discover
from pipeline.models import ModelRepository
from pipeline.models.quantize import CALIBRATION_IMAGES, VERIFY_IMAGES, check_calibration_images, describe


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.quantize``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.quantize",
        description=(
            "Derive an int8 (calibrated on your images) or fp16 variant of exported backbones, written beside them "
            "as STEM-int8.onnx / STEM-fp16.onnx with a manifest. extract --precision does this by itself when "
            "the variant is missing. An int8 variant whose mean cosine to fp32 is below 0.99 is refused."
        ),
    )
    parser.add_argument("--model", nargs="+", required=True, metavar="MODEL",
                        help="exported model(s): vgg16, resnet50, timm/NAME[.TAG], torchvision/NAME")
    parser.add_argument("--precision", required=True, choices=("fp16", "int8"))
    parser.add_argument("--calibration", help="folder or CSV of your images to calibrate int8 on (as extract's DATA)")
    parser.add_argument(
        "--calibration-images", type=int, default=CALIBRATION_IMAGES,
        help=f"images drawn to calibrate int8 (default: {CALIBRATION_IMAGES}; {VERIFY_IMAGES} more measure fidelity)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument("--force", action="store_true", help="derive again even if an up-to-date variant exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Derive each requested variant; print one line per model."""
    args = build_parser().parse_args(argv)
    if args.precision == "int8" and not args.calibration:
        raise UserError("--precision int8 needs --calibration FOLDER: a sample of your own images sets its ranges.")
    check_calibration_images(args.calibration_images)
    dataset = discover(args.calibration) if args.calibration else None
    repository = ModelRepository(args.models_dir)
    for name in args.model:
        source = repository.load(name, "fp32")
        current = None if args.force else repository.current_variant(source, args.precision)
        if current is not None:
            print(f"{describe(current.manifest)} It derives from the current {source.onnx_path.name}, so it is kept; "
                  "--force makes it again.")
            continue
        started = time.perf_counter()
        crops = calibration_crops(dataset, source.preprocessing, args.seed) if dataset else iter(())
        variant = repository.variant(source, args.precision, crops, args.calibration_images, args.seed, force=True)
        print(f"{describe(variant.manifest)} [{time.perf_counter() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    run_cli(main)
