"""Time ``pipeline.fit`` on a large synthetic store: N embeddings of D dimensions in C classes.

The embeddings are low-rank, like real backbone features: C class centres and per-image variation in a
64-dimensional space, projected to D dimensions, plus a little isotropic noise: a linear classifier
gets about 74% of a 10-class test part right, so the solvers work about as hard as on real embeddings.

    python benchmarks/bench_fit.py --images 100000 --dim 2048 --classes 10
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.extract.discover import ImageRecord
from pipeline.fit.run import print_summary, run_fit
from pipeline.store import EmbeddingStore, FileState, Segment

LATENT = 64


def synthetic_embeddings(images: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    latent = rng.normal(size=(classes, LATENT))[labels] + 3.5 * rng.normal(size=(images, LATENT))
    projection = rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)
    embeddings = np.maximum(latent @ projection, 0) + 0.05 * rng.normal(size=(images, dim))  # ReLU-like, as avgpool
    return embeddings.astype(np.float32), labels


def write_store(path: Path, embeddings: np.ndarray, labels: np.ndarray) -> EmbeddingStore:
    store = EmbeddingStore(path)
    attrs = {"kind": "onnx", "model": "resnet50", "fingerprint": "synthetic", "embedding_dim": embeddings.shape[1],
             "weights_id": "synthetic", "embedding_layer": "avgpool", "image_size": 224}
    records = [ImageRecord(f"c{label}/{i:07d}.png", f"c{label}", "") for i, label in enumerate(labels)]
    segment = Segment("resnet50", "synthetic", attrs, "/synthetic")
    segment.records = records
    segment.states = [FileState(f"{i:064x}", 1, 1) for i in range(len(records))]
    segment.embeddings = list(embeddings)
    writer = store.writer()
    writer.append(segment)
    writer.commit(Path("/synthetic"), records, {"resnet50": "synthetic"})
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--classifiers", nargs="+", default=["logreg", "svm"])
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the store and report (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fit-"))
    store_path = work / "embeddings.h5"
    if not store_path.exists():
        embeddings, labels = synthetic_embeddings(args.images, args.dim, args.classes)
        write_store(store_path, embeddings, labels)
        del embeddings
    started = time.perf_counter()
    report = run_fit(store_path, classifiers=args.classifiers, out=work / "out")
    seconds = time.perf_counter() - started
    print_summary(report, work / "out", seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process; joblib workers not included
    print(json.dumps({"images": args.images, "dim": args.dim, "classes": args.classes, "fit_seconds": round(seconds, 1),
                      "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
