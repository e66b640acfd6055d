"""The registry: names of every family, their stems and feature sets, the default backbones, the curated table."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.errors import UserError
from pipeline.models import CURATED, DEFAULT_BACKBONES, ModelName, Preprocessing, feature_set_name, parse_model_name
from pipeline.models.registry import feature_set_order, parse_feature_set


@pytest.mark.parametrize("name", DEFAULT_BACKBONES)
def test_head_and_embedding_dim_match_torchvision(name):
    backbone = DEFAULT_BACKBONES[name]
    model = getattr(torchvision.models, name)(weights=None)
    head = model.get_submodule(backbone.head)
    assert head.in_features == backbone.embedding_dim
    assert head.out_features == 1000
    assert set(backbone.head_keys) <= set(model.state_dict())
    model.get_submodule(backbone.embedding_layer)  # raises if the layer does not exist


@pytest.mark.parametrize(
    "name,weights", [(name, weights) for name, b in DEFAULT_BACKBONES.items() for weights in b.imagenet_weights]
)
def test_preprocessing_matches_torchvision_weights(name, weights):
    backbone = DEFAULT_BACKBONES[name]
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
    assert all(b.default_imagenet_weights == "IMAGENET1K_V1" for b in DEFAULT_BACKBONES.values())


def test_preprocessing_scales_with_crop_size():
    base = DEFAULT_BACKBONES["resnet50"].preprocessing()
    assert base == Preprocessing(256, 224)
    assert DEFAULT_BACKBONES["resnet50"].preprocessing(crop_size=112) == Preprocessing(128, 112)
    assert DEFAULT_BACKBONES["resnet50"].preprocessing("IMAGENET1K_V2", 448).resize_size == 464


@pytest.mark.parametrize("text,family,architecture,tag,name,stem", [
    ("vgg16", "torchvision", "vgg16", "", "vgg16", "vgg16"),
    ("torchvision/resnet50", "torchvision", "resnet50", "", "resnet50", "resnet50"),
    ("torchvision/convnext_tiny", "torchvision", "convnext_tiny", "",
     "torchvision/convnext_tiny", "torchvision-convnext_tiny"),
    ("timm/vit_small_patch14_dinov2.lvd142m", "timm", "vit_small_patch14_dinov2", "lvd142m",
     "timm/vit_small_patch14_dinov2.lvd142m", "timm-vit_small_patch14_dinov2-lvd142m"),
    ("timm/convnext_atto", "timm", "convnext_atto", "", "timm/convnext_atto", "timm-convnext_atto"),
    ("timm-convnext_atto-d2_in1k", "timm", "convnext_atto", "d2_in1k", "timm/convnext_atto.d2_in1k",
     "timm-convnext_atto-d2_in1k"),
])
def test_names_parse_into_safe_stems_and_back(text, family, architecture, tag, name, stem):
    model = parse_model_name(text)
    assert model == ModelName(family, architecture, tag)
    assert model.name == name and model.stem == stem
    assert "/" not in model.stem and "." not in model.stem
    assert parse_model_name(model.stem) == parse_model_name(model.name) == model


def test_feature_sets_carry_the_precision():
    assert feature_set_name("resnet50") == "resnet50"
    assert feature_set_name("resnet50-int8") == "resnet50-int8"
    assert feature_set_name("timm/convnext_atto.d2_in1k-fp16") == "timm-convnext_atto-d2_in1k-fp16"
    assert parse_feature_set("timm-convnext_atto-d2_in1k-int8") == (
        ModelName("timm", "convnext_atto", "d2_in1k"), "int8")
    assert parse_feature_set("torchvision-efficientnet_b0") == (ModelName("torchvision", "efficientnet_b0"), "fp32")
    names = ["timm-b", "resnet50-int8", "vgg16", "resnet50", "pixels", "timm-a"]
    assert sorted(names, key=feature_set_order) == ["vgg16", "resnet50", "resnet50-int8", "timm-a", "timm-b", "pixels"]


@pytest.mark.parametrize("bad", ["alexnet", "resnt50", "timm/", "timm/a.b.c", "torchvision/x.y", "hf-hub:timm/x", ""])
def test_unknown_names_are_one_sentence_with_the_closest(bad):
    with pytest.raises(UserError, match="unknown model") as raised:
        parse_model_name(bad)
    assert "\n" not in str(raised.value)


def test_close_names_come_from_both_libraries():
    with pytest.raises(UserError, match=r"did you mean .*resnet50"):
        parse_model_name("resnt50")
    with pytest.raises(UserError,
                       match=r"timm/convnext_tiny.*torchvision/convnext_tiny|torchvision/convnext_tiny.*timm"):
        parse_model_name("convnext_tiny")


@pytest.mark.parametrize("entry", CURATED, ids=lambda entry: entry.name)
def test_curated_models_are_what_their_library_builds(entry):
    """Dimension, input size, parameters and licence of the table are the library's (nothing downloaded)."""
    model = parse_model_name(entry.name)
    if model.family == "timm":
        import timm

        network = timm.create_model(f"{model.architecture}.{model.tag}", pretrained=False, num_classes=0)
        assert network.pretrained_cfg["input_size"][-1] == entry.input_size
        assert network.pretrained_cfg["license"] == entry.license
        dim = network.num_features
    else:
        network = torchvision.models.get_model(model.architecture, weights=None)
        assert torchvision.models.get_model_weights(model.architecture).DEFAULT.transforms().crop_size == [
            entry.input_size]
        head = [name for name, module in network.named_modules() if isinstance(module, torch.nn.Linear)][-1]
        dim = network.get_submodule(head).in_features
        network.set_submodule(head, torch.nn.Identity())
    assert dim == entry.embedding_dim
    assert sum(p.numel() for p in network.parameters()) / 1e6 == pytest.approx(entry.parameters, abs=0.01)
    assert entry.summary and entry.probes and all(probe.source and 0 < probe.accuracy < 100 for probe in entry.probes)
