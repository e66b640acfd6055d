"""Stores of synthetic embeddings for the fit and classify tests: no images, no ONNX, just the store format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.discover import ImageRecord
from pipeline.store import PIXELS, EmbeddingStore, FileState, Segment

ROOT = Path("/data/synthetic")


def feature_attrs(name: str, dim: int, untrained: bool = False) -> dict:
    """Group attributes like extract writes them."""
    if name == PIXELS:
        return {"kind": "pixels", "fingerprint": "pixels:32:v1", "image_size": 32, "embedding_dim": dim,
                "description": "raw-pixel baseline"}
    weights = {"source": "random", "seed": 0} if untrained else {"source": "imagenet", "name": "IMAGENET1K_V1"}
    return {
        "kind": "onnx", "model": name, "fingerprint": f"sha-{name}", "onnx_file": f"{name}.onnx",
        "onnx_sha256": f"sha-{name}", "weights_id": "random:seed=0" if untrained else "imagenet:IMAGENET1K_V1",
        "weights": json.dumps(weights), "untrained": untrained, "image_size": 224, "precision": "fp32",
        "embedding_dim": dim, "embedding_layer": "avgpool",
    }


def blobs(labels: np.ndarray, dim: int, spread: float, seed: int) -> np.ndarray:
    """Gaussian clusters, one per label; ``spread`` is the noise relative to the distance between centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels.max() + 1, dim)) * 3
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)


def synthetic_store(
    path: Path,
    per_class: dict[str, int] | int = 30,
    classes: int = 3,
    features: dict[str, tuple[int, float]] | None = None,
    split: Callable[[int, str], str] | None = None,
    untrained: bool = False,
    unlabelled: int = 0,
    seed: int = 0,
    edit: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> EmbeddingStore:
    """Write a store of labelled synthetic embeddings.

    ``features`` maps a feature set to ``(dim, spread)``: small spreads make separable classes, large ones
    noise. ``split(i, label)`` gives each image's recorded split (default: none). ``edit(name, X)`` may alter
    a set's embeddings before they are written.
    """
    if isinstance(per_class, int):
        per_class = {f"class{c}": per_class for c in range(classes)}
    features = features or {"resnet50": (16, 0.3), "vgg16": (24, 0.5), PIXELS: (12, 5.0)}
    records = []
    for label, count in per_class.items():
        for i in range(count):
            records.append(ImageRecord(f"{label}/{i:04d}.png", label, split(i, label) if split else ""))
    records += [ImageRecord(f"loose/{i:04d}.png", None, "") for i in range(unlabelled)]
    names = sorted(per_class)
    labels = np.array([names.index(r.label) if r.label else 0 for r in records])
    store = EmbeddingStore(path)
    for offset, (name, (dim, spread)) in enumerate(features.items()):
        X = blobs(labels, dim, spread, seed + offset)
        if edit is not None:
            X = edit(name, X)
        segment = Segment(name, feature_attrs(name, dim)["fingerprint"], feature_attrs(name, dim, untrained), str(ROOT))
        for i, record in enumerate(records):
            segment.records.append(record)
            segment.states.append(FileState(f"{i:064x}", 100, 1))
            segment.embeddings.append(X[i])
        store.append(segment)
    store.commit(ROOT, records, {name: feature_attrs(name, dim)["fingerprint"] for name, (dim, _) in features.items()})
    return store
