"""A model's input recipe: how its uint8 crop is made from an upright RGB image, and how the graph normalises it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORTER, SQUASH = "shorter", "squash"
RESIZE_MODES = (SHORTER, SQUASH)
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input is made: a resize, then a centre crop of ``crop_size``, then normalisation.

    The host resizes and crops (uint8 RGB, :func:`resize_center_crop`); the exported graph casts, scales to
    [0, 1] and normalises with ``mean`` and ``std``. Both libraries' eval transforms are this shape:
    torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)`` (its weights' ``transforms()``), and timm's
    ``transforms_imagenet_eval`` with ``resize_size = floor(crop_size / crop_pct)``, its ``center`` crop mode
    resizing the shorter side and its ``squash`` mode both sides.

    Attributes
    ----------
    resize_size : int
        The shorter side after resizing (``shorter``), or both sides (``squash``).
    crop_size : int
        Side of the square centre crop the model takes.
    mean, std : tuple of float
        Per-channel normalisation inside the graph.
    interpolation : str
        A key of ``RESAMPLING``: Pillow's antialiased filter, as torchvision's ``Resize`` uses on PIL images.
    resize_mode : {"shorter", "squash"}
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = SHORTER

    @property
    def crop_key(self) -> tuple[int, int, str, str]:
        """What decides the uint8 crop (normalisation happens later, in the graph): recipes with the same key
        share one crop."""
        return self.resize_size, self.crop_size, self.interpolation, self.resize_mode

    def scaled_to(self, crop_size: int) -> Preprocessing:
        """The same recipe for another crop size, keeping the resize-to-crop ratio (256/224 for torchvision)."""
        resize_size = round(self.resize_size * crop_size / self.crop_size)
        return Preprocessing(resize_size, crop_size, self.mean, self.std, self.interpolation, self.resize_mode)


def timm_recipe(config: dict) -> Preprocessing:
    """The recipe of timm's eval transform for a resolved data config (``timm.data.resolve_data_config``).

    Raises
    ------
    UserError
        For what the host side does not reproduce bit for bit: a non-square input, timm's ``border`` crop
        mode (used by 6 of timm 1.0's pretrained configurations), an unknown interpolation.
    """
    _, height, width = config["input_size"]
    if height != width:
        raise UserError(f"the model takes {height}x{width} images; only square inputs are supported (pass "
                        "--image-size to choose a square one).")
    crop_mode = config.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        raise UserError(f"the model's eval transform uses timm's {crop_mode!r} crop mode, which this pipeline does not "
                        "reproduce; choose another pretrained tag of it.")
    interpolation = config.get("interpolation") or "bilinear"
    if interpolation not in RESAMPLING:
        raise UserError(f"the model's eval transform uses {interpolation!r} interpolation, which Pillow has no filter "
                        "for here; choose another pretrained tag of it.")
    crop_pct = config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    return Preprocessing(
        resize_size=math.floor(width / crop_pct), crop_size=width, mean=tuple(config["mean"]), std=tuple(config["std"]),
        interpolation=interpolation, resize_mode=SQUASH if crop_mode == "squash" else SHORTER,
    )


def resize_center_crop(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """torchvision's ``Resize`` then ``CenterCrop`` on a PIL image, as uint8 ``[S, S, 3]``, bit for bit.

    ``shorter``: the shorter side becomes ``resize_size``, the longer one scaled and truncated (as
    torchvision's ``Resize(int)`` does); ``squash``: both sides become ``resize_size``. Pillow's antialiased
    filter; the crop offsets round half to even like torchvision's ``CenterCrop``, which pads with zeros when the
    crop is larger than the resized image.
    """
    width, height = image.size
    if preprocessing.resize_mode == SQUASH:
        size = (preprocessing.resize_size, preprocessing.resize_size)
    else:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = preprocessing.resize_size, int(preprocessing.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, RESAMPLING[preprocessing.interpolation])
    crop = preprocessing.crop_size
    left, top = _crop_offset(size[0], crop), _crop_offset(size[1], crop)
    return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _crop_offset(side: int, crop: int) -> int:
    """Where ``CenterCrop`` starts along a side: rounded half to even, or (a crop larger than the side) after
    torchvision's zero padding of ``(crop - side) // 2`` before (Pillow fills outside the image with zeros)."""
    return int(round((side - crop) / 2.0)) if crop <= side else -((crop - side) // 2)
