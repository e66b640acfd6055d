"""Export a headless network to ONNX (uint8 NHWC crops in, embeddings out), checked against its library's forward.

Every family is exported the same way: ``torch.onnx.export`` (dynamo) at opset 18 with a dynamic batch
dimension, one file without external data, the input normalisation inside the graph. Before the file is
kept, ``onnx.checker`` runs on it and onnxruntime's output is compared with the library's own forward on
random crops and on crops decoded from generated JPEG photographs; below ``VERIFY_MIN_COSINE`` it is refused.
"""

from __future__ import annotations

import io
import logging
import platform
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

import pipeline
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.models.manifest import INPUT_NAME, OPSET, OUTPUT_NAME, ModelManifest
from pipeline.models.networks import Network, build_network
from pipeline.models.preprocessing import Preprocessing, resize_center_crop
from pipeline.models.registry import ModelName
from pipeline.models.weights import WeightsRequest

# The export verifies itself on random crops and crops of generated photographs against the library's forward.
VERIFY_RANDOM_IMAGES = 2
VERIFY_PHOTOS = 2
VERIFY_MIN_COSINE = 0.9999


class EmbeddingNet(nn.Module):
    """A headless network behind its input normalisation: uint8 ``[N, H, W, 3]`` RGB in, ``[N, D]`` float32 out.

    Casting, scaling to [0, 1] and normalising happen in the graph, exactly as torchvision's
    ``ToTensor()`` + ``Normalize(mean, std)`` do, so host code only resizes and crops.
    """

    def __init__(self, trunk: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.trunk((pixels - self.mean) / self.std)


def export_onnx(model: ModelName, request: WeightsRequest, image_size: int | None, path: Path,
                onnx_file: str) -> ModelManifest:
    """Build ``model`` with ``request``'s weights, write its ONNX graph to ``path`` and check it.

    Parameters
    ----------
    model : ModelName
    request : WeightsRequest
    image_size : int, optional
        Side of the square crop (default: the model's own).
    path : Path
        Where the file is written (a temporary name the caller renames).
    onnx_file : str
        The name the file will have, recorded in the manifest.

    Returns
    -------
    ModelManifest
        The manifest of the file (not yet saved).

    Raises
    ------
    UserError
        When the model cannot be built, exported or checked, or its graph disagrees with the library's forward:
        one sentence naming the model and the step.
    """
    network = build_network(model, request, image_size)
    preprocessing = network.preprocessing
    net = EmbeddingNet(network.module, preprocessing.mean, preprocessing.std).eval()
    _export(net, path, preprocessing.crop_size, model)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # the checker raises several types
        raise UserError(f"{model.name}: the exported ONNX graph fails onnx.checker ({_first_line(error)}); this model "
                        "cannot be used here.") from None
    verification, dim = _verify(net, path, preprocessing, model)
    return ModelManifest(
        model=model.name,
        onnx_file=onnx_file,
        onnx_sha256=sha256_file(path),
        weights=network.weights,
        input=input_spec(preprocessing, network.recipe),
        output={"name": OUTPUT_NAME, "dim": dim, "layer": network.layer},
        opset=OPSET,
        versions=_versions(network),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        verification=verification,
    )


def _export(net: nn.Module, path: Path, image_size: int, model: ModelName) -> None:
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                net, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True, external_data=False,
                verbose=False,
            )
        program.save(str(path), external_data=False)
    except Exception as error:  # torch.export and the ONNX translation raise many types for what they cannot trace
        raise UserError(f"{model.name}: torch.onnx.export cannot export it ({type(error).__name__}: "
                        f"{_first_line(error)}); this model cannot be used here.") from None


def _verify(net: nn.Module, path: Path, preprocessing: Preprocessing, model: ModelName) -> tuple[dict, int]:
    """Compare onnxruntime with the library's forward on random and decoded crops; refuse an export that
    disagrees. Returns the verification record and the embedding's length."""
    import onnxruntime

    size = preprocessing.crop_size
    random_crops = np.random.default_rng(0).integers(0, 256, (VERIFY_RANDOM_IMAGES, size, size, 3), dtype=np.uint8)
    images = np.concatenate([random_crops, photo_crops(preprocessing, VERIFY_PHOTOS)])
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    except Exception as error:  # onnxruntime raises its own types for graphs it cannot load or run
        raise UserError(f"{model.name}: onnxruntime cannot run the exported graph ({_first_line(error)}); this model "
                        "cannot be used here.") from None
    with torch.no_grad():
        want = net(torch.from_numpy(images)).numpy()
    if got.ndim != 2 or got.shape != want.shape:
        raise UserError(f"{model.name}: its output has shape {tuple(want.shape)}, not one vector per image; it is not "
                        "an image classifier whose head can be removed.")
    norms = np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)
    cosine = float(np.min(np.sum(got * want, 1) / norms))
    max_error = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
    if not cosine >= VERIFY_MIN_COSINE:
        raise UserError(f"{model.name}: the exported ONNX graph disagrees with the library's forward (cosine "
                        f"{cosine:.6f} < {VERIFY_MIN_COSINE}); it is not kept.")
    record = {"images": len(images),
              "on": f"{VERIFY_RANDOM_IMAGES} random crops and {VERIFY_PHOTOS} decoded JPEG photos",
              "min_cosine": cosine, "max_relative_error": max_error}
    return record, int(got.shape[1])


def photo_crops(preprocessing: Preprocessing, count: int, seed: int = 0) -> np.ndarray:
    """``count`` generated photographs (smooth gradients, shapes and grain at 4:3), saved as JPEG, decoded and
    cropped with ``preprocessing``: uint8 ``[count, S, S, 3]``."""
    rng = np.random.default_rng(seed)
    height, width = 3 * preprocessing.crop_size // 2, 2 * preprocessing.crop_size
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    crops = []
    for _ in range(count):
        colours = rng.uniform(0, 255, (3, 3))
        image = colours[0] + np.outer(rows.ravel() / height, colours[1] - colours[0]).reshape(height, width, 3)
        image += np.outer(columns.ravel() / width, colours[2] - colours[0]).reshape(height, width, 3) / 2
        for _ in range(6):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            image[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        encoded = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=90)
        with Image.open(encoded) as decoded:
            crops.append(resize_center_crop(decoded.convert("RGB"), preprocessing))
    return np.stack(crops)


def input_spec(preprocessing: Preprocessing, recipe: dict) -> dict:
    """The manifest's ``input``: the tensor the graph takes and how the host makes it."""
    return {
        "name": INPUT_NAME,
        "layout": "NHWC",
        "dtype": "uint8",
        "shape": ["batch", preprocessing.crop_size, preprocessing.crop_size, 3],
        "size": preprocessing.crop_size,
        "resize_size": preprocessing.resize_size,
        "resize_mode": preprocessing.resize_mode,
        "interpolation": preprocessing.interpolation,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "recipe": recipe,
    }


def _versions(network: Network) -> dict[str, str]:
    import onnxruntime
    import onnxscript
    import torchvision

    versions = {
        "pipeline": pipeline.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    if network.recipe.get("library") == "timm":
        import timm

        versions["timm"] = timm.__version__
    return versions


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:240]
