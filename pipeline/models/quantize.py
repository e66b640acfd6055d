"""Precision variants: an fp16 or int8 file derived from an fp32 export (int8 calibrated on the user's images),
its fidelity to fp32 measured when it is made and recorded in its manifest."""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from pipeline.errors import UserError, command
from pipeline.files import atomic_path, sha256_file
from pipeline.models.manifest import INPUT_NAME, OUTPUT_NAME, ModelManifest
from pipeline.models.session import ExportedModel

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 100  # default sample of the user's images that sets the int8 activation ranges
VERIFY_IMAGES = 16  # images beside the calibration sample on which fidelity to fp32 is measured at creation
MIN_MEAN_COSINE = 0.99  # an int8 variant whose mean cosine to fp32 is below this is refused; fp16 is flagged
METHOD = "onnxruntime quantize_static, QDQ, MinMax, per-channel int8 weights, uint8 activations"
# The operators int8 quantizes, tried in turn until one reaches MIN_MEAN_COSINE: every operator onnxruntime can
# quantize (fastest: 8.0 vs 9.8 ms per image for ResNet50, 25 vs 32 for ConvNeXt-T on this CPU), then only those
# with weights, leaving the activations of normalisation, softmax and GELU in float, where transformers' outliers live.
OPERATOR_SETS = {"every operator": None, "weight operators only": ["Conv", "MatMul", "Gemm"]}
_CALIBRATION_BATCH = 8  # images per calibration batch at 224 px; fewer at larger sizes (see calibration_batch)


def check_calibration_images(count: int) -> None:
    """Refuse a calibration sample size below one."""
    if count < 1:
        raise UserError(f"--calibration-images {count} must be at least 1.")


def make_variant(
    source: ExportedModel,
    precision: str,
    calibration: Iterable[tuple[np.ndarray, str]],
    onnx_path: Path,
    manifest_path: Path,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
) -> ModelManifest:
    """Write the ``precision`` variant of ``source`` to ``onnx_path`` and its manifest to ``manifest_path``.

    Parameters
    ----------
    source : ExportedModel
        The fp32 export.
    precision : {"fp16", "int8"}
        fp16: every float tensor converted to half precision (inputs and outputs unchanged), for GPUs.
        int8: onnxruntime static quantization, QDQ format, per-channel int8 weights and uint8 activations
        whose ranges are calibrated (min/max) on the user's images.
    calibration : iterable of (numpy.ndarray, str)
        The user's images as ``source``'s uint8 crops with their files' sha256, in a seeded random order: for
        int8 the first ``calibration_images`` calibrate and the next VERIFY_IMAGES measure the fidelity to
        fp32 (the calibration images themselves when there are no others); for fp16 VERIFY_IMAGES of them
        measure it (random pixels when there are none).
    onnx_path, manifest_path : Path
        Where the variant goes.
    calibration_images : int
        Size of the int8 calibration sample.
    seed : int
        The seed of the draw, recorded.

    Returns
    -------
    ModelManifest
        The variant's manifest: ``precision``, ``derived_from`` (the fp32 file's sha256), ``calibration``
        (method, and the sha256 of every calibration image) and ``verification`` against fp32.

    Raises
    ------
    UserError
        No decodable calibration image, or an int8 variant whose mean cosine to fp32 is below MIN_MEAN_COSINE
        (nothing is kept then).
    """
    if precision not in ("fp16", "int8"):
        raise UserError(f"--precision {precision}: variants are fp16 or int8 (fp32 is the export itself).")
    if precision == "int8":
        check_calibration_images(calibration_images)
        calibrate, verify, verified_on, record = _calibration_crops(calibration, calibration_images, seed)
    else:
        calibrate, record = [], {}
        verify, verified_on = _verification_crops(source, calibration, seed)
    with atomic_path(onnx_path) as tmp:
        if precision == "int8":
            verification = _best_int8(source, tmp, calibrate, verify, record)
        else:
            _convert_fp16(source.onnx_path, tmp)
            verification = _fidelity(source.onnx_path, tmp, verify)
        verification["on"] = verified_on
        if precision == "int8" and verification["mean_cosine"] < MIN_MEAN_COSINE:
            raise UserError(
                f"{source.manifest.model}'s int8 variant reaches only a mean cosine of "
                f"{verification['mean_cosine']:.4f} to fp32 on {verification['images']} {verified_on} (at least "
                f"{MIN_MEAN_COSINE} is needed), so it is not kept; use --precision fp32 for this model."
            )
        manifest_path.unlink(missing_ok=True)  # as in export: no manifest claims a file until it is complete
    manifest = replace(
        source.manifest,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        precision=precision,
        derived_from={"onnx_file": source.manifest.onnx_file, "onnx_sha256": source.fingerprint, "precision": "fp32"},
        calibration=record,
        versions={**source.manifest.versions, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        verification=verification,
    )
    manifest.save(manifest_path)
    if verification["min_cosine"] < MIN_MEAN_COSINE:
        logger.warning(
            f"{onnx_path}: {precision} embeddings reach only cosine {verification['min_cosine']:.4f} to fp32 on "
            f"{verification['images']} images (mean {verification['mean_cosine']:.4f}); prefer fp32 for this model, "
            "or calibrate on more images."
        )
    return manifest


def _calibration_crops(
    calibration: Iterable[tuple[np.ndarray, str]], count: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], str, dict]:
    drawn = list(itertools.islice(calibration, count + VERIFY_IMAGES))
    if not drawn:
        raise UserError(
            "int8 needs images to calibrate on and none could be decoded; give a folder of your images "
            f"(extract's DATA, or --calibration with {command('quantize')})."
        )
    # The first ``count`` calibrate; the rest, when the folder has more, measure fidelity on unseen images.
    crops = [crop for crop, _ in drawn[:count]]
    record = {
        "method": METHOD,
        "images": len(crops),
        "seed": seed,
        "sha256": [sha256 for _, sha256 in drawn[:count]],
    }
    verify = [crop for crop, _ in drawn[count:]]
    if verify:
        return crops, verify, "images outside the calibration sample", record
    return crops, crops, "calibration images (the folder has no others)", record


def _verification_crops(
    source: ExportedModel, calibration: Iterable[tuple[np.ndarray, str]], seed: int
) -> tuple[list[np.ndarray], str]:
    crops = [crop for crop, _ in itertools.islice(calibration, VERIFY_IMAGES)]
    if crops:
        return crops, "images of your folder"
    size = source.preprocessing.crop_size  # no images given: fidelity on seeded random pixels, which the record says
    return list(np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)), "random-pixel images"


def calibration_batch(crop_size: int) -> int:
    """Images per calibration batch: every activation of a batch is held while its ranges are taken, so the batch
    shrinks with the crop's area (8 at 224 px, 1 at DINOv2's 518, whose 100-image calibration held 24 GB at once)."""
    return max(1, round(_CALIBRATION_BATCH * (224 / crop_size) ** 2))


class _CropReader:
    """onnxruntime's CalibrationDataReader protocol over a list of uint8 crops, a batch at a time, with the
    ``__len__`` and ``set_range`` its strided calibration (``CalibStridedMinMax``) reads batch by batch."""

    def __init__(self, crops: Sequence[np.ndarray]) -> None:
        size = calibration_batch(crops[0].shape[0])
        self._batches = [np.stack(crops[i : i + size]) for i in range(0, len(crops), size)]
        self._next: Iterator = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict | None:
        batch = next(self._next, None)
        return None if batch is None else {INPUT_NAME: batch}


def _best_int8(source: ExportedModel, target: Path, calibrate: Sequence[np.ndarray], verify: Sequence[np.ndarray],
               record: dict) -> dict:
    """Quantize with each of OPERATOR_SETS in turn until one keeps a mean cosine to fp32 of MIN_MEAN_COSINE; the
    best is written to ``target`` and named in ``record["operators"]``. Returns its fidelity."""
    best: tuple[Path, dict, str] | None = None
    with tempfile.TemporaryDirectory(prefix="int8-", dir=target.parent) as work:
        for number, (operators, types) in enumerate(OPERATOR_SETS.items()):
            candidate = Path(work) / f"{number}.onnx"
            _quantize_int8(source.onnx_path, candidate, calibrate, types)
            fidelity = _fidelity(source.onnx_path, candidate, verify)
            if best is None or fidelity["mean_cosine"] > best[1]["mean_cosine"]:
                best = (candidate, fidelity, operators)
            if fidelity["mean_cosine"] >= MIN_MEAN_COSINE:
                break
        candidate, fidelity, record["operators"] = best
        shutil.copyfile(candidate, target)
    return dict(fidelity)


def _quantize_int8(source: Path, target: Path, crops: Sequence[np.ndarray], op_types: list[str] | None) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_CropReader, CalibrationDataReader):
        pass

    root = logging.getLogger()
    level = root.level
    # onnxruntime's quantization logs every step at INFO on the root logger, and per-channel axes it cannot use
    # (a LayerNorm's 1-d weights) as warnings: noise for whoever runs extract.
    root.setLevel(max(level, logging.ERROR))
    try:
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=target.parent) as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            # U8S8 QDQ per channel measured fastest here (QOperator, U8U8 and reduce_range were slower).
            quantize_static(
                str(prepared), str(target), Reader(crops), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                # MinMax ranges taken batch by batch and merged (the min of minima, the max of maxima: the same
                # ranges) instead of every batch's activations kept until the end
                extra_options={"CalibStridedMinMax": 1},
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
        f"min {check['min_cosine']:.5f}, mean {check['mean_cosine']:.5f} on {check['images']} "
        f"{check.get('on', 'images')}."
    )


