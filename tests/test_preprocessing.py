"""Input recipes: the crop decode makes is bit for bit what each library's own eval transform makes.

The reference is the library's whole transform (timm's ``create_transform(**resolve_data_config(...))``,
torchvision's ``weights.transforms()``) applied to the decoded PIL image; ours is decode's uint8 crop
normalised as the exported graph normalises it. Both tensors must be equal, not close.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.errors import UserError
from pipeline.extract.decode import decode_file, load_rgb
from pipeline.models import Preprocessing
from pipeline.models.export import EmbeddingNet
from pipeline.models.preprocessing import SQUASH, resize_center_crop, timm_recipe
from tests.images import photo, save, with_orientation


def timm_case(name: str, size: int | None = None):
    """A timm pretrained configuration's recipe and its library transform, at ``size`` when given."""
    import timm
    from timm.data import create_transform, resolve_data_config

    config = timm.models.get_pretrained_cfg(name).to_dict()
    data = resolve_data_config({"input_size": (3, size, size)} if size else {}, pretrained_cfg=config)
    return timm_recipe(data), create_transform(**data)


def torchvision_case(weights):
    transform = weights.transforms()
    recipe = Preprocessing(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                           tuple(transform.std), transform.interpolation.value)
    return recipe, transform


CASES = {
    "timm center, bicubic, crop_pct 0.875": lambda: timm_case("convnext_atto.d2_in1k", 96),
    "timm DINOv2, crop_pct 1.0": lambda: timm_case("vit_small_patch14_dinov2.lvd142m", 98),
    "timm DINOv2 at its own 518 px": lambda: timm_case("vit_small_patch14_dinov2.lvd142m"),
    "timm SigLIP 2, crop_pct 0.9": lambda: timm_case("vit_base_patch16_siglip_224.v2_webli", 112),
    "timm squash": lambda: timm_case("convnext_base.fb_in22k_ft_in1k_384", 80),
    "timm crop_pct above 1 (padded)": lambda: timm_case("volo_d4_448.sail_in1k", 72),
    "torchvision EfficientNet-B0, bicubic":
        lambda: torchvision_case(torchvision.models.EfficientNet_B0_Weights.DEFAULT),
    "torchvision ConvNeXt-T, 236/224": lambda: torchvision_case(torchvision.models.ConvNeXt_Tiny_Weights.DEFAULT),
    "torchvision ResNet50 V2, 232/224": lambda: torchvision_case(torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
}


def image_files(folder):
    """Real-looking photos of every kind decode handles: EXIF rotations, CMYK, grey, alpha, palette, odd sizes."""
    files = [
        with_orientation(folder / "rotated.jpg", photo(301, 457, seed=1), 6),
        with_orientation(folder / "mirrored.jpg", photo(260, 199, seed=2), 2),
        save(folder / "wide.png", photo(120, 641, seed=3)),
    ]
    for name, mode, options in (("cmyk.jpg", "CMYK", {}), ("grey.png", "L", {}), ("alpha.png", "RGBA", {}),
                                ("palette.png", "P", {"transparency": 0})):
        path = folder / name
        Image.fromarray(photo(233, 311, seed=len(files))).convert(mode).save(path, **options)
        files.append(path)
    return files


def normalised(crops: np.ndarray, recipe: Preprocessing) -> torch.Tensor:
    """What the exported graph feeds the network: decode's crops cast, scaled and normalised in the graph."""
    return EmbeddingNet(torch.nn.Identity(), recipe.mean, recipe.std)(torch.from_numpy(np.array(crops)))


@pytest.mark.parametrize("case", CASES)
def test_crops_are_the_library_transform_bit_for_bit(case, tmp_path):
    recipe, transform = CASES[case]()
    for path in image_files(tmp_path):
        decoded = decode_file(path, [recipe])
        assert not decoded.error, path
        want = transform(load_rgb(path.read_bytes())).unsqueeze(0)
        got = normalised(decoded.crops[0][None], recipe)
        assert got.shape == want.shape and torch.equal(got, want), (case, path.name)


def test_recipes_that_differ_only_in_normalisation_share_a_crop():
    clip, _ = timm_case("vit_base_patch16_clip_224.openai")
    siglip, _ = timm_case("vit_base_patch16_siglip_224.v2_webli")
    assert clip.mean != siglip.mean and clip.crop_key == siglip.crop_key == (248, 224, "bicubic", "shorter")


def test_squash_resizes_both_sides():
    image = Image.fromarray(photo(60, 200))
    crop = resize_center_crop(image, Preprocessing(40, 32, resize_mode=SQUASH))
    reference = torchvision.transforms.Compose(
        [torchvision.transforms.Resize((40, 40)), torchvision.transforms.CenterCrop(32)])
    np.testing.assert_array_equal(crop, np.asarray(reference(image)))


def test_what_the_host_cannot_reproduce_is_refused():
    with pytest.raises(UserError, match="crop mode"):
        timm_recipe({"input_size": (3, 224, 224), "crop_mode": "border", "crop_pct": 1.0, "interpolation": "bicubic",
                     "mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(UserError, match="square"):
        timm_recipe({"input_size": (3, 224, 256), "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.5,) * 3,
                     "std": (0.5,) * 3})
