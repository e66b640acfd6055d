"""The torch side of a model: its library builds it headless with the requested weights, and its own eval
transform becomes its input recipe. Needs the export extra (torch, torchvision, timm, huggingface_hub).

torchvision: ``torchvision.models.get_model(name)`` with its last classification layer (the last ``Linear``)
replaced by an identity, so the embedding is that layer's input; the recipe is its weights' ``transforms()``.
timm: ``timm.create_model(name, num_classes=0)``, whose output is the pooled pre-logits features; the recipe is
``resolve_data_config(model=...)`` as ``create_transform`` reads it. vgg16 and resnet50 keep their registry
entries' cut points (fc7 after its ReLU, the global average pool), which are the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.models.preprocessing import Preprocessing, timm_recipe
from pipeline.models.registry import EXPORT_EXTRA, TIMM, TORCHVISION_LICENSE, ModelName, closest_hint
from pipeline.models.weights import (
    FILE,
    IMAGENET,
    PRETRAINED,
    RANDOM,
    WeightsRequest,
    check_state_dict,
    hub_weights_file,
    read_state_dict,
    state_dict_sha256,
    torchvision_state_dict,
)

MIN_IMAGE_SIZE = 32
RANDOM_LICENSE = "none: untrained random weights"
FILE_LICENSE = "unknown: weights from a file of yours"


@dataclass
class Network:
    """A headless network in eval mode and what the manifest says of it.

    Attributes
    ----------
    module : torch.nn.Module
        Maps normalised NCHW float images to the embedding.
    preprocessing : Preprocessing
        The input recipe, from the library's own eval transform at the chosen size.
    layer : str
        Where the embedding is taken, in the library's terms.
    weights : dict
        Provenance of the weights: ``source`` and, as they apply, ``name``, ``url``, ``hub_id``, ``file``,
        ``seed``, ``sha256``, and ``license``.
    recipe : dict
        The library's own description of the transform (timm's data config, torchvision's weights name).
    """

    module: nn.Module
    preprocessing: Preprocessing
    layer: str
    weights: dict[str, Any]
    recipe: dict[str, Any]


def build_network(model: ModelName, request: WeightsRequest, image_size: int | None = None) -> Network:
    """Build ``model`` headless with ``request``'s weights, and its input recipe at ``image_size`` (default: its own).

    Raises
    ------
    UserError
        An unknown model or one that is not an image classifier, a library that is not installed, weights that
        cannot be had or do not fit, an image size the model cannot take.
    """
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {image_size} is too small; {model.name} needs at least {MIN_IMAGE_SIZE} pixels.")
    if model.family == TIMM:
        return _timm_network(model, request, image_size)
    return _torchvision_network(model, request, image_size)


def _torchvision_network(model: ModelName, request: WeightsRequest, image_size: int | None) -> Network:
    import torch
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)
    if model.architecture not in classifiers:
        if model.architecture in torchvision.models.list_models():
            raise UserError(f"{model.name} is not an image classifier (a detection, segmentation, video or "
                            "optical-flow model of torchvision); name a model of torchvision.models.")
        raise UserError(f"torchvision has no classification model {model.architecture!r}{closest_hint(model.name)}.")
    weights_enum = torchvision.models.get_model_weights(model.architecture)
    try:
        weights = weights_enum[request.name] if request.name else weights_enum.DEFAULT
    except KeyError:
        raise UserError(f"{model.name} has no {request.name} weights; choose one of: "
                        f"{', '.join(w.name for w in weights_enum)}.") from None
    if request.source == RANDOM:
        torch.manual_seed(request.seed)  # torchvision initialises the layers from the global generator
    network = torchvision.models.get_model(model.architecture, weights=None)
    backbone = model.default_backbone
    head = backbone.head if backbone else _last_linear(network, model)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    if request.source == RANDOM:
        provenance = {"source": RANDOM, "seed": request.seed, "sha256": state_dict_sha256(network.state_dict()),
                      "license": RANDOM_LICENSE}
    elif request.source == FILE:
        given = read_state_dict(request.path, model)
        check_state_dict(given, network.state_dict(), head_keys, request.path, model)
        network.load_state_dict({k: v for k, v in given.items() if k not in head_keys}, strict=False)
        provenance = {"source": FILE, "file": str(request.path), "sha256": sha256_file(request.path),
                      "license": FILE_LICENSE}
    else:
        state_dict, where = torchvision_state_dict(weights, model)
        network.load_state_dict(state_dict)
        provenance = {"source": request.source, "name": weights.name, **where,
                      "license": weights.meta.get("license", TORCHVISION_LICENSE)}
    layer = backbone.embedding_layer if backbone else f"input of {head} (the classification layer, removed)"
    network.set_submodule(head, nn.Identity())
    native = getattr(network, "image_size", None)  # torchvision's ViTs take one size only
    if image_size and native and image_size != native:
        raise UserError(f"{model.name} takes {native} px images only; leave --image-size out, or use a timm ViT, which "
                        "resamples its position embeddings.")
    if backbone:  # untrained or user weights use the default ImageNet weights' recipe, as they always have
        weights = weights_enum[request.name if request.source == IMAGENET else backbone.default_imagenet_weights]
        preprocessing = backbone.preprocessing(weights.name, image_size)
    else:
        preprocessing = _torchvision_recipe(weights.transforms(), image_size)
    recipe = {"library": "torchvision", "transforms_of": f"{type(weights).__name__}.{weights.name}"}
    return Network(network.eval(), preprocessing, layer, provenance, recipe)


def _last_linear(network: nn.Module, model: ModelName) -> str:
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError(f"{model.name} has no final Linear layer to remove (its classifier is a convolution); choose "
                        "another model.")
    return linears[-1]


def _torchvision_recipe(transform: Any, image_size: int | None) -> Preprocessing:
    base = Preprocessing(
        resize_size=transform.resize_size[0], crop_size=transform.crop_size[0], mean=tuple(transform.mean),
        std=tuple(transform.std), interpolation=transform.interpolation.value,
    )
    return base if image_size in (None, base.crop_size) else base.scaled_to(image_size)


def _timm_network(model: ModelName, request: WeightsRequest, image_size: int | None) -> Network:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise UserError(f"{model.name} needs timm to be exported: install the export extra ({EXPORT_EXTRA}), or "
                        "copy its export into the models folder.") from None
    if not timm.is_model(model.architecture):
        raise UserError(f"timm has no model {model.architecture!r}{closest_hint(model.name)}.")
    full_name = f"{model.architecture}.{model.tag}" if model.tag else model.architecture
    try:
        config = timm.models.get_pretrained_cfg(full_name)
    except RuntimeError:  # an unknown tag
        config = None
    if model.tag and config is None:
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(model.architecture) if "." in name]
        raise UserError(f"timm has no pretrained tag {model.tag!r} for {model.architecture}; its tags: "
                        f"{', '.join(tags) or 'none'}.")
    options: dict[str, Any] = {"num_classes": 0}
    if image_size and config is not None and config.input_size[-1] != image_size:
        options["img_size"] = image_size  # ViTs resample their position embeddings; CNNs take any size
    state_dict, provenance = _timm_weights(model, config, request)
    network = _create_timm(timm, full_name, options, state_dict, request, model)
    if request.source == RANDOM:
        provenance = {**provenance, "sha256": state_dict_sha256(network.state_dict()), "license": RANDOM_LICENSE}
    data_config = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=network)
    try:
        preprocessing = timm_recipe(data_config)
    except UserError as error:
        raise UserError(f"{model.name}: {error}") from None
    recipe = {"library": "timm", "data_config": {k: _listed(v) for k, v in data_config.items()}}
    return Network(network.eval(), preprocessing, "pooled pre-logits (timm num_classes=0)", provenance, recipe)


def _timm_weights(model: ModelName, config: Any, request: WeightsRequest) -> tuple[Mapping | None, dict[str, Any]]:
    """The state dict to load (None for random weights, seeded here) and its provenance."""
    if request.source == RANDOM:
        import torch

        torch.manual_seed(request.seed)  # timm initialises the layers from the global generator
        return None, {"source": RANDOM, "seed": request.seed}
    if request.source == FILE:
        return read_state_dict(request.path, model), {
            "source": FILE, "file": str(request.path), "sha256": sha256_file(request.path), "license": FILE_LICENSE}
    if config is None or not config.hf_hub_id:
        raise UserError(f"timm lists no Hugging Face repository for {model.name}'s pretrained weights; pass "
                        "--weights PATH to a state dict, or name a tag that has one (transfer models).")
    repository = config.hf_hub_id.split("@")[0]
    preferred = config.hf_hub_filename or "pytorch_model.bin"
    # as timm's own loader: the safetensors file first (model.safetensors beside pytorch_model.bin)
    safe = "model.safetensors" if preferred == "pytorch_model.bin" else preferred[:-4] + ".safetensors"
    candidates = [safe, preferred] if preferred.endswith(".bin") else [preferred]
    path = hub_weights_file(repository, candidates, model)
    return read_state_dict(path, model), {
        "source": PRETRAINED, "name": f"{model.architecture}.{config.tag}",
        "hub_id": repository, "file": path.name, "sha256": sha256_file(path),
        "license": config.license or "not stated by timm",
    }


def _create_timm(timm: Any, full_name: str, options: dict, state_dict: Mapping | None, request: WeightsRequest,
                 model: ModelName) -> nn.Module:
    """``timm.create_model``, loading ``state_dict`` through timm's own checkpoint filter (position embeddings
    resampled, original checkpoints' keys remapped, the classifier dropped) when there are weights to load."""
    try:
        if state_dict is None:
            return timm.create_model(full_name, pretrained=False, **options)
        return timm.create_model(full_name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)},
                                 **options)
    except TypeError as error:
        if "img_size" in options and "img_size" in str(error):  # a model without a fixed input size
            return _create_timm(timm, full_name, {"num_classes": 0}, state_dict, request, model)
        raise
    except (RuntimeError, KeyError, ValueError) as error:
        if state_dict is None:
            raise
        source = request.path or model.name
        expected = timm.create_model(full_name, pretrained=False, **options).state_dict()
        check_state_dict(state_dict, expected, set(), source, model)  # names the keys when they are what differs
        raise UserError(f"the weights of {source} do not load into timm's {model.architecture} "
                        f"({str(error).splitlines()[0][:200]}).") from None


def _listed(value: Any) -> Any:
    """A tuple of timm's data config (mean, std, input size) as the list JSON reads back."""
    return list(value) if isinstance(value, tuple) else value
