"""``make bench-ray``: extract on a local Ray instance against the local backend, and what 1M and 100M images
would take on N workers, from the per-worker rates ``make bench`` measured and the store costs ``make
bench-store`` measured.

(1) The same photos embedded by ``--backend local`` and ``--backend ray`` (one actor per core), each in a fresh
process with a fresh store; the two stores must be equal. (2) The estimate: images / min(workers x per-worker
rate, the driver's intake), in hours and worker-hours (multiply by your price per worker-hour). The actors
write the shards, so the driver only takes in their metadata (``bench_store.json``: its intake in images per
second of driver CPU) and commits the index (its cost grows with the images listed); compacting the small
shards runs on the workers, in core-seconds per image, added to their hours.

    python benchmarks/bench_ray.py [--photos 1000] [--model resnet50] [--precision int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_extract import make_photos

from pipeline.files import available_cores

CLUSTER_IMAGES = (1_000_000, 100_000_000)
CLUSTER_WORKERS = (8, 64, 512)


def extract_child(data: str, cache: str, models_dir: str, model: str, precision: str, backend: str) -> None:
    """Time one extract run in this (fresh) process; print one JSON line."""
    from pipeline.extract import cluster
    from pipeline.extract.run import run_extract

    Path(cache).unlink(missing_ok=True)
    started = time.perf_counter()
    ray_seconds = 0.0
    if backend == "ray":  # started here so that its start-up is timed on its own; extract joins it
        cluster.connect()
        ray_seconds = time.perf_counter() - started
    specs = run_extract(data, models=[model], cache=cache, models_dir=models_dir, weights="random", precision=precision,
                        device="cpu", progress=False, backend=backend)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": specs[0].embedded, "seconds": seconds, "rate": specs[0].embedded / seconds,
                      "ray_start_seconds": ray_seconds,
                      "rate_after_start": specs[0].embedded / (seconds - ray_seconds)}))


def store_costs(path: Path) -> dict:
    """What ``make bench-store`` measured that a cluster run pays: the driver's intake, its commit per listed
    image, its bookkeeping per listed image, and compaction per image (core-seconds, on the workers)."""
    bench = json.loads(path.read_text())
    largest = max(bench["sizes"], key=lambda row: row["images"])
    return {
        "intake_per_s": bench["ray"]["intake_per_s"],
        "commit_seconds_per_listed_image": largest["add_1_percent"]["commit_seconds"] / largest["images"],
        "bookkeeping_bytes_per_listed_image": max(e["bytes_per_listed_image"] for e in largest["traced"].values()),
        "compaction_core_seconds_per_image": largest["compaction"]["seconds"] * bench["cores"] / largest["images"],
        "measured_at_images": largest["images"],
    }


def in_child(*arguments: object) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def estimate(bench: dict, store: dict) -> list[dict]:
    """Hours and worker-hours for CLUSTER_IMAGES on CLUSTER_WORKERS workers of each kind ``make bench`` measured.

    A CPU worker is one core that feeds itself (the host side of extract on a 640x480 JPEG: read, hash, decode,
    write, as ``make bench`` measured it with a zero-cost backbone on every core) and then embeds; a GPU worker
    embeds at its measured rate and needs ``decode_cores_per_worker`` CPU cores beside it to feed it. The
    cluster's rate is capped by
    the driver's intake of shard metadata; the commit at the end (the driver writing the index over every
    listed image) comes on top, and compacting the workers' small shards adds to the workers' hours.
    """
    cores = bench["machine"]["cores"]
    decode_seconds = bench["host"]["core_seconds_per_image"]
    ceiling = store["intake_per_s"]
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
                    commit_hours = images * store["commit_seconds_per_listed_image"] / 3600
                    compaction_core_hours = images * store["compaction_core_seconds_per_image"] / 3600
                    rows.append({
                        "model": model, "worker": f"{unit}, {name}", "per_worker": per_worker,
                        "decode_cores_per_worker": per_worker * decode_seconds if unit == "GPU" else 1.0,
                        "workers": workers, "images": images, "images_per_s": cluster_rate,
                        "driver_bound": workers * per_worker > ceiling, "extract_hours": extract_hours,
                        "commit_hours": commit_hours, "worker_hours": extract_hours * workers + compaction_core_hours,
                        "driver_memory_gb": images * store["bookkeeping_bytes_per_listed_image"] / 1e9,
                    })
    return rows


def print_estimate(rows: list[dict]) -> None:
    print(f"\n{'model':9} {'worker':24} {'workers':>7} {'images':>11} {'img/s':>8} {'extract h':>9} {'commit h':>8} "
          f"{'worker-h':>9} {'driver GB':>9}")
    for row in rows:
        bound = " (driver-bound)" if row["driver_bound"] else ""
        print(f"{row['model']:9} {row['worker']:24} {row['workers']:>7} {row['images']:>11,} "
              f"{row['images_per_s']:>8.0f} "
              f"{row['extract_hours']:>9.2f} {row['commit_hours']:>8.3f} {row['worker_hours']:>9.0f} "
              f"{row['driver_memory_gb']:>9.1f}{bound}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--bench", type=Path, default=Path("benchmarks/bench.json"), help="make bench's output")
    parser.add_argument("--store-bench", type=Path, default=Path("benchmarks/bench_store.json"),
                        help="make bench-store's output")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench_ray.json"))
    parser.add_argument("--estimate-only", action="store_true", help="recompute the estimate from --out and --bench")
    args = parser.parse_args(argv)
    if args.estimate_only:
        result = json.loads(args.out.read_text())
        result.pop("writer", None)  # the one writer's ceilings, before actors wrote the shards
        result["store"] = store_costs(args.store_bench)
        result["estimate"] = estimate(json.loads(args.bench.read_text()), result["store"])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print_estimate(result["estimate"])
        return 0
    from pipeline.extract.decode import calibration_crops
    from pipeline.extract.discover import discover
    from pipeline.models import ModelRepository

    args.work.mkdir(parents=True, exist_ok=True)
    photos = make_photos(args.work / "ray-photos", args.photos)
    models_dir = args.work / "models"
    repository = ModelRepository(models_dir)
    source = repository.export(args.model, "random", 224).model
    repository.variant(source, args.precision, calibration_crops(discover(photos), source.preprocessing))  # not timed
    result: dict = {"cores": available_cores(), "model": args.model, "precision": args.precision}
    for backend in ("local", "ray"):
        result[backend] = in_child(photos, args.work / f"ray-bench-{backend}.h5", models_dir, args.model,
                                   args.precision, backend)
        print(f"{backend}: {result[backend]}", flush=True)
    from pipeline.store import EmbeddingStore

    name = args.model if args.precision == "fp32" else f"{args.model}-{args.precision}"
    local, on_ray = (EmbeddingStore(args.work / f"ray-bench-{b}.h5").load(name) for b in ("local", "ray"))
    result["stores_equal"] = bool((local.paths == on_ray.paths).all() and (local.embeddings == on_ray.embeddings).all())
    result["store"] = store_costs(args.store_bench)
    print(f"stores equal: {result['stores_equal']}; store costs: {result['store']}", flush=True)
    result["estimate"] = estimate(json.loads(args.bench.read_text()), result["store"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_estimate(result["estimate"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        extract_child(*sys.argv[2:])
    else:
        sys.exit(main())
