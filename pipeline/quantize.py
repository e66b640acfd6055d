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
from pipeline.discover import Dataset, discover
from pipeline.errors import UserError, command, run_cli
from pipeline.files import atomic_path, sha256_file
from pipeline.manifest import INPUT_NAME, OUTPUT_NAME, ModelManifest, model_paths, variant_name

CALIBRATION_IMAGES = 100  # default sample of the user's images that sets the int8 activation ranges
VERIFY_IMAGES = 16  # images beside the calibration sample on which fidelity to fp32 is measured at creation
MIN_COSINE = 0.99  # below this (on the verification images) a variant is kept but flagged loudly
_CALIBRATION_BATCH = 8


def current_variant(models_dir: str | Path, model: str, precision: str) -> ModelManifest | None:
    """The manifest of an existing, intact variant derived from the current fp32 export, else None.

    An existing variant is kept whatever calibration is asked for now (its own is in its manifest), so
    that the embeddings made with it stay comparable; ``pipeline.quantize --force`` makes it again.

    Raises
    ------
    UserError
        If ``model`` has no fp32 export in ``models_dir``.
    """
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


def calibration_paths(dataset: Dataset) -> list[Path]:
    """The images a variant may be calibrated and verified on: the dataset's, outside its test split."""
    usable = [record for record in dataset.records if record.split != "test"]
    if not usable:
        warnings.warn(f"{dataset.root} has only test images; the int8 calibration is drawn from them.", stacklevel=2)
    return [dataset.absolute(record) for record in usable or dataset.records]


def check_calibration_images(count: int) -> None:
    """Refuse a calibration sample size below one."""
    if count < 1:
        raise UserError(f"--calibration-images {count} must be at least 1.")


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
        Image files to draw from, in a seeded random order: for int8 the first ``calibration_images`` that
        decode calibrate and the next VERIFY_IMAGES measure the fidelity to fp32 (the calibration images
        themselves when there are no others); for fp16 VERIFY_IMAGES of them measure it (random pixels
        when none are given).
    calibration_images : int
        Size of the int8 calibration sample.
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
        check_calibration_images(calibration_images)
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


def _draw(source: ModelManifest, paths: Sequence[Path], wanted: int, seed: int) -> Iterator[tuple[np.ndarray, str]]:
    """Decode ``paths`` in a seeded random order, yielding ``(crop, sha256)`` of up to ``wanted`` good ones."""
    found = 0
    for index in np.random.default_rng(seed).permutation(len(paths)):
        if found == wanted:
            return
        decoded = decode_file(paths[index], [source.preprocessing])
        if not decoded.error:
            found += 1
            yield decoded.crops[0], decoded.sha256


def _calibration_crops(
    source: ModelManifest, paths: Sequence[Path], count: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], str, dict]:
    drawn = list(_draw(source, paths, count + VERIFY_IMAGES, seed))
    if not drawn:
        raise UserError(
            "int8 needs images to calibrate on and none could be decoded; give a folder of your images "
            f"(extract's DATA, or --calibration with {command('quantize')})."
        )
    # The first ``count`` calibrate; the rest, when the folder has more, measure fidelity on unseen images.
    crops = [crop for crop, _ in drawn[:count]]
    record = {
        "method": "onnxruntime quantize_static, QDQ, MinMax, per-channel int8 weights, uint8 activations",
        "images": len(crops),
        "seed": seed,
        "sha256": [sha256 for _, sha256 in drawn[:count]],
    }
    verify = [crop for crop, _ in drawn[count:]]
    if verify:
        return crops, verify, "images outside the calibration sample", record
    return crops, crops, "calibration images (the folder has no others)", record


def _verification_crops(source: ModelManifest, paths: Sequence[Path], seed: int) -> tuple[list[np.ndarray], str]:
    crops = [crop for crop, _ in _draw(source, paths, VERIFY_IMAGES, seed)]
    if crops:
        return crops, "images of your folder"
    size = source.input["size"]  # no images given: fidelity on seeded random pixels, which the record says
    return list(np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)), "random-pixel images"


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

    class Reader(_CropReader, CalibrationDataReader):
        pass

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # onnxruntime's quantization logs every step at INFO, on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=target.parent) as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            # U8S8 QDQ per channel measured fastest here (QOperator, U8U8 and reduce_range were slower).
            quantize_static(
                str(prepared), str(target), Reader(crops), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
    finally:
        root.setLevel(level)


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
    calibration = manifest.calibration
    calibrated = f", calibrated on {calibration['images']} images (seed {calibration['seed']})" if calibration else ""
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
    check_calibration_images(args.calibration_images)
    paths = calibration_paths(discover(args.calibration)) if args.calibration else []
    for model in args.model:
        current = None if args.force else current_variant(args.models_dir, model, args.precision)
        if current is not None:
            print(f"{describe(current)} It derives from the current {model}.onnx, so it is kept; --force makes it again.")
            continue
        started = time.perf_counter()
        manifest = make_variant(args.models_dir, model, args.precision, paths, args.calibration_images, args.seed)
        print(f"{describe(manifest)} [{time.perf_counter() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    run_cli(main)
