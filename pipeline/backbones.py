"""The backbone registry: each supported torchvision model, where its head is cut, and how its input is prepared."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's input is made: torchvision's ``Resize(resize_size)`` then ``CenterCrop(crop_size)``.

    The host resizes and crops (uint8 RGB); the exported graph casts, scales to [0, 1] and normalises
    with ``mean`` and ``std``.
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def scaled_to(self, crop_size: int) -> Preprocessing:
        """Return the same recipe for another crop size, keeping the resize-to-crop ratio (256/224)."""
        resize_size = round(self.resize_size * crop_size / self.crop_size)
        return Preprocessing(resize_size, crop_size, self.mean, self.std, self.interpolation)


@dataclass(frozen=True)
class Backbone:
    """One ImageNet classifier from torchvision, used without its classification layer.

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
        resize_size = self.imagenet_weights.get(weights_name or "", self.imagenet_weights[self.default_imagenet_weights])
        base = Preprocessing(resize_size, self.crop_size, self.mean, self.std, self.interpolation)
        return base if crop_size in (None, self.crop_size) else base.scaled_to(crop_size)


BACKBONES: dict[str, Backbone] = {
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


def get_backbone(name: str) -> Backbone:
    """Return the registered backbone called ``name``.

    Raises
    ------
    UserError
        If no backbone has that name; the message lists the ones that exist.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}.") from None
