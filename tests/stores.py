"""Stores of synthetic embeddings for the fit and classify tests: no images, no ONNX, just the store format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.extract.decode import PIXELS_FINGERPRINT
from pipeline.extract.discover import ImageRecord
from pipeline.store import PIXELS, EmbeddingStore, FileState, Segment

ROOT = Path("/data/synthetic")


def feature_attrs(name: str, dim: int, untrained: bool = False) -> dict:
    """Group attributes like extract writes them."""
    if name == PIXELS:
        return {"kind": "pixels", "fingerprint": PIXELS_FINGERPRINT, "image_size": 32, "embedding_dim": dim,
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
    writer = store.writer()
    for offset, (name, (dim, spread)) in enumerate(features.items()):
        X = blobs(labels, dim, spread, seed + offset)
        if edit is not None:
            X = edit(name, X)
        segment = Segment(name, feature_attrs(name, dim)["fingerprint"], feature_attrs(name, dim, untrained), str(ROOT))
        for i, record in enumerate(records):
            segment.records.append(record)
            segment.states.append(FileState(f"{i:064x}", 100, 1))
            segment.embeddings.append(X[i])
        writer.append(segment)
    writer.commit(ROOT, records, {name: feature_attrs(name, dim)["fingerprint"] for name, (dim, _) in features.items()})
    return store


FORMAT1_SPEC = "Embedding store, format 1. (written by the tests as the previous version of the pipeline wrote it)"


def format1_store(path: Path, per_class: int = 6, dim: int = 8, seed: int = 0) -> dict[str, dict]:
    """A format-1 store, one HDF5 file laid out as the previous version wrote it, and what each set holds.

    Two feature sets, ``resnet50`` (rows of two classes, with a recorded split, and one failure) and
    ``pixels`` (the same rows); returns per set the expected paths, labels, splits, sha256, embeddings,
    attributes and failures.
    """
    import h5py

    rng = np.random.default_rng(seed)
    paths = [f"{label}/{i:03d}.jpg" for label in ("cat", "dog") for i in range(per_class)]
    labels = np.array([0 if p.startswith("cat") else 1 for p in paths], np.int32)
    splits = ["test" if i % 3 == 0 else "train" for i in range(len(paths))]
    hashes = [f"{i:064x}" for i in range(len(paths))]
    string = h5py.string_dtype("utf-8")
    expected = {}
    with h5py.File(path, "w") as store:
        store.attrs.update({"encoding": "pipeline.embedding-store", "format_version": 1,
                            "dataset_root": str(ROOT), "spec": FORMAT1_SPEC})
        store.create_dataset("classes", data=np.array(["cat", "dog"], dtype=object), dtype=string)
        for name, width in (("resnet50", dim), (PIXELS, dim + 4)):
            attrs = feature_attrs(name, width)
            embeddings = rng.random((len(paths), width), dtype=np.float32)
            group = store.create_group(name)
            group.attrs.update(attrs)
            group.create_dataset("embeddings", data=embeddings, chunks=(4, width), maxshape=(None, width),
                                 compression="gzip", compression_opts=4, shuffle=True)
            group.create_dataset("paths", data=np.array(paths, dtype=object), dtype=string)
            group.create_dataset("labels", data=labels)
            group.create_dataset("split", data=np.array(splits, dtype=object), dtype=string)
            group.create_dataset("sha256", data=np.array(hashes, dtype=object), dtype=string)
            group.create_dataset("file_size", data=np.full(len(paths), 100, np.int64))
            group.create_dataset("file_mtime_ns", data=np.arange(len(paths), dtype=np.int64))
            failed = ["dog/broken.jpg"] if name == "resnet50" else []
            failures = group.create_group("failures")
            for column, values in (("paths", failed), ("reason", ["truncated"] * len(failed)),
                                   ("sha256", ["f" * 64] * len(failed))):
                failures.create_dataset(column, data=np.array(values, dtype=object), dtype=string)
            failures.create_dataset("file_size", data=np.full(len(failed), 5, np.int64))
            failures.create_dataset("file_mtime_ns", data=np.full(len(failed), 5, np.int64))
            expected[name] = {"paths": paths, "labels": labels, "splits": splits, "sha256": hashes,
                              "embeddings": embeddings, "attrs": attrs, "failures": failed}
    return expected


def format1_journal_segment(store_path: Path, name: str, rows: dict[str, float], number: int = 1) -> None:
    """A segment of a format-1 journal (``<store>.journal/<set>-<n>.npz``), as an interrupted run left it."""
    journal = store_path.with_name(store_path.name + ".journal")
    journal.mkdir(exist_ok=True)
    dim = 8
    np.savez(
        journal / f"{name}-{number:06d}.npz", name=np.array(name),
        fingerprint=np.array(feature_attrs(name, dim)["fingerprint"]),
        dataset_root=np.array(str(ROOT)), attrs=np.array(json.dumps(feature_attrs(name, dim))),
        embeddings=np.stack([np.full(dim, v, np.float32) for v in rows.values()]),
        paths=np.array(list(rows), dtype=str), sha256=np.array([f"{9:064x}"] * len(rows)),
        file_size=np.full(len(rows), 1, np.int64), file_mtime_ns=np.full(len(rows), 1, np.int64),
        failed_paths=np.array([], dtype=str), failed_sha256=np.array([], dtype=str),
        failed_file_size=np.zeros(0, np.int64), failed_file_mtime_ns=np.zeros(0, np.int64),
        failed_reasons=np.array([], dtype=str),
    )
