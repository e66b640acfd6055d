"""What the host side of extract costs: decoding step by step, decode threads, and the whole extract path
with a zero-cost backbone, which bounds what a GPU can be fed.

Used by ``make bench`` (bench_extract.py); on its own, for the decode figures alone:

    python benchmarks/bench_host.py [--photos 200] [--work build/bench]

Every decode figure is milliseconds per image on one core, the best of ``REPEATS`` passes over the same
files (in the page cache after the first). "decode_file" is the whole call, as extract makes it; the steps
add up to about it. The "instead" figures are what version 1 of the recipe did in place of a step (a copy
of every image for EXIF orientation, the pixel baseline resized from the whole image) and candidates that
were measured and not taken (see docs/speed.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.extract.decode import (
    MAX_PIXELS,
    PIXELS_SOURCE,
    decode_file,
    draft_floor,
    load_rgb,
    map_ordered,
    open_image,
    pixel_features,
    read_image_file,
    resize_center_crop,
    to_rgb,
)
from pipeline.files import available_cores
from pipeline.models import Preprocessing

REPEATS = 3
# Pillow's reducing_gap shrinks by an integer factor before the filter when the scale is at least twice the
# gap: 2 and 3 are its documented choices, 1 the most it can do here (draft mode leaves scales of 2 to 4).
REDUCING_GAPS = (1.0, 2.0)
RECIPE = [PIXELS_SOURCE]  # the 224 px crop of VGG16 and ResNet50
_MAX_BYTES = MAX_PIXELS * 8


PHOTO_SIZE = (640, 480)


def make_photos(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = PHOTO_SIZE) -> Path:
    """``count`` JPEG photos of ``size`` in two class folders, derived from scikit-learn's sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = load_sample_images()
    rng = np.random.default_rng(seed)
    for i in range(count):
        index = i % 2
        path = folder / sources.filenames[index].rsplit("/", 1)[-1].split(".")[0] / f"{i:05d}.jpg"
        if path.exists():
            continue
        image = sources.images[index]
        height, width = image.shape[:2]
        crop_h = int(height * rng.uniform(0.6, 1.0))
        crop_w = min(width, int(crop_h * 4 / 3))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        pixels = image[top : top + crop_h, left : left + crop_w].astype(np.float32)
        pixels = pixels * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, quality=90)
    return folder


def best_ms(step: Callable[[object], object], items: Sequence) -> float:
    """Milliseconds per item of ``step``, the best of ``REPEATS`` passes."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return 1000 * best


def decoded(data: bytes, recipe: Sequence[Preprocessing] = RECIPE) -> Image.Image:
    """The decode step alone: ``data`` opened at the draft scale extract would choose, and decoded."""
    image = open_image(data, draft_floor(recipe))
    image.load()
    return image


def breakdown(paths: Sequence[Path], recipe: Sequence[Preprocessing] = RECIPE) -> dict:
    """Per image: the whole ``decode_file``, each of its steps, and the alternatives measured beside them."""
    data = [read_image_file(path, _MAX_BYTES) for path in paths]
    images = [decoded(item, recipe) for item in data]
    crops = [tuple(resize_center_crop(image, p) for p in recipe) for image in images]
    steps = {
        "decode_file": best_ms(lambda path: decode_file(path, recipe), paths),
        "read": best_ms(lambda path: read_image_file(path, _MAX_BYTES), paths),
        "hash": best_ms(lambda item: hashlib.sha256(item).hexdigest(), data),
        "decode": best_ms(lambda item: decoded(item, recipe), data),
        "rotate": best_ms(lambda image: ImageOps.exif_transpose(image, in_place=True), images),
        "to_rgb": best_ms(to_rgb, images),
        "resize_crop": best_ms(lambda image: [resize_center_crop(image, p) for p in recipe], images),
        "pixels": best_ms(lambda pair: pixel_features(pair[0], recipe, pair[1]), list(zip(images, crops))),
    }
    instead = {
        "rotate_by_copy (v1)": best_ms(ImageOps.exif_transpose, images),
        "pixels_from_the_whole_image (v1)": best_ms(
            lambda image: resize_center_crop(image, Preprocessing(37, 32)).astype(np.float32) / 255.0, images),
    }
    gaps = {}
    for gap in REDUCING_GAPS:
        instead[f"resize_crop_with_reducing_gap_{gap}"] = best_ms(
            lambda image, gap=gap: _reduced(image, recipe[0], gap), images)
        gaps[gap] = sum(
            not np.array_equal(_reduced(image, recipe[0], gap), crop[0]) for image, crop in zip(images, crops))
    return {"images": len(paths), "decoded_size": list(images[0].size), "ms": steps, "instead_ms": instead,
            "crops_changed_by_reducing_gap": {gap: f"{n} of {len(images)}" for gap, n in gaps.items()}}


def _reduced(image: Image.Image, recipe: Preprocessing, gap: float) -> np.ndarray:
    """The crop with Pillow's ``reducing_gap`` (an integer box reduction before the filter): not torchvision's."""
    width, height = image.size
    size = (recipe.resize_size, int(recipe.resize_size * height / width)) if width <= height else (
        int(recipe.resize_size * width / height), recipe.resize_size)
    resized = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=gap)
    top, left = int(round((size[1] - recipe.crop_size) / 2.0)), int(round((size[0] - recipe.crop_size) / 2.0))
    return np.asarray(resized.crop((left, top, left + recipe.crop_size, top + recipe.crop_size)))


def draft_effect(paths: Sequence[Path], recipe: Sequence[Preprocessing] = RECIPE) -> dict:
    """Large JPEGs decoded at reduced scale (draft mode) against whole: the time of decode, resize and crop,
    and how far the crops are apart."""
    data = [path.read_bytes() for path in paths]
    crops, ms = {}, {}
    for label, floor in (("drafted", draft_floor(recipe)), ("whole", 0)):  # the same work but for draft mode
        ms[label] = best_ms(lambda item, floor=floor: resize_center_crop(load_rgb(item, floor), recipe[0]), data)
        crops[label] = np.stack([resize_center_crop(load_rgb(item, floor), recipe[0]) for item in data]).astype(int)
    difference = np.abs(crops["drafted"] - crops["whole"])
    return {"decode_resize_crop_ms": ms, "crop_difference": {"mean_abs": float(difference.mean()),
                                                            "max_abs": int(difference.max())}}


def thread_rates(paths: Sequence[Path], workers: int, recipe: Sequence[Preprocessing] = RECIPE) -> dict:
    """Images per second of ``decode_file`` in ``workers`` threads: as extract submits them (one file a task,
    through ``map_ordered``), and in tasks of 8 files (to see what per-task overhead costs)."""
    def one_by_one() -> None:
        for _ in map_ordered(lambda path: decode_file(path, recipe), paths, workers, 4 * workers):
            pass

    def eight_a_task() -> None:
        groups = [paths[i : i + 8] for i in range(0, len(paths), 8)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda group: [decode_file(path, recipe) for path in group], groups))

    rates = {}
    for name, run in (("one_file_a_task", one_by_one), ("eight_files_a_task", eight_a_task)):
        best = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        rates[name] = len(paths) / best
    return rates


def zero_cost_backbone(models_dir: Path, model: str, out_dir: Path) -> Path:
    """``out_dir/<model>.onnx``: a graph of the export's input and output contract that does almost nothing
    (a cast, a mean over the pixels and a tiny matrix product), with the export's manifest re-pointed at it.

    Extract runs it as it runs the backbone, so its images/s are what the host side alone can do: discovery,
    reading, hashing, decoding, the pixel baseline, writing shards and committing. For benchmarks only: its
    embeddings are not a model's.
    """
    import dataclasses

    import onnx
    from onnx import TensorProto, helper

    from pipeline.files import sha256_file
    from pipeline.models import ModelManifest

    manifest = ModelManifest.load(models_dir / f"{model}.json")
    size, dim = manifest.input["size"], manifest.output["dim"]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["floats"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["floats"], ["means"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["means", "spread"], ["embedding"])],
        "zero_cost",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor("spread", TensorProto.FLOAT, [3, dim], np.full(3 * dim, 1 / 3, np.float32))],
    )
    renamed = {"images": manifest.input["name"], "embedding": manifest.output["name"]}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    graph.input[0].name, graph.output[0].name = renamed["images"], renamed["embedding"]
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / manifest.onnx_file
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), onnx_path)
    note = {"zero_cost": "a cast, a mean and a 3 x D product in place of the backbone, for the host's ceiling"}
    dataclasses.replace(manifest, onnx_sha256=sha256_file(onnx_path), verification=note, opset=17).save(
        out_dir / f"{manifest.name}.json")
    return onnx_path


def pin_to_cores(count: int) -> None:
    """Run this process (and the threads it starts) on its first ``count`` allowed cores only."""
    import os

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])


def decode_costs(photos: Path, large: Path, count: int = 200) -> dict:
    """decode_file on one core, step by step (``breakdown``), in threads, and draft mode's effect, on the first
    ``count`` JPEGs of ``photos`` (640x480) and on those of ``large`` (2560x1920)."""
    paths = sorted(photos.rglob("*.jpg"))[:count]
    large_paths = sorted(large.rglob("*.jpg"))
    costs = {"photos_640x480": breakdown(paths), "photos_2560x1920": breakdown(large_paths)}
    costs["photos_640x480"]["images_per_s_by_threads"] = {
        workers: thread_rates(paths, workers) for workers in sorted({1, available_cores()})}
    costs["photos_2560x1920"]["draft_mode"] = draft_effect(large_paths)
    return costs


def main(argv: list[str] | None = None) -> int:
    """The decode figures alone, printed as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    args = parser.parse_args(argv)
    photos = make_photos(args.work / "photos", args.photos)
    large = make_photos(args.work / "large-photos", 8, size=(2560, 1920))
    print(json.dumps(decode_costs(photos, large, args.photos), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
