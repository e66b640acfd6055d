"""Model manifests: round trip, identities, and clear errors for missing or damaged files."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.models.manifest import UNRECORDED_LICENSE, ModelManifest, weights_id

MANIFEST = ModelManifest(
    model="resnet50",
    onnx_file="resnet50.onnx",
    onnx_sha256="ab" * 32,
    weights={"source": "random", "seed": 3, "sha256": "cd" * 32},
    input={"size": 224},
    output={"name": "embedding", "dim": 2048},
    opset=18,
    versions={"torch": "x"},
    created="2026-01-01T00:00:00+00:00",
)


def test_round_trip(tmp_path):
    path = tmp_path / "resnet50.json"
    MANIFEST.save(path)
    assert ModelManifest.load(path) == MANIFEST
    assert MANIFEST.untrained and MANIFEST.weights_id == "random:seed=3"


def test_weights_identities():
    assert weights_id({"source": "imagenet", "name": "IMAGENET1K_V2"}) == "imagenet:IMAGENET1K_V2"
    assert weights_id({"source": "pretrained", "name": "convnext_atto.d2_in1k"}) == "pretrained:convnext_atto.d2_in1k"
    assert weights_id({"source": "file", "sha256": "ef" * 32}) == "file:" + "ef" * 32


def test_missing_and_damaged_manifests_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="export the model first"):
        ModelManifest.load(tmp_path / "vgg16.json")
    (tmp_path / "vgg16.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a model manifest"):
        ModelManifest.load(tmp_path / "vgg16.json")
    (tmp_path / "vgg16.json").write_text('{"model": "vgg16"}')
    with pytest.raises(UserError, match="is not a model manifest"):
        ModelManifest.load(tmp_path / "vgg16.json")


def test_names_and_licence_of_other_families():
    manifest = ModelManifest(**{**MANIFEST.__dict__, "model": "timm/convnext_atto.d2_in1k", "precision": "int8",
                                "weights": {"source": "pretrained", "name": "convnext_atto.d2_in1k",
                                            "license": "apache-2.0"}})
    assert manifest.name == "timm-convnext_atto-d2_in1k-int8" and manifest.license == "apache-2.0"
    assert MANIFEST.name == "resnet50" and MANIFEST.license == UNRECORDED_LICENSE  # written before licences were


def test_a_manifest_without_resize_mode_resizes_the_shorter_side():
    manifest = ModelManifest(**{**MANIFEST.__dict__, "input": {
        "size": 224, "resize_size": 256, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}})
    assert manifest.preprocessing.resize_mode == "shorter"
