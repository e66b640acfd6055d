"""Stage 0b: derive an fp16 or int8 variant of an exported fp32 backbone (int8 calibrated on the user's images)."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from pipeline.backbones import BACKBONES
from pipeline.decode import decode_file
from pipeline.discover import discover
from pipeline.errors import UserError, run_cli
from pipeline.files import atomic_path, sha256_file
from pipeline.manifest import INPUT_NAME, OUTPUT_NAME, ModelManifest, model_paths, variant_name

CALIBRATION_IMAGES = 100  # default sample of the user's images that sets the int8 activation ranges
VERIFY_IMAGES = 16  # images beside the calibration sample on which fidelity to fp32 is measured at creation
MIN_COSINE = 0.99  # below this (on the verification images) a variant is kept but flagged loudly
_CALIBRATION_BATCH = 8


def current_variant(models_dir: str | Path, model: str, precision: str) -> ModelManifest | None:
    """The manifest of an existing, intact variant derived from the current fp32 export, else None."""
    source = ModelManifest.load(model_paths(models_dir, model)[1])
    onnx_path, manifest_path = model_paths(models_dir, variant_name(model, precision))
    if not (onnx_path.exists() and manifest_path.exists()):
        return None
    try:
        manifest = ModelManifest.load(manifest_path)
    except UserError:
        return None
    intact = sha256_file(onnx_path) == manifest.onnx_sha256
    return manifest if intact and manifest.derived_from.get("onnx_sha256") == source.onnx_sha256 else None


def calibration_sample(paths: Sequence[Path], count: int, seed: int = 0) -> list[Path]:
    """``count`` + VERIFY_IMAGES paths drawn at random (seeded) from ``paths``, in their listed order."""
    if count < 1:
        raise UserError(f"--calibration-images {count} must be at least 1.")
    wanted = min(len(paths), count + VERIFY_IMAGES)
    chosen = np.random.default_rng(seed).choice(len(paths), size=wanted, replace=False)
    return [paths[i] for i in sorted(chosen)]


def make_variant(
    models_dir: str | Path,
    model: str,
    precision: str,
    calibration: Sequence[Path] = (),
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
) -> ModelManifest:
    """Write ``models_dir/<model>-<precision>.onnx`` and its manifest from the fp32 export.

    Parameters
    ----------
    models_dir : path-like
        Folder of the fp32 export; the variant is written beside it.
    model : str
        Backbone name.
    precision : {"fp16", "int8"}
        fp16: every float tensor converted to half precision (inputs and outputs unchanged), for GPUs.
        int8: onnxruntime static quantization, QDQ format, per-channel int8 weights and uint8 activations
        whose ranges are calibrated (min/max) on images drawn from ``calibration``.
    calibration : sequence of Path
        Image files to draw the calibration sample from (int8 only).
    calibration_images : int
        Size of that sample; a further VERIFY_IMAGES images measure the fidelity to fp32.
    seed : int
        Seed of the draw.

    Returns
    -------
    ModelManifest
        The variant's manifest: ``precision``, ``derived_from`` (the fp32 file's sha256), ``calibration``
        (method, and the sha256 of every calibration image) and ``verification`` against fp32.

    Raises
    ------
    UserError
        No fp32 export, or no decodable calibration image.
    """
    if precision not in ("fp16", "int8"):
        raise UserError(f"--precision {precision}: variants are fp16 or int8 (fp32 is the export itself).")
    source_onnx, source_json = model_paths(models_dir, model)
    source = ModelManifest.load(source_json)
    if not source_onnx.exists() or sha256_file(source_onnx) != source.onnx_sha256:
        raise UserError(f"{source_onnx} does not match {source_json}; export {model} again before deriving {precision}.")
    onnx_path, manifest_path = model_paths(models_dir, variant_name(model, precision))
    if precision == "int8":
        calibrate, verify, verified_on, record = _calibration_crops(source, calibration, calibration_images, seed)
    else:
        calibrate, record = [], {}
        verify, verified_on = _verification_crops(source, calibration, seed)
    with atomic_path(onnx_path) as tmp:
        if precision == "int8":
            _quantize_int8(source_onnx, tmp, calibrate)
        else:
            _convert_fp16(source_onnx, tmp)
        verification = {**_fidelity(source_onnx, tmp, verify), "on": verified_on}
        manifest_path.unlink(missing_ok=True)  # as in export: no manifest claims a file until it is complete
    manifest = replace(
        source,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        precision=precision,
        derived_from={"onnx_file": source.onnx_file, "onnx_sha256": source.onnx_sha256, "precision": "fp32"},
        calibration=record,
        versions={**source.versions, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        verification=verification,
    )
    manifest.save(manifest_path)
    if verification["min_cosine"] < MIN_COSINE:
        warnings.warn(
            f"{onnx_path}: {precision} embeddings reach only cosine {verification['min_cosine']:.4f} to fp32 on "
            f"{verification['images']} images; prefer fp32 for this model, or calibrate on more images.",
            stacklevel=2,
        )
    return manifest


def _decoded_crops(source: ModelManifest, paths: Sequence[Path]) -> tuple[list[np.ndarray], list[str]]:
    crops, hashes = [], []
    for path in paths:
        decoded = decode_file(path, [source.preprocessing])
        if not decoded.error:
            crops.append(decoded.crops[0])
            hashes.append(decoded.sha256)
    return crops, hashes


def _calibration_crops(
    source: ModelManifest, paths: Sequence[Path], count: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], str, dict]:
    sample = calibration_sample(list(paths), count, seed) if paths else []
    crops, hashes = _decoded_crops(source, sample)
    if not crops:
        raise UserError(
            "int8 needs images to calibrate on and none could be decoded; give a folder of your images "
            "(extract's DATA, or --calibration with python -m pipeline.quantize)."
        )
    # The first ``count`` calibrate; the others (when the folder has more) measure fidelity on unseen images.
    verify = crops[count:] or crops[:count]
    verified_on = "images outside the calibration sample" if crops[count:] else "the calibration images"
    record = {
        "method": "onnxruntime quantize_static, QDQ, MinMax, per-channel int8 weights, uint8 activations",
        "images": len(crops[:count]),
        "seed": seed,
        "sha256": hashes[:count],
    }
    return crops[:count], verify, verified_on, record


def _verification_crops(source: ModelManifest, paths: Sequence[Path], seed: int) -> tuple[list[np.ndarray], str]:
    if paths:
        crops, _ = _decoded_crops(source, calibration_sample(list(paths), 1, seed)[:VERIFY_IMAGES])
        if crops:
            return crops, "your images"
    size = source.input["size"]  # no images given: fidelity on seeded random pixels, which the record says
    return list(np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)), "random pixels"


class _CropReader:
    """onnxruntime's CalibrationDataReader protocol over a list of uint8 crops."""

    def __init__(self, crops: Sequence[np.ndarray]) -> None:
        self._batches: Iterator = iter(
            {INPUT_NAME: np.stack(crops[i : i + _CALIBRATION_BATCH])} for i in range(0, len(crops), _CALIBRATION_BATCH)
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _quantize_int8(source: Path, target: Path, crops: Sequence[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_CropReader, CalibrationDataReader), {})(crops)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # quantize logs at INFO
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=target.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # U8S8 QDQ per channel measured fastest here (QOperator, U8U8 and reduce_range were slower).
        quantize_static(
            str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )


def _convert_fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about every value it clamps to the fp16 range
        converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(converted, str(target))


def _fidelity(source: Path, variant: Path, crops: Sequence[np.ndarray]) -> dict[str, float | int]:
    images = np.stack(crops)
    want = _run(source, images)
    got = _run(variant, images).astype(np.float32)
    cosine = np.sum(got * want, 1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    return {"images": len(images), "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + _CALIBRATION_BATCH]})[0]
        for i in range(0, len(images), _CALIBRATION_BATCH)
    ])


def describe(manifest: ModelManifest) -> str:
    """One line saying what a variant is and how close it is to fp32."""
    check = manifest.verification
    calibrated = f", calibrated on {manifest.calibration['images']} images" if manifest.calibration else ""
    return (
        f"{manifest.name}: {manifest.onnx_file}{calibrated}; cosine to fp32 "
        f"min {check['min_cosine']:.5f}, mean {check['mean_cosine']:.5f} on {check['images']} {check.get('on', 'images')}."
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.quantize``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.quantize",
        description=(
            "Derive an int8 (calibrated on your images) or fp16 variant of exported backbones, written beside them "
            "as MODEL-int8.onnx / MODEL-fp16.onnx with a manifest. extract --precision does this by itself when "
            "the variant is missing."
        ),
    )
    parser.add_argument("--model", nargs="+", required=True, choices=sorted(BACKBONES), metavar="MODEL")
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
    paths = []
    if args.calibration:
        dataset = discover(args.calibration)
        paths = [dataset.absolute(record) for record in dataset.records]
    for model in args.model:
        current = None if args.force else current_variant(args.models_dir, model, args.precision)
        if current is not None:
            print(f"{describe(current)} Up to date; nothing to do.")
            continue
        started = time.perf_counter()
        manifest = make_variant(args.models_dir, model, args.precision, paths, args.calibration_images, args.seed)
        print(f"{describe(manifest)} [{time.perf_counter() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    run_cli(main)
