"""The model registry: how models are named, the two default backbones, and the curated table of today's ones.

A model is named as its library names it: ``timm/<name>[.<tag>]`` (any model timm creates, e.g.
``timm/vit_small_patch14_dinov2.lvd142m``) or ``torchvision/<name>`` (any classification model of
``torchvision.models``), and the two defaults by their short names, ``vgg16`` and ``resnet50``
(``torchvision/vgg16`` means ``vgg16``). Names are parsed here without importing either library, so that
extract, fit and classify run on exported models with neither installed; what a name builds is resolved at
export time (:mod:`pipeline.models.networks`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

TIMM, TORCHVISION = "timm", "torchvision"
FAMILIES = (TIMM, TORCHVISION)
PRECISIONS = ("fp32", "fp16", "int8")
EXPORT_EXTRA = "pip install -e '.[export]'"
TORCHVISION_LICENSE = "not stated by torchvision (weights follow their training data's terms: ImageNet-1k)"
_PART = r"[A-Za-z0-9_]+"


@dataclass(frozen=True)
class Backbone:
    """One of the two default torchvision backbones, with the names and cut points they have always had.

    Attributes
    ----------
    name : str
        Registry key, also the torchvision builder (``torchvision.models.<name>``).
    weights_enum : str
        The torchvision weights enum (``torchvision.models.<weights_enum>``).
    imagenet_weights : dict
        Selectable ImageNet weights, the first being the default, mapped to each one's resize size at 224 px.
    head : str
        Dotted path of the classification layer that export replaces by an identity.
    embedding_layer : str
        The layer whose output becomes the embedding once the head is gone.
    embedding_dim : int
        Length of the embedding vector.
    """

    name: str
    weights_enum: str
    imagenet_weights: dict[str, int]
    head: str
    embedding_layer: str
    embedding_dim: int
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def head_keys(self) -> tuple[str, str]:
        """State-dict keys of the classification layer, which the exported model does without."""
        return (f"{self.head}.weight", f"{self.head}.bias")

    @property
    def default_imagenet_weights(self) -> str:
        """The torchvision weights name that ``--weights imagenet`` means."""
        return next(iter(self.imagenet_weights))

    def preprocessing(self, weights_name: str | None = None, crop_size: int | None = None) -> Preprocessing:
        """Return the input recipe for ImageNet weights ``weights_name`` (default weights if None) at ``crop_size``.

        Untrained or user-supplied weights use the default weights' recipe.
        """
        resize_size = self.imagenet_weights.get(weights_name or "",
                                                self.imagenet_weights[self.default_imagenet_weights])
        base = Preprocessing(resize_size, self.crop_size, self.mean, self.std, self.interpolation)
        return base if crop_size in (None, self.crop_size) else base.scaled_to(crop_size)


DEFAULT_BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(
        name="vgg16",
        weights_enum="VGG16_Weights",
        imagenet_weights={"IMAGENET1K_V1": 256},
        head="classifier.6",
        embedding_layer="classifier.4",  # fc7 after its ReLU; the dropout between is inert in eval mode
        embedding_dim=4096,
    ),
    "resnet50": Backbone(
        name="resnet50",
        weights_enum="ResNet50_Weights",
        imagenet_weights={"IMAGENET1K_V1": 256, "IMAGENET1K_V2": 232},
        head="fc",
        embedding_layer="avgpool",  # global average pool, flattened: the input of fc
        embedding_dim=2048,
    ),
}
"""The backbones extract uses when ``--models`` is not given, named without a family."""


@dataclass(frozen=True)
class ModelName:
    """A model as it is named, parsed but not resolved (no library is imported).

    Attributes
    ----------
    family : {"timm", "torchvision"}
    architecture : str
        timm's model name without its tag, or the ``torchvision.models`` builder.
    tag : str
        timm's pretrained tag (``lvd142m``); ``""`` for the architecture's default.
    """

    family: str
    architecture: str
    tag: str = ""

    @property
    def name(self) -> str:
        """The name as users write it: ``vgg16``, ``torchvision/convnext_tiny``, ``timm/convnext_atto.d2_in1k``."""
        if self.default_backbone:
            return self.architecture
        return f"{self.family}/{self.architecture}" + (f".{self.tag}" if self.tag else "")

    @property
    def stem(self) -> str:
        """The name without ``/`` and ``.``: the ONNX file's stem, the store's feature set and the bundles' prefix
        (``timm-convnext_atto-d2_in1k``). Parts of timm and torchvision names never hold ``-``, so it reads back."""
        if self.default_backbone:
            return self.architecture
        return f"{self.family}-{self.architecture}" + (f"-{self.tag}" if self.tag else "")

    @property
    def default_backbone(self) -> Backbone | None:
        """vgg16 or resnet50's registry entry, None for any other model."""
        return DEFAULT_BACKBONES.get(self.architecture) if self.family == TORCHVISION else None

    def feature_set(self, precision: str = "fp32") -> str:
        """The store's feature-set name (and file stem) at ``precision``: ``resnet50``, ``resnet50-int8``."""
        return self.stem if precision == "fp32" else f"{self.stem}-{precision}"


def parse_model_name(text: str) -> ModelName:
    """Read a model name: ``vgg16``, ``resnet50``, ``timm/<name>[.<tag>]``, ``torchvision/<name>``, or the stem
    of one of them (``timm-convnext_atto-d2_in1k``, as the store and the file names write it).

    Raises
    ------
    UserError
        For a name of no family, with the closest names there are.
    """
    text = text.strip()
    if text in DEFAULT_BACKBONES:
        return ModelName(TORCHVISION, text)
    for family in FAMILIES:
        for separator, tag_separator in (("/", "."), ("-", "-")):
            rest = text.removeprefix(family + separator)
            if rest == text:
                continue
            architecture, _, tag = rest.partition(tag_separator)
            if re.fullmatch(_PART, architecture) and (not tag or re.fullmatch(_PART, tag)):
                if family == TORCHVISION and tag:
                    break  # torchvision names have no tag: --weights chooses among a model's weights
                return ModelName(family, architecture, tag)
    raise UserError(f"unknown model {text!r}{closest_hint(text)}; name one as timm/NAME[.TAG] or torchvision/NAME "
                    "(transfer models lists the curated ones).")


def parse_feature_set(name: str) -> tuple[ModelName, str]:
    """Split a feature-set name (or a model name with a precision suffix) into ``(model, precision)``.

    Raises
    ------
    UserError
        For a name that is no model's.
    """
    stem, _, suffix = name.rpartition("-")
    if suffix in PRECISIONS[1:] and stem:
        return parse_model_name(stem), suffix
    return parse_model_name(name), "fp32"


def feature_set_name(text: str) -> str:
    """The feature-set name a model name or a feature-set name stands for (``timm/x.y-int8`` is ``timm-x-y-int8``).

    Raises
    ------
    UserError
        For a name that is no model's.
    """
    model, precision = parse_feature_set(text)
    return model.feature_set(precision)


def feature_set_order(name: str) -> tuple:
    """Sort key of feature-set names: vgg16's, then resnet50's (each by precision), then the others' by name."""
    try:
        model, precision = parse_feature_set(name)
    except UserError:
        return (2, name, 0)
    if model.default_backbone:
        return (0, list(DEFAULT_BACKBONES).index(model.architecture), PRECISIONS.index(precision))
    return (1, model.stem, PRECISIONS.index(precision))


def closest_hint(text: str) -> str:
    """``" (did you mean A or B?)"`` with the closest model names: the curated ones, then timm's and
    torchvision's own lists where those libraries are installed; ``""`` when nothing is close."""
    names = [*DEFAULT_BACKBONES, *(model.name for model in CURATED), *_library_names()]
    bare = text.split("/", 1)[-1]
    close = [name for name in names if name.split("/", 1)[-1].split(".")[0] == bare]  # the same model, in a family
    for candidate in (text, bare):
        close += [n for n in difflib.get_close_matches(candidate, names, n=3, cutoff=0.6) if n not in close]
    close = list(dict.fromkeys(close))
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _library_names() -> list[str]:
    names = []
    try:
        import timm

        names += [f"{TIMM}/{name}" for name in timm.list_models()]
    except ImportError:
        pass
    try:
        import torchvision

        names += [f"{TORCHVISION}/{name}" for name in torchvision.models.list_models(module=torchvision.models)]
    except ImportError:
        pass
    return names


@dataclass(frozen=True)
class Probe:
    """A published accuracy on the model's frozen features: a linear probe, a few-shot probe, or (for
    supervised ImageNet models, as a reference) the model's own ImageNet classifier."""

    dataset: str
    accuracy: float
    protocol: str
    source: str


@dataclass(frozen=True)
class CuratedModel:
    """A model of the curated table: what it is, its size and licence, and what is published about its features.

    ``embedding_dim``, ``input_size``, ``parameters`` and ``license`` are checked against the library in the tests.
    """

    name: str
    summary: str
    embedding_dim: int
    input_size: int
    parameters: float  # millions, of the headless network
    license: str
    probes: tuple[Probe, ...] = ()


_BYOL = "BYOL, arXiv 2006.07733, Table 3 (supervised ResNet-50)"
_DINOV2 = "DINOv2, arXiv 2304.07193"
_CLIP = "CLIP, arXiv 2103.00020, Table 10"
LINEAR, FEW_SHOT, OWN_HEAD = "linear probe", "10-shot", "own ImageNet head"
CURATED: tuple[CuratedModel, ...] = (
    CuratedModel("timm/vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14, self-supervised on LVD-142M (2023)",
                 384, 518, 22.06, "apache-2.0", (
                     Probe("ImageNet-1k", 81.1, LINEAR, f"{_DINOV2}, Table 4 (at 224 px)"),
                     Probe("Food-101", 89.1, LINEAR, f"{_DINOV2} v2, Table 8"),
                     Probe("CIFAR-10", 97.7, LINEAR, f"{_DINOV2} v2, Table 8"),
                     Probe("CIFAR-100", 87.5, LINEAR, f"{_DINOV2} v2, Table 8"),
                     Probe("Oxford Pets", 95.1, LINEAR, f"{_DINOV2} v2, Table 8"))),
    CuratedModel("timm/convnext_tiny.dinov3_lvd1689m", "DINOv3 ConvNeXt-T, distilled from DINOv3 ViT-7B on LVD-1689M "
                 "(2025)", 768, 224, 27.82, "dinov3-license", (
                     Probe("ImageNet-ReaL", 86.6, LINEAR, "facebookresearch/dinov3 MODEL_CARD.md (at 256 px)"),)),
    CuratedModel("timm/vit_base_patch16_siglip_224.v2_webli", "SigLIP 2 ViT-B/16 image tower, language-image "
                 "pretrained on WebLI (2025)", 768, 224, 92.88, "apache-2.0", (
                     Probe("ImageNet-1k", 72.1, FEW_SHOT, "SigLIP 2, arXiv 2502.14786, Table 1"),)),
    CuratedModel("timm/vit_base_patch16_clip_224.openai", "CLIP ViT-B/16 image tower, OpenAI (2021); the embedding "
                 "is before CLIP's projection", 768, 224, 85.80, "apache-2.0", (
                     Probe("ImageNet-1k", 80.2, LINEAR, _CLIP), Probe("Food-101", 92.8, LINEAR, _CLIP),
                     Probe("CIFAR-10", 96.2, LINEAR, _CLIP), Probe("CIFAR-100", 83.1, LINEAR, _CLIP),
                     Probe("Oxford Pets", 93.1, LINEAR, _CLIP))),
    CuratedModel("torchvision/convnext_tiny", "ConvNeXt-T, supervised on ImageNet-1k (2022)", 768, 224, 27.82,
                 TORCHVISION_LICENSE, (
                     Probe("ImageNet-1k", 82.5, OWN_HEAD, "torchvision, ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),)),
    CuratedModel("timm/efficientnet_b0.ra_in1k", "EfficientNet-B0, supervised on ImageNet-1k with RandAugment (2019)",
                 1280, 224, 4.01, "apache-2.0", (
                     Probe("ImageNet-1k", 77.7, OWN_HEAD, "timm, results/results-imagenet.csv"),)),
    CuratedModel("resnet50", "ResNet-50, supervised on ImageNet-1k (2015); a default backbone", 2048, 224, 23.51,
                 TORCHVISION_LICENSE, (
                     Probe("Food-101", 72.3, LINEAR, _BYOL), Probe("CIFAR-10", 93.6, LINEAR, _BYOL),
                     Probe("CIFAR-100", 78.3, LINEAR, _BYOL), Probe("Oxford Pets", 91.5, LINEAR, _BYOL),
                     Probe("ImageNet-1k", 76.1, OWN_HEAD, "torchvision, ResNet50_Weights.IMAGENET1K_V1"))),
    CuratedModel("vgg16", "VGG16, supervised on ImageNet-1k (2014); a default backbone", 4096, 224, 134.26,
                 TORCHVISION_LICENSE, (
                     Probe("ImageNet-1k", 71.6, OWN_HEAD, "torchvision, VGG16_Weights.IMAGENET1K_V1"),)),
)
"""The curated models: today's frozen backbones of each kind, and the two defaults, with what is published."""
