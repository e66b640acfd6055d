"""The one-command demo: export, extract, fit and classify on scikit-learn's bundled digit scans (no download)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import run_cli
from pipeline.extract.run import run_extract
from pipeline.files import classifiers_dir
from pipeline.fit.run import print_summary, run_fit
from pipeline.models import DEFAULT_BACKBONES, PRECISIONS, ModelManifest, ModelRepository
from pipeline.models.repository import UNTRAINED_BANNER, ExportResult, describe_export
from pipeline.serve.classify import choose_bundle, run_classify
from pipeline.store import EmbeddingStore

TEST_FRACTION = 0.25


def imagenet_cache_file(model: str) -> Path:
    """Where torch.hub caches the default ImageNet weights of vgg16 or resnet50."""
    import torchvision

    from pipeline.models.weights import torchvision_cache_file

    backbone = DEFAULT_BACKBONES[model]
    weights = getattr(torchvision.models, backbone.weights_enum)[backbone.default_imagenet_weights]
    return torchvision_cache_file(weights.url)


def demo_weights(model: str) -> str:
    """``imagenet`` when the backbone's ImageNet weights are already in the torch hub cache, else ``random``."""
    return "imagenet" if imagenet_cache_file(model).exists() else "random"


def demo_models(repository: ModelRepository, image_size: int) -> dict[str, ModelManifest]:
    """Both backbones as exported in the repository (whatever their weights: the demo never replaces an export);
    the missing ones exported first, with ImageNet weights when every missing one has them cached, else random."""
    current = {model: repository.current(model) for model in DEFAULT_BACKBONES}
    missing = [model for model, export in current.items() if export is None]
    weights = "random" if any(demo_weights(model) == "random" for model in missing) else "imagenet"
    if missing and weights == "random":  # one kind of weights for the missing ones, so that they compare
        files = [imagenet_cache_file(model) for model in missing]
        print(UNTRAINED_BANNER.format(model=" and ".join(missing)), file=sys.stderr)
        print(f"   No ImageNet weights at {' or '.join(map(str, files))}, so the demo uses seeded random weights;\n"
              "   docs/stages.md (export, Weights) says how to add them.", file=sys.stderr)
    manifests = {}
    for model, export in current.items():
        result = ExportResult(export, exported=False) if export else repository.export(model, weights, image_size)
        print(describe_export(result))
        manifests[model] = result.manifest
    return manifests


def write_digits(root: Path, per_class: int, seed: int = 0) -> int:
    """Write scikit-learn's 8x8 digit scans as PNG split folders ``root/{train,test}/<digit>/<n>.png``.

    Files that already exist are left alone, so a second demo finds the same bytes and reuses its work.
    Returns the number of images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    count = 0
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class]
        test_count = max(1, round(len(indices) * TEST_FRACTION))
        for rank, index in enumerate(indices):
            split = "test" if rank < test_count else "train"
            path = root / split / str(digit) / f"{index:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.rint(digits.images[index] * (255 / 16)).astype(np.uint8)
                Image.fromarray(255 - pixels).save(path)  # dark ink on white, like a scan
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Build the digits dataset, export both backbones, extract, fit, classify the test folder, and report."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument("--data", type=Path, default=Path("data/digits"),
                        help="where the images go (default: data/digits)")
    parser.add_argument("--cache", type=Path, default=Path("features/demo.h5"),
                        help="the store (default: features/demo.h5)")
    parser.add_argument("--per-class", type=int, default=30, help="images per digit (default: 30, of about 180)")
    parser.add_argument("--image-size", type=int, default=224, help="input crop size in pixels (default: 224)")
    parser.add_argument("--classifiers-dir", type=Path, default=None,
                        help="fitted classifiers and report (default: the store's own, models/classifiers/demo)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="backbone precision, as extract's (default: auto: fp16 on CUDA, fp32 on the CPU); the "
                        "report then compares it with any other precision already in the store")
    args = parser.parse_args(argv)
    args.classifiers_dir = args.classifiers_dir or classifiers_dir(args.cache)
    started = time.perf_counter()

    count = write_digits(args.data, args.per_class)
    print(f"demo data: {count} scans of handwritten digits from scikit-learn ({args.per_class} per digit, "
          f"{TEST_FRACTION:.0%} held out as test) in {args.data}/{{train,test}}/<digit>/")
    manifests = demo_models(ModelRepository(args.models_dir), args.image_size)
    untrained = [model for model, manifest in manifests.items() if manifest.untrained]
    specs = run_extract(args.data, models=list(DEFAULT_BACKBONES), cache=args.cache,
                        models_dir=args.models_dir, precision=args.precision,
                        overwrite=True)  # the models as exported; the demo's own store follows them
    store = EmbeddingStore(args.cache)
    print(f"\nstore {args.cache}:")
    for spec in specs:
        rows, failures = store.counts(spec.name)
        dim = spec.attrs["embedding_dim"]
        print(f"  /{spec.name:<14} {rows} x {dim} ({spec.embedded} computed now, {failures} failed)")

    fit_started = time.perf_counter()
    print(f"\nfit: logreg and svm on each backbone and on the 32x32 pixels, test = {args.data}/test/")
    report = run_fit(args.cache, out=args.classifiers_dir, reuse=True)
    if report.get("reused"):
        print(f"reused the classifiers in {args.classifiers_dir}: fitted on the same store with the same arguments")
    print_summary(report, args.classifiers_dir, time.perf_counter() - fit_started)

    bundle = choose_bundle(None, None, None, args.classifiers_dir)
    predictions = args.data.with_name(args.data.name + "-test-predictions.csv")
    print(f"\nclassify: make classify FOLDER={args.data}/test CACHE={args.cache} "
          f"CLASSIFY_ARGS='--output {predictions}' (best by validation: {bundle.name})")
    counts = run_classify(args.data / "test", bundle, output=predictions, models_dir=args.models_dir, cache=args.cache,
                          progress=False)
    print(f"  {counts['classified']} of {counts['images']} test scans classified, {counts['correct']} correctly "
          f"({counts['cached']} embeddings reused from the store); rows in {predictions}")
    if untrained:
        verb = "has" if len(untrained) == 1 else "have"
        print(f"\nReminder: {' and '.join(untrained)} {verb} UNTRAINED random weights here; see the banner above.",
              file=sys.stderr)
    print(f"\ndone in {time.perf_counter() - started:.0f} s. The report: {args.classifiers_dir / 'report.html'} "
          f"(open it in a browser; also report.md). Next: "
          f"make classify FOLDER=<folder> CACHE={args.cache} prints predictions; README.md says how to go on with "
          "your own images.")
    return 0


if __name__ == "__main__":
    run_cli(main)
