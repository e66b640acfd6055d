"""The registry agrees with torchvision: builders, heads, embedding sizes and preprocessing."""

from __future__ import annotations

import pytest
import torchvision

from pipeline.backbones import BACKBONES, Preprocessing, get_backbone
from pipeline.errors import UserError


@pytest.mark.parametrize("name", BACKBONES)
def test_head_and_embedding_dim_match_torchvision(name):
    backbone = BACKBONES[name]
    model = getattr(torchvision.models, name)(weights=None)
    head = model.get_submodule(backbone.head)
    assert head.in_features == backbone.embedding_dim
    assert head.out_features == 1000
    assert set(backbone.head_keys) <= set(model.state_dict())
    model.get_submodule(backbone.embedding_layer)  # raises if the layer does not exist


@pytest.mark.parametrize(
    "name,weights", [(name, weights) for name, b in BACKBONES.items() for weights in b.imagenet_weights]
)
def test_preprocessing_matches_torchvision_weights(name, weights):
    backbone = BACKBONES[name]
    enum = getattr(torchvision.models, backbone.weights_enum)[weights]
    reference = enum.transforms()
    ours = backbone.preprocessing(weights)
    assert [ours.crop_size] == reference.crop_size
    assert [ours.resize_size] == reference.resize_size
    assert list(ours.mean) == reference.mean
    assert list(ours.std) == reference.std
    assert ours.interpolation == reference.interpolation.value
    assert enum.meta["num_params"] > 0  # the weights exist in this torchvision


def test_default_imagenet_weights_are_v1():
    assert all(b.default_imagenet_weights == "IMAGENET1K_V1" for b in BACKBONES.values())


def test_preprocessing_scales_with_crop_size():
    base = BACKBONES["resnet50"].preprocessing()
    assert base == Preprocessing(256, 224)
    assert BACKBONES["resnet50"].preprocessing(crop_size=112) == Preprocessing(128, 112)
    assert BACKBONES["resnet50"].preprocessing("IMAGENET1K_V2", 448).resize_size == 464


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UserError, match="vgg16, resnet50"):
        get_backbone("alexnet")
