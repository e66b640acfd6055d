"""Stage 0: export a torchvision backbone without its head to ONNX (uint8 NHWC images in, embeddings out)."""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

import pipeline
from pipeline.backbones import BACKBONES, Backbone, Preprocessing, get_backbone
from pipeline.errors import UserError, run_cli
from pipeline.files import atomic_path, sha256_file
from pipeline.manifest import INPUT_NAME, MANIFEST_VERSION, OUTPUT_NAME, ModelManifest, model_paths
from pipeline.weights import IMAGENET, WeightsRequest, load_trunk, parse_weights, weights_per_model

OPSET = 18
MIN_IMAGE_SIZE = 32
# The export verifies itself on this many random images against PyTorch; below these it refuses the file.
VERIFY_IMAGES = 2
VERIFY_MIN_COSINE = 0.99999


class EmbeddingNet(nn.Module):
    """A headless backbone behind its input normalisation: uint8 ``[N, H, W, 3]`` RGB in, ``[N, D]`` float32 out.

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


@dataclass(frozen=True)
class ExportResult:
    """The outcome of :func:`export_backbone`: the manifest, and whether anything was written."""

    manifest: ModelManifest
    onnx_path: Path
    exported: bool


def export_backbone(
    model: str,
    weights: str = "imagenet",
    image_size: int = 224,
    out_dir: str | Path = "models",
    seed: int = 0,
    force: bool = False,
) -> ExportResult:
    """Export ``model`` with ``weights`` to ``out_dir/<model>.onnx`` and its manifest, unless already done.

    Parameters
    ----------
    model : str
        A key of ``BACKBONES``.
    weights : str
        ``imagenet``, a torchvision ImageNet weights name (``IMAGENET1K_V2``), ``random`` or a state-dict path.
    image_size : int
        Side of the square crop the model takes; the resize before it keeps torchvision's 256/224 ratio.
    out_dir : str or Path
        Folder of the ONNX file and the manifest.
    seed : int
        Seed of ``random`` weights.
    force : bool
        Export even when an identical export exists.

    Returns
    -------
    ExportResult

    Raises
    ------
    UserError
        Unknown model, bad image size, unavailable or unfit weights.
    """
    backbone = get_backbone(model)
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {image_size} is too small; {model} needs at least {MIN_IMAGE_SIZE} pixels.")
    request = parse_weights(backbone, weights, seed)
    onnx_path, manifest_path = model_paths(out_dir, model)
    current = _current_manifest(onnx_path, manifest_path)
    if current and not force and _same_export(current, backbone, request, image_size):
        return ExportResult(current, onnx_path, exported=False)

    trunk, provenance = load_trunk(backbone, request)
    preprocessing = backbone.preprocessing(request.name, image_size)
    net = EmbeddingNet(trunk, preprocessing.mean, preprocessing.std).eval()
    with atomic_path(onnx_path) as tmp:
        _export_onnx(net, tmp, image_size)
        onnx.checker.check_model(str(tmp), full_check=True)
        verification = _verify(net, tmp, image_size)
        if current and current.weights_id != request.identity():  # only now that the new one is good
            _keep_previous(onnx_path, manifest_path)
        # The new file replaces the old one as this block ends; from then until the new manifest lands,
        # no manifest claims it, so a kill in between leaves an unfinished export, never a wrong one.
        manifest_path.unlink(missing_ok=True)
    manifest = ModelManifest(
        model=model,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        weights=provenance,
        input=_input_spec(preprocessing),
        output={"name": OUTPUT_NAME, "dim": backbone.embedding_dim, "layer": backbone.embedding_layer},
        opset=OPSET,
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        verification=verification,
    )
    manifest.save(manifest_path)
    return ExportResult(manifest, onnx_path, exported=True)


def _keep_previous(onnx_path: Path, manifest_path: Path) -> None:
    """Keep an export that is about to be replaced by one with other weights as ``<model>.previous.onnx`` and
    ``.json`` (one generation: an older ``.previous`` pair goes), with a notice saying how to go back."""
    previous_onnx = onnx_path.with_name(onnx_path.stem + ".previous.onnx")
    previous_manifest = manifest_path.with_name(manifest_path.stem + ".previous.json")
    previous_manifest.unlink(missing_ok=True)  # never a manifest beside an ONNX file it does not describe
    shutil.copy2(onnx_path, previous_onnx)
    shutil.copy2(manifest_path, previous_manifest)
    print(f"notice: kept the export being replaced as {previous_onnx} and {previous_manifest.name}; to go back, "
          f"rename them to {onnx_path.name} and {manifest_path.name}.", file=sys.stderr)


def _current_manifest(onnx_path: Path, manifest_path: Path) -> ModelManifest | None:
    if not (onnx_path.exists() and manifest_path.exists()):
        return None
    try:
        manifest = ModelManifest.load(manifest_path)
    except UserError:
        return None
    return manifest if sha256_file(onnx_path) == manifest.onnx_sha256 else None


def _same_export(manifest: ModelManifest, backbone: Backbone, request: WeightsRequest, image_size: int) -> bool:
    return (
        manifest.format_version == MANIFEST_VERSION
        and manifest.model == backbone.name
        and manifest.opset == OPSET
        and manifest.input.get("size") == image_size
        and manifest.weights_id == request.identity()
    )


def _export_onnx(net: nn.Module, path: Path, image_size: int) -> None:
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def _verify(net: nn.Module, path: Path, image_size: int) -> dict[str, float]:
    """Compare onnxruntime with PyTorch on random images; refuse the export if they disagree."""
    import onnxruntime

    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (VERIFY_IMAGES, image_size, image_size, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(images)).numpy()
    cosine = float(np.min(np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
    max_error = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
    if not cosine >= VERIFY_MIN_COSINE:
        raise RuntimeError(f"the exported ONNX model disagrees with PyTorch (cosine {cosine:.6f}); please report this.")
    return {"images": VERIFY_IMAGES, "min_cosine": cosine, "max_relative_error": max_error}


def _input_spec(preprocessing: Preprocessing) -> dict:
    return {
        "name": INPUT_NAME,
        "layout": "NHWC",
        "dtype": "uint8",
        "shape": ["batch", preprocessing.crop_size, preprocessing.crop_size, 3],
        "size": preprocessing.crop_size,
        "resize_size": preprocessing.resize_size,
        "interpolation": preprocessing.interpolation,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
    }


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "pipeline": pipeline.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def describe(result: ExportResult) -> str:
    """One line saying what an export did."""
    manifest = result.manifest
    what = f"{manifest.output['dim']}-d embedding, {manifest.input['size']} px, weights {manifest.weights_id}"
    if not result.exported:
        return f"{manifest.model}: {result.onnx_path} is up to date ({what}); nothing to do."
    size_mb = result.onnx_path.stat().st_size / 1e6
    return f"{manifest.model}: exported {result.onnx_path} ({what}, {size_mb:.1f} MB)."


UNTRAINED_BANNER = (
    "!" * 78
    + "\n!! {model}: UNTRAINED RANDOM WEIGHTS. These embeddings carry no ImageNet knowledge;\n"
    "!! classifiers fitted on them measure the pipeline, not transfer learning.\n" + "!" * 78
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=(
            "Export ImageNet backbones without their classification head to ONNX. The model takes a batch of "
            "uint8 RGB crops [N, H, W, 3] and returns the penultimate embedding; normalisation is inside the graph. "
            "Writes MODEL.onnx and MODEL.json (the manifest: weights provenance, input spec, hashes) to --out."
        ),
    )
    parser.add_argument(
        "--model", nargs="+", required=True, choices=sorted(BACKBONES), metavar="MODEL",
        help=f"backbone(s) to export: {', '.join(BACKBONES)} (vgg16: fc7 after ReLU, 4096-d; "
        "resnet50: global average pool, 2048-d)",
    )
    parser.add_argument(
        "--weights", nargs="+", default=None, metavar="[MODEL=]WEIGHTS",
        help="imagenet (torchvision's IMAGENET1K_V1, downloaded once into the torch hub cache, TORCH_HOME honoured); "
        "IMAGENET1K_V2 (resnet50 only); random (seeded, untrained: for tests and dry runs only); "
        "or PATH to a state dict of the full torchvision classifier (.pth, .pt or .safetensors); for every model, "
        "or MODEL=WEIGHTS for one (--weights resnet50=PATH vgg16=imagenet). Default: imagenet",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --weights random (default: 0)")
    parser.add_argument(
        "--image-size", type=int, default=224,
        help="side of the square input crop in pixels; the resize before it scales with it (default: 224, resize 256)",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models/)")
    parser.add_argument("--force", action="store_true", help="export even if an identical export exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export each requested model; print one line per model."""
    args = build_parser().parse_args(argv)
    weights = weights_per_model(args.weights, args.model)
    for model in args.model:
        started = time.perf_counter()
        result = export_backbone(model, weights[model] or IMAGENET, args.image_size, args.out, args.seed, args.force)
        if result.exported and result.manifest.untrained:
            print(UNTRAINED_BANNER.format(model=model), file=sys.stderr)
        suffix = f" [{time.perf_counter() - started:.1f} s]" if result.exported else ""
        print(describe(result) + suffix)
    return 0


if __name__ == "__main__":
    run_cli(main)
