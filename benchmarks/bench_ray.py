"""``make bench-ray``: extract on a local Ray instance against the local backend, the single writer's ceiling,
and what 1M and 100M images would take on N workers, from the per-worker rates ``make bench`` measured.

(1) The same photos embedded by ``--backend local`` and ``--backend ray`` (one actor per core), each in a fresh
process with a fresh store; the two stores must be equal. (2) How many images per second the one writer (the
driver) can take: Ray Data moving embedding rows of vgg16 + resnet50 + pixels size from actors to the driver,
and the driver recording and journaling them as extract does. (3) The estimate: images / min(workers x
per-worker rate, writer ceiling), in hours and worker-hours (multiply by your price per worker-hour).

    python benchmarks/bench_ray.py [--photos 1000] [--model resnet50] [--precision int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_extract import make_photos
from pipeline.runtime import available_cores

ROW_FLOATS = 4096 + 2048 + 32 * 32 * 3  # vgg16 + resnet50 + pixels: what one image sends to the writer
CLUSTER_IMAGES = (1_000_000, 100_000_000)
CLUSTER_WORKERS = (8, 64, 512)


def extract_child(data: str, cache: str, models_dir: str, model: str, precision: str, backend: str) -> None:
    """Time one extract run in this (fresh) process; print one JSON line."""
    from pipeline import cluster
    from pipeline.extract import run_extract

    Path(cache).unlink(missing_ok=True)
    started = time.perf_counter()
    ray_seconds = 0.0
    if backend == "ray":  # started here so that its start-up is timed on its own; extract joins it
        cluster.connect()
        ray_seconds = time.perf_counter() - started
    specs = run_extract(data, [model], cache, models_dir=models_dir, weights="random", precision=precision,
                        device="cpu", progress=False, backend=backend)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": specs[0].embedded, "seconds": seconds, "rate": specs[0].embedded / seconds,
                      "ray_start_seconds": ray_seconds, "rate_after_start": specs[0].embedded / (seconds - ray_seconds)}))


def writer_ceiling(work: Path, images: int) -> dict:
    """Images per second the driver can take: Ray Data transfer to the driver, and record + journal + commit."""
    import ray
    import ray.data

    from pipeline.discover import ImageRecord
    from pipeline.extract import WorkItem, record_batch
    from pipeline.features import FeatureSpec
    from pipeline.store import EmbeddingStore, FileState, Segment

    rows = np.random.default_rng(0).random((256, ROW_FLOATS), dtype=np.float32)

    class Rows:
        def __call__(self, batch: dict) -> dict:
            return {"index": batch["id"], "features": rows[: len(batch["id"])]}

    ray.init(include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.range(images, override_num_blocks=max(8, images // 1024)).map_batches(
        Rows, batch_size=128, compute=ray.data.ActorPoolStrategy(size=available_cores()), num_cpus=0.5)  # CPUs left to read
    started = time.perf_counter()
    received = sum(len(batch["index"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"))
    transfer = received / (time.perf_counter() - started)
    ray.shutdown()

    store = EmbeddingStore(work / "writer.h5")
    store.clear_journal()
    specs = [FeatureSpec(name, name, {"kind": "onnx", "embedding_dim": dim}) for name, dim in
             (("vgg16", 4096), ("resnet50", 2048), ("pixels", 3072))]
    segments = {spec.name: Segment(spec.name, spec.name, spec.attrs, str(work)) for spec in specs}
    records = [ImageRecord(f"c{i % 10}/{i:08d}.jpg", f"c{i % 10}") for i in range(images)]
    started = time.perf_counter()
    for start in range(0, images, 128):
        items = [WorkItem(r, FileState("", 1, 1), [s.name for s in specs]) for r in records[start : start + 128]]
        features = {"vgg16": rows[: len(items), :4096], "resnet50": rows[: len(items), 4096:6144],
                    "pixels": rows[: len(items), 6144:]}
        record_batch(items, ["0" * 64] * len(items), [""] * len(items), features, specs, segments)
        if len(segments["vgg16"]) >= 512:
            for segment in segments.values():
                store.append(segment)
    for segment in segments.values():
        store.append(segment)
    journal = images / (time.perf_counter() - started)
    started = time.perf_counter()
    store.commit(work, records, {spec.name: spec.name for spec in specs})
    commit = images / (time.perf_counter() - started)
    return {"images": images, "row_kb": ROW_FLOATS * 4 / 1024, "ray_transfer_per_s": transfer,
            "record_and_journal_per_s": journal, "commit_per_s": commit}


def in_child(*arguments: object) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def estimate(bench: dict, writer: dict) -> list[dict]:
    """Hours and worker-hours for CLUSTER_IMAGES on CLUSTER_WORKERS workers of each kind ``make bench`` measured.

    A CPU worker is one core that decodes (640x480 JPEG) and then embeds; a GPU worker embeds at its measured
    rate and needs ``decode_cores_per_worker`` CPU cores beside it to decode. The cluster's rate is capped by
    the one writer's intake; its commit (the merge into the HDF5 file, once per run) comes on top.
    """
    cores = bench["machine"]["cores"]
    decode_seconds = bench["decode"]["photos_640x480"]["ms_per_image"] / 1000
    ceiling = min(writer["ray_transfer_per_s"], writer["record_and_journal_per_s"])
    rows = []
    for model, entry in bench["models"].items():
        for name, rate in entry["pure_inference"].items():
            if name == "torch_eager":
                continue
            if name.startswith("cuda"):
                per_worker, unit = rate["images_per_s"], "GPU"
            else:  # one core decodes, then embeds: the two costs add up
                per_worker, unit = 1 / (cores / rate["images_per_s"] + decode_seconds), "CPU core"
            for workers in CLUSTER_WORKERS:
                cluster_rate = min(workers * per_worker, ceiling)
                for images in CLUSTER_IMAGES:
                    extract_hours = images / cluster_rate / 3600
                    commit_hours = images / writer["commit_per_s"] / 3600
                    rows.append({
                        "model": model, "worker": f"{unit}, {name}", "per_worker": per_worker,
                        "decode_cores_per_worker": per_worker * decode_seconds if unit == "GPU" else 1.0,
                        "workers": workers, "images": images, "images_per_s": cluster_rate,
                        "writer_bound": workers * per_worker > ceiling, "extract_hours": extract_hours,
                        "commit_hours": commit_hours, "worker_hours": extract_hours * workers,
                    })
    return rows


def print_estimate(rows: list[dict]) -> None:
    print(f"\n{'model':9} {'worker':24} {'workers':>7} {'images':>11} {'img/s':>8} {'extract h':>9} {'commit h':>8} {'worker-h':>9}")
    for row in rows:
        bound = " (writer-bound)" if row["writer_bound"] else ""
        print(f"{row['model']:9} {row['worker']:24} {row['workers']:>7} {row['images']:>11,} {row['images_per_s']:>8.0f} "
              f"{row['extract_hours']:>9.2f} {row['commit_hours']:>8.2f} {row['worker_hours']:>9.0f}{bound}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--writer-images", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--bench", type=Path, default=Path("benchmarks/bench.json"), help="make bench's output")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench_ray.json"))
    parser.add_argument("--estimate-only", action="store_true", help="recompute the estimate from --out and --bench")
    args = parser.parse_args(argv)
    if args.estimate_only:
        result = json.loads(args.out.read_text())
        result["estimate"] = estimate(json.loads(args.bench.read_text()), result["writer"])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print_estimate(result["estimate"])
        return 0
    from pipeline.export import export_backbone
    from pipeline.quantize import current_variant, make_variant

    args.work.mkdir(parents=True, exist_ok=True)
    photos = make_photos(args.work / "ray-photos", args.photos)
    models_dir = args.work / "models"
    export_backbone(args.model, "random", 224, models_dir)
    if args.precision != "fp32" and current_variant(models_dir, args.model, args.precision) is None:
        make_variant(models_dir, args.model, args.precision, sorted(photos.rglob("*.jpg")))  # not timed
    result: dict = {"cores": available_cores(), "model": args.model, "precision": args.precision}
    for backend in ("local", "ray"):
        result[backend] = in_child(photos, args.work / f"ray-bench-{backend}.h5", models_dir, args.model,
                                   args.precision, backend)
        print(f"{backend}: {result[backend]}", flush=True)
    from pipeline.store import EmbeddingStore

    name = args.model if args.precision == "fp32" else f"{args.model}-{args.precision}"
    local, on_ray = (EmbeddingStore(args.work / f"ray-bench-{b}.h5").load(name) for b in ("local", "ray"))
    result["stores_equal"] = bool((local.paths == on_ray.paths).all() and (local.embeddings == on_ray.embeddings).all())
    result["writer"] = writer_ceiling(args.work, args.writer_images)
    ceiling = min(result["writer"]["ray_transfer_per_s"], result["writer"]["record_and_journal_per_s"])
    result["writer"]["ceiling_per_s"] = ceiling
    print(f"stores equal: {result['stores_equal']}; writer: {result['writer']}", flush=True)
    result["estimate"] = estimate(json.loads(args.bench.read_text()), result["writer"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_estimate(result["estimate"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        extract_child(*sys.argv[2:])
    else:
        sys.exit(main())
