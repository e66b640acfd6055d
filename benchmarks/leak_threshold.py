"""How report.html's near-duplicate thresholds were chosen: centred cosine of planted copies against distinct images.

240 real images (120 random crops of scikit-learn's two photos, 120 of its digit scans) and 20 planted copies
of them, each resized to 70% and saved again as JPEG at quality 60. For the 32x32 pixel baseline and for
ResNet50 embeddings (seeded random weights: no ImageNet weights can be had offline), it prints the centred
cosine of each copy to its original and the distribution among distinct images, per threshold.

    python benchmarks/leak_threshold.py [--work build/leak-threshold]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_image

from pipeline.extract.decode import decode_file
from pipeline.models import ModelRepository
from pipeline.store.neighbors import centred

THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.99)


def real_images(folder: Path, seed: int = 0) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """The 240 images and the 20 (original, copy) pairs."""
    rng = np.random.default_rng(seed)
    images = []
    for name in ("china.jpg", "flower.jpg"):
        picture = Image.fromarray(load_sample_image(name))
        for i in range(60):
            width, height = rng.integers(220, 400, 2)
            x, y = rng.integers(0, picture.width - width), rng.integers(0, picture.height - height)
            crop = picture.crop((x, y, x + width, y + height))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{name[:5]}{i:03d}.jpg", quality=90)
            images.append(folder / f"{name[:5]}{i:03d}.jpg")
    digits = load_digits()
    for i in range(120):
        scan = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((96, 96), Image.BILINEAR)
        scan.convert("RGB").save(folder / f"digit{i:03d}.png")
        images.append(folder / f"digit{i:03d}.png")
    planted = []
    for original in images[::12]:
        picture = Image.open(original).convert("RGB")
        picture = picture.resize((int(picture.width * 0.7), int(picture.height * 0.7)), Image.BICUBIC)
        copy = folder / f"copy-{original.stem}.jpg"
        picture.save(copy, quality=60)
        planted.append((original, copy))
    return images, planted


def report(
    name: str, features: np.ndarray, copies: np.ndarray, images: list[Path], planted: list[tuple[Path, Path]]
) -> None:
    mean = features.mean(axis=0)
    Z, C = centred(features, mean), centred(copies, mean)
    similarity = Z @ Z.T
    np.fill_diagonal(similarity, np.nan)
    position = {path: number for number, path in enumerate(images)}
    pairs = np.array([C[k] @ Z[position[original]] for k, (original, _) in enumerate(planted)])
    print(f"\n{name}")
    for group, rows in (("photos", slice(0, 120)), ("digits", slice(120, 240))):
        distinct = similarity[rows, rows][np.isfinite(similarity[rows, rows])]
        mine = np.array([rows.start <= position[original] < rows.stop for original, _ in planted])
        print(f"  {group}: copies {[round(float(x), 3) for x in np.sort(pairs[mine])]}; "
              "distinct images: 99.9th percentile "
              f"{np.quantile(distinct, 0.999):.3f}, max {distinct.max():.3f}")
        for threshold in THRESHOLDS:
            print(f"    at {threshold}: copies found {np.mean(pairs[mine] >= threshold):.0%}, distinct pairs above "
                  f"{np.mean(distinct >= threshold):.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/leak-threshold"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    images, planted = real_images(args.work)
    session = ModelRepository(args.work / "models").export("resnet50", "random", 224).model.open("cpu")
    recipe = [session.manifest.preprocessing]
    decoded = [decode_file(path, recipe) for path in images]
    copies = [decode_file(copy, recipe) for _, copy in planted]
    pixels = np.stack([d.pixels for d in decoded]), np.stack([d.pixels for d in copies])
    report("32x32 pixels", *pixels, images, planted)
    crops = np.stack([d.crops[0] for d in decoded]), np.stack([d.crops[0] for d in copies])
    embed = lambda batch: np.concatenate([session.embed(batch[i : i + 16]) for i in range(0, len(batch), 16)])  # noqa: E731
    report("ResNet50, seeded random weights", embed(crops[0]), embed(crops[1]), images, planted)


if __name__ == "__main__":
    main()
