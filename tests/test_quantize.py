"""Precision variants: int8 calibrated on the user's images and fp16, their manifests, fidelity and staleness."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from pipeline.errors import UserError
from pipeline.extract.decode import calibration_crops
from pipeline.extract.discover import discover
from pipeline.models import ModelManifest, ModelRepository
from pipeline.models.quantize import VERIFY_IMAGES
from tests.images import photo, save


def make_variant(models_dir, model, precision, folder=None, calibration_images=100):
    """The variant, made from the images of ``folder`` as extract and the quantize command make it."""
    repository = ModelRepository(models_dir)
    source = repository.load(model)
    crops = calibration_crops(discover(folder), source.preprocessing) if folder else iter(())
    return repository.variant(source, precision, crops, calibration_images, force=True).manifest


def current_variant(models_dir, model, precision):
    repository = ModelRepository(models_dir)
    current = repository.current_variant(repository.load(model), precision)
    return current.manifest if current else None


def open_backbone(models_dir, name, device):
    return ModelRepository(models_dir).load(name).open(device)


@pytest.fixture
def models_dir(tmp_path, exported):
    """A private copy of the 64 px resnet50 export, so variants written beside it stay in this test."""
    source = exported("resnet50", 64).onnx_path
    target = tmp_path / "models"
    target.mkdir()
    for path in ModelRepository(source.parent).paths("resnet50"):
        shutil.copy(path, target / path.name)
    return target


def images(folder, count, seed=0):
    return [save(folder / f"{i:03d}.jpg", photo(56 + i % 7, 48 + i % 5, seed=seed + i), quality=92)
            for i in range(count)]


def cosine(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_variant_records_its_calibration_and_stays_close_to_fp32(models_dir, tmp_path):
    files = images(tmp_path / "calibration", 40)
    manifest = make_variant(models_dir, "resnet50", "int8", tmp_path / "calibration", calibration_images=12)
    source = ModelManifest.load(models_dir / "resnet50.json")
    onnx_path = models_dir / "resnet50-int8.onnx"
    assert manifest.name == "resnet50-int8" and manifest.onnx_file == onnx_path.name
    assert manifest.precision == "int8" and manifest.derived_from["onnx_sha256"] == source.onnx_sha256
    assert manifest.source_sha256 == source.onnx_sha256 != manifest.onnx_sha256
    assert manifest.weights == source.weights and manifest.input == source.input
    # 12 + VERIFY_IMAGES drawn; the first 12 calibrate, the rest measure fidelity. The hashes are the files'.
    all_hashes = {hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    assert manifest.calibration["images"] == 12 == len(set(manifest.calibration["sha256"]))
    assert set(manifest.calibration["sha256"]) <= all_hashes
    assert manifest.verification["images"] == VERIFY_IMAGES and manifest.verification["min_cosine"] >= 0.99
    assert manifest.verification["on"] == "images outside the calibration sample"
    assert ModelManifest.load(models_dir / "resnet50-int8.json") == manifest
    assert current_variant(models_dir, "resnet50", "int8") == manifest
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # On images it never saw, through the same runtime path extract uses.
    crops = np.stack([photo(64, 64, seed=500 + i) for i in range(6)])
    fp32 = open_backbone(models_dir, "resnet50", "cpu").embed(crops)
    int8 = open_backbone(models_dir, "resnet50-int8", "cpu").embed(crops)
    assert int8.shape == fp32.shape and int8.dtype == np.float32
    assert cosine(int8, fp32).min() >= 0.99


def test_a_variant_of_another_fp32_export_is_stale(models_dir, tmp_path):
    images(tmp_path / "c", 6)
    make_variant(models_dir, "resnet50", "int8", tmp_path / "c", calibration_images=4)
    manifest_path = models_dir / "resnet50-int8.json"
    record = json.loads(manifest_path.read_text())
    record["derived_from"]["onnx_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(record))
    assert current_variant(models_dir, "resnet50", "int8") is None
    (models_dir / "resnet50-int8.onnx").write_bytes(b"changed")
    with pytest.raises(UserError,
                       match="does not match its manifest.*transfer quantize --model resnet50 --precision int8"):
        open_backbone(models_dir, "resnet50-int8", "cpu")


def test_fp16_variant_converts_every_weight_and_keeps_uint8_in_float32_out(models_dir, tmp_path):
    images(tmp_path / "c", 4)
    manifest = make_variant(models_dir, "resnet50", "fp16", tmp_path / "c")
    graph = onnx.load(str(models_dir / "resnet50-fp16.onnx")).graph
    float_types = {init.data_type for init in graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert float_types == {onnx.TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert (manifest.precision == "fp16" and manifest.calibration == {}
            and manifest.verification["on"] == "images of your folder")
    assert manifest.verification["min_cosine"] >= 0.999


def test_int8_without_images_and_missing_variants_are_user_errors(models_dir, tmp_path):
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "junk.jpg").write_text("not an image")
    with pytest.raises(UserError, match="none could be decoded"):
        make_variant(models_dir, "resnet50", "int8", tmp_path / "junk")
    with pytest.raises(UserError, match="no int8 variant of resnet50.*--precision int8"):
        open_backbone(models_dir, "resnet50-int8", "cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.quantize", "--model", "resnet50", "--precision", "int8",
         "--models-dir", str(models_dir)], capture_output=True, text=True,
    )
    assert result.returncode == 2 and "needs --calibration" in result.stderr and "Traceback" not in result.stderr


def test_cli_makes_the_variant_once(models_dir, tmp_path):
    images(tmp_path / "data" / "cats", 5)
    images(tmp_path / "data" / "dogs", 5, seed=50)
    command = [sys.executable, "-m", "pipeline.quantize", "--model", "resnet50", "--precision", "int8",
               "--calibration", str(tmp_path / "data"), "--calibration-images", "6", "--models-dir", str(models_dir)]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "resnet50-int8: resnet50-int8.onnx, calibrated on 6 images (seed 0); cosine to fp32 min" in first.stdout
    assert "on 4 images outside the calibration sample" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0 and "so it is kept; --force makes it again" in second.stdout
