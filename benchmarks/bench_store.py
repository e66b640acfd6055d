"""``make bench-store``: what store runs cost, through the real store code, on synthetic rows of 2,048 floats.

For each store size N (10k, 100k, 1M images by default) and in this order: the first commit (pending shards
of 512 rows as extract journals them, then the commit, compaction included), a run that adds 1% (planned,
written, committed), a run that changes nothing, a run that deletes 1% of the files, and a forced compaction.
Each row gives wall seconds (planning, then writing and committing), the bytes the process wrote (shards,
index, and the small shards compaction replaced) and the peak resident memory above
what the process held before it (so h5py's own allocations count). The bookkeeping per listed image is the
peak of Python and numpy allocations (tracemalloc) of the same three runs repeated once more, traced (tracing
slows them, so they are not the timed ones): listing, planning, shards of the new rows, commit. Then, on a
local Ray instance, the commit path's intake when actors write the shards: images per second of the driver's
CPU time for extract's own Ray loop (receiving the shards' metadata, counting outcomes) and the commit, whose
compaction runs as Ray tasks.

Targets (issue 14): a +1% commit at 1M images within 3x the time of writing those 1% alone (the first commit
of a store of N/100 images); bookkeeping <= 300 bytes per listed image at 1M; commit-path intake >= 20,000
images/s.

    python benchmarks/bench_store.py [--sizes 10000 100000 1000000] [--work build/bench-store]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

from pipeline.extract.discover import ImageRecord
from pipeline.extract.features import FeatureSpec
from pipeline.extract.plan import ExtractRun, WorkItem, needed_work
from pipeline.extract.run import record_batch
from pipeline.files import available_cores
from pipeline.store import EmbeddingStore, FileState, Segment, ShardTarget, StoreWriter

DIM = 2048
NAME = "resnet50"
ATTRS = {"kind": "onnx", "model": NAME, "fingerprint": "synthetic", "embedding_dim": DIM, "weights_id": "synthetic"}
ROOT = Path("/synthetic")
SEGMENT_ROWS = 512  # extract's journal_rows
POOL = np.maximum(np.random.default_rng(0).normal(0.3, 0.5, (8192, DIM)), 0).astype(np.float32)  # ReLU-like rows


class Memory:
    """Peak resident memory of a block above what the process held when it started (Linux: VmHWM reset)."""

    def __enter__(self) -> Memory:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *error: object) -> None:
        self.peak = max(0, _status("VmHWM") - self.before)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


LABELS = [f"class{c}" for c in range(10)]  # one string per class, as discover shares its folder names


def records_for(numbers: np.ndarray) -> list[ImageRecord]:
    return [ImageRecord(f"{LABELS[n % 10]}/{n:09d}.jpg", LABELS[n % 10], "") for n in numbers.tolist()]


def state_of(number: int) -> FileState:
    return FileState(f"{number:064x}", 100_000 + number % 1000, number)


def write_rows(writer: StoreWriter, numbers: np.ndarray) -> None:
    """Append the images ``numbers`` as extract does: a pending shard every 512 rows."""
    for start in range(0, len(numbers), SEGMENT_ROWS):
        segment = Segment(NAME, "synthetic", ATTRS, str(ROOT))
        part = numbers[start : start + SEGMENT_ROWS]
        segment.records = records_for(part)
        segment.states = [state_of(n) for n in part.tolist()]
        segment.embeddings = list(POOL[np.arange(start, start + len(part)) % len(POOL)])
        writer.append(segment)


def written_bytes() -> int:
    """Bytes this process has written so far (``wchar``: every write, of files later deleted too)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise KeyError("wchar")


def run(store: EmbeddingStore, listed: np.ndarray, added: np.ndarray, traced: bool = False) -> dict:
    """One extract run's store work on the listing ``listed``: plan, write the ``added`` images, commit."""
    spec = FeatureSpec(NAME, "synthetic", ATTRS)
    writer = store.writer()
    before = written_bytes()
    if traced:
        tracemalloc.start()
    with Memory() as memory:
        records = records_for(listed)  # what discover would list: not timed
        sizes = 100_000 + listed.astype(np.int64) % 1000  # what os.stat would say (state_of)
        started = time.perf_counter()
        work = needed_work(records, sizes, listed.astype(np.int64), writer, [spec])
        planned = time.perf_counter()
        assert len(work) == len(added), (len(work), len(added))
        write_rows(writer, added)
        writer.commit(ROOT, records, {NAME: "synthetic"})
        done = time.perf_counter()
    seconds = done - started
    result = {"seconds": round(seconds, 3), "plan_seconds": round(planned - started, 3),
              "commit_seconds": round(done - planned, 3), "written_mb": round((written_bytes() - before) / 2**20, 1),
              "peak_mb": round(memory.peak / 2**20, 1), "work": len(work)}
    if traced:
        result["traced_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        result["bytes_per_listed_image"] = round(tracemalloc.get_traced_memory()[1] / len(listed), 1)
        tracemalloc.stop()
    return result


def size_row(work: Path, images: int) -> dict:
    """The five operations on a store of ``images`` images."""
    folder = work / f"n{images}"
    shutil.rmtree(folder, ignore_errors=True)
    store = EmbeddingStore(folder / "embeddings.h5")
    numbers = np.arange(images)
    row = {"images": images}
    row["first_commit"] = run(store, numbers, numbers)
    extra = np.arange(images, images + images // 100)
    numbers = np.concatenate([numbers, extra])
    row["add_1_percent"] = run(store, numbers, extra)
    index_written = store.path.stat().st_mtime_ns
    row["no_op"] = run(store, numbers, extra[:0])
    row["no_op"]["index_rewritten"] = store.path.stat().st_mtime_ns != index_written
    rng = np.random.default_rng(1)
    kept = np.sort(rng.permutation(numbers)[len(numbers) // 100 :])
    row["delete_1_percent"] = run(store, kept, extra[:0])
    more = np.arange(numbers[-1] + 1, numbers[-1] + 1 + images // 100)  # once more, traced: the bookkeeping
    row["traced"] = {"add_1_percent": run(store, np.concatenate([kept, more]), more, traced=True)}
    row["traced"]["no_op"] = run(store, np.concatenate([kept, more]), more[:0], traced=True)
    kept = np.sort(rng.permutation(np.concatenate([kept, more]))[len(kept) // 100 :])
    row["traced"]["delete_1_percent"] = run(store, kept, more[:0], traced=True)
    before = written_bytes()
    started = time.perf_counter()
    with Memory() as memory, store.writer() as writer:
        compaction = writer.compact()
    row["compaction"] = {"seconds": round(time.perf_counter() - started, 3),
                         "written_mb": round((written_bytes() - before) / 2**20, 1),
                         "peak_mb": round(memory.peak / 2**20, 1),
                         "shards_rewritten": sum(compaction.rewritten.values())}
    index = store.index(arrays=False).sets[NAME]
    row["store"] = {"shards": len(index.shards), "disk_mb": round(sum(e.bytes for e in index.shards) / 2**20, 1),
                    "index_kb": round(store.path.stat().st_size / 1024, 1)}
    assert store.counts(NAME) == (len(kept), 0)
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


# ---- what the index's aligned rows (rows/path, label, split, sha256) cost ------------------------------------


def rows_row(work: Path, images: int) -> dict:
    """The index with and without its per-row names at ``images`` rows (of 4 floats: the index does not depend on
    the embedding size): bytes, the time to write it, a +1% commit's time, and reading the names with h5py."""
    import h5py

    import pipeline.store.index as index_module

    folder = work / "rows"
    shutil.rmtree(folder, ignore_errors=True)
    store = EmbeddingStore(folder / "embeddings.h5")
    attrs = {**ATTRS, "embedding_dim": 4}
    numbers = np.arange(images)
    with store.writer() as writer:
        for start in range(0, images, 65_536):
            part = numbers[start : start + 65_536]
            segment = Segment(NAME, "synthetic", attrs, str(ROOT), records_for(part), [state_of(n) for n in part],
                              list(np.ones((len(part), 4), np.float32)))
            writer.append(segment)
        writer.commit(ROOT, records_for(numbers), {NAME: "synthetic"})
    index = store.current_index()
    timings = {}
    for named in (True, False):
        real = index_module._write_rows
        if not named:
            index_module._write_rows = lambda *args: None
        try:
            started = time.perf_counter()
            index_module.write_index(folder / f"named-{named}.h5", index, store.shards)
            timings[named] = time.perf_counter() - started
        finally:
            index_module._write_rows = real
    with h5py.File(folder / "named-True.h5") as named:
        started = time.perf_counter()
        paths = named[f"{NAME}/rows/path"].asstr()[()]
        sha256 = named[f"{NAME}/rows/sha256"][()]
        read = time.perf_counter() - started
    assert len(paths) == len(sha256) == images
    extra = np.arange(images, images + images // 100)
    with store.writer() as writer:
        started = time.perf_counter()
        segment = Segment(NAME, "synthetic", attrs, str(ROOT), records_for(extra), [state_of(n) for n in extra],
                          list(np.ones((len(extra), 4), np.float32)))
        writer.append(segment)
        writer.commit(ROOT, records_for(np.concatenate([numbers, extra])), {NAME: "synthetic"})
        commit = time.perf_counter() - started
    row = {"images": images,
           "index_mb_with_rows": round((folder / "named-True.h5").stat().st_size / 2**20, 1),
           "index_mb_without": round((folder / "named-False.h5").stat().st_size / 2**20, 1),
           "write_seconds_with_rows": round(timings[True], 2), "write_seconds_without": round(timings[False], 2),
           "add_1_percent_commit_seconds": round(commit, 2), "read_paths_and_sha256_seconds": round(read, 2)}
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"rows": row}), flush=True)
    return row


# ---- export: memory bounded by a block ---------------------------------------------------------------------------


def export_row(work: Path, images: int, dim: int = 256) -> dict:
    """``transfer store export`` of ``images`` rows of ``dim`` floats to each format: seconds, file size and the peak
    resident memory above what the process held (a block is 8,192 rows: 8 MiB at 256-d)."""
    import pyarrow.parquet  # noqa: F401  (loaded before the measurements: the library's own memory is not the export's)

    from pipeline.store.export import BLOCK_ROWS, EXPORT_FORMATS, export_set

    folder = work / "export"
    shutil.rmtree(folder, ignore_errors=True)
    store = EmbeddingStore(folder / "embeddings.h5")
    attrs = {**ATTRS, "embedding_dim": dim}
    numbers = np.arange(images)
    with store.writer() as writer:
        for start in range(0, images, 16_384):
            part = numbers[start : start + 16_384]
            writer.append(Segment(NAME, "synthetic", attrs, str(ROOT), records_for(part), [state_of(n) for n in part],
                                  list(POOL[part % len(POOL), :dim])))
        writer.commit(ROOT, records_for(numbers), {NAME: "synthetic"})
    row = {"images": images, "dim": dim, "block_mb": round(BLOCK_ROWS * dim * 4 / 2**20, 1),
           "store_mb": round(sum(e.bytes for e in store.index().sets[NAME].shards) / 2**20, 1)}
    for file_format in EXPORT_FORMATS:
        out = folder / f"out.{file_format}"
        started = time.perf_counter()
        with Memory() as memory:
            assert export_set(store, NAME, out, file_format) == images
        row[file_format] = {"seconds": round(time.perf_counter() - started, 1),
                            "peak_mb": round(memory.peak / 2**20, 1), "file_mb": round(out.stat().st_size / 2**20, 1)}
        out.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"export": row}), flush=True)
    return row


# ---- float16 storage: bytes, read speed, fidelity, and what a classifier sees ---------------------------------


def float16_row(work: Path, images: int) -> dict:
    """float32 against float16 storage: shard bytes per row and load speed on ``images`` synthetic 2,048-d rows,
    the cosine of every stored row to its float32 value, and fit's test accuracy on the digit scans scikit-learn
    ships (real images, extracted with the demo's resnet50 at 64 px: random weights, no download) from each."""
    from pipeline.demo import demo_models, write_digits
    from pipeline.extract.run import run_extract
    from pipeline.fit.run import PageOptions, run_fit
    from pipeline.models import ModelRepository

    folder = work / "float16"
    shutil.rmtree(folder, ignore_errors=True)
    numbers = np.arange(images)
    row: dict = {"images": images, "dim": DIM}
    loaded = {}
    for storage in ("float32", "float16"):
        store = EmbeddingStore(folder / f"{storage}.h5")
        attrs = {**ATTRS, "storage": storage}
        with store.writer() as writer:
            for start in range(0, images, SEGMENT_ROWS):
                part = numbers[start : start + SEGMENT_ROWS]
                writer.append(Segment(NAME, "synthetic", attrs, str(ROOT), records_for(part),
                                      [state_of(n) for n in part], list(POOL[part % len(POOL)])))
            writer.commit(ROOT, records_for(numbers), {NAME: "synthetic"})
        started = time.perf_counter()
        loaded[storage] = store.load(NAME).embeddings
        seconds = time.perf_counter() - started
        shard_bytes = sum(e.bytes for e in store.index().sets[NAME].shards)
        row[storage] = {"bytes_per_row": round(shard_bytes / images), "load_rows_per_s": round(images / seconds)}
    exact, half = loaded["float32"], loaded["float16"]
    cosine = (exact * half).sum(axis=1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(half, axis=1))
    row["cosine"] = {"min": float(cosine.min()), "mean": float(cosine.mean())}
    data, models = folder / "digits", folder / "models"
    row["digits"] = {"images": write_digits(data, per_class=1000)}
    demo_models(ModelRepository(models), 64)
    for storage in ("float32", "float16"):
        cache = folder / f"digits-{storage}.h5"
        run_extract(data, models=["resnet50"], cache=cache, models_dir=models, storage=storage, progress=False)
        report = run_fit(cache, out=folder / f"fit-{storage}", classifiers=["logreg"], curve=False, n_jobs=1,
                         page=PageOptions(html=False))
        row["digits"][storage] = {r["features"]: r["test"]["accuracy"] for r in report["results"]}
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"float16": row}), flush=True)
    return row


# ---- the commit path with Ray actors writing the shards ------------------------------------------------------


def synthetic_decode(batch: dict, **_ignored: object) -> dict:
    """Stands in for the decode task: the columns the actor takes, no file read."""
    columns = {key: batch[key] for key in ("index", "record", "size", "mtime", "needed")}
    count = len(batch["index"])
    columns["sha256"] = np.array([f"{int(i):064x}" for i in batch["index"]], dtype=object)
    columns["error"] = np.array([""] * count, dtype=object)
    return columns


class SyntheticActor:
    """Stands in for the embedding actor: synthetic rows, written as pending shards by the store's own code."""

    def __init__(self, target: ShardTarget, **_ignored: object) -> None:
        self.target = target
        self.name = uuid.uuid4().hex[:12]

    def __call__(self, batch: dict) -> dict:
        from dataclasses import asdict

        segment = Segment(NAME, "synthetic", ATTRS, self.target.dataset_root)
        segment.records = [ImageRecord(str(p)) for p in batch["record"]]
        segment.states = [FileState(str(s), int(z), int(m))
                          for s, z, m in zip(batch["sha256"], batch["size"], batch["mtime"])]
        segment.embeddings = list(POOL[np.asarray(batch["index"]) % len(POOL)])
        entry = self.target.write(segment, int(batch["index"][0]), self.name)
        count = len(batch["index"])
        return {"index": batch["index"], "needed": batch["needed"], "sha256": batch["sha256"], "error": batch["error"],
                "shards": np.array([json.dumps([asdict(entry)])] + [""] * (count - 1), dtype=object),
                "providers": np.array([""] * count, dtype=object), "fatal": np.array([""] * count, dtype=object)}


def ray_intake(work: Path, images: int) -> dict:
    """The driver's cost per image when actors write the shards: extract's own Ray loop, record and commit."""
    import ray

    from pipeline.extract import cluster

    cluster.decode_batch, cluster.EmbedActor = synthetic_decode, SyntheticActor  # no files, no model: the store path
    folder = work / "ray"
    shutil.rmtree(folder, ignore_errors=True)
    store = EmbeddingStore(folder / "embeddings.h5")
    writer = store.writer()
    spec = FeatureSpec(NAME, "synthetic", ATTRS)
    records = records_for(np.arange(images))
    items = [WorkItem(r, state_of(n), [NAME]) for n, r in enumerate(records)]
    ray.init(num_cpus=available_cores(), include_dashboard=False, logging_level="WARNING")
    try:
        workers = cluster.Workers(available_cores(), 1, 0.0)
        started, cpu = time.perf_counter(), time.process_time()
        outcomes = cluster.embed_on_ray(ExtractRun([spec], [], 16, items), [str(ROOT / r.path) for r in records],
                                        workers, cluster.ShardOutput(writer, str(ROOT), SEGMENT_ROWS), "cpu", 1)
        for batch_items, hashes, errors, features in outcomes:
            record_batch(batch_items, hashes, errors, features, [spec], {})
        loop_cpu, loop_wall = time.process_time() - cpu, time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        writer.commit(ROOT, records, {NAME: "synthetic"}, cluster.map_on_ray)
        commit_cpu, commit_wall = time.process_time() - cpu, time.perf_counter() - started
    finally:
        ray.shutdown()
    assert store.counts(NAME) == (images, 0) and spec.embedded == images
    row = {"images": images, "actors": available_cores(), "shard_rows": SEGMENT_ROWS,
           "driver_cpu_seconds": round(loop_cpu + commit_cpu, 2), "commit_seconds": round(commit_wall, 2),
           "wall_seconds": round(loop_wall + commit_wall, 2),
           "intake_per_s": round(images / (loop_cpu + commit_cpu)),
           "wall_per_s": round(images / (loop_wall + commit_wall))}
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"ray": row}), flush=True)
    return row


def print_table(result: dict) -> None:
    print(f"\n{'images':>10} {'run':17} {'plan s':>7} {'commit s':>9} {'written MB':>11} {'peak MB':>8} "
          f"{'B/listed image':>15}")
    for row in result["sizes"]:
        for operation in ("first_commit", "add_1_percent", "no_op", "delete_1_percent", "compaction"):
            entry = row[operation]
            per_image = row["traced"].get(operation, {}).get("bytes_per_listed_image", "")
            plan = f"{entry['plan_seconds']:.2f}" if "plan_seconds" in entry else ""
            commit = entry.get("commit_seconds", entry["seconds"])
            print(f"{row['images']:>10,} {operation:17} {plan:>7} {commit:>9.2f} {entry['written_mb']:>11.1f} "
                  f"{entry['peak_mb']:>8.1f} {per_image:>15}")
    for check in result["targets"]:
        print(f"{'met' if check['met'] else 'MISSED':6} {check['target']}: {check['measured']}")


def targets(result: dict) -> list[dict]:
    rows = {row["images"]: row for row in result["sizes"]}
    checks = []
    largest = max(rows)
    alone = rows.get(largest // 100)
    if alone:
        ratio = rows[largest]["add_1_percent"]["commit_seconds"] / alone["first_commit"]["commit_seconds"]
        checks.append({"target": f"+1% commit at {largest:,} within 3x writing those {largest // 100:,} alone",
                       "measured": f"{ratio:.2f}x", "met": ratio <= 3})
    per_image = max(entry["bytes_per_listed_image"] for entry in rows[largest]["traced"].values())
    checks.append({"target": f"bookkeeping <= 300 bytes per listed image at {largest:,}",
                   "measured": f"{per_image:.0f} bytes", "met": per_image <= 300})
    if "ray" in result:
        intake = result["ray"]["intake_per_s"]
        checks.append({"target": "commit-path intake >= 20,000 images/s", "measured": f"{intake:,} images/s",
                       "met": intake >= 20_000})
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ray-images", type=int, default=100_000, help="0: skip the Ray row")
    parser.add_argument("--rows-images", type=int, default=1_000_000, help="0: skip the aligned rows' row")
    parser.add_argument("--export-images", type=int, default=1_000_000, help="0: skip the export row")
    parser.add_argument("--float16-images", type=int, default=100_000, help="0: skip the float16 row")
    parser.add_argument("--work", type=Path, default=Path("build/bench-store"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/bench_store.json"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"cores": available_cores(), "dim": DIM, "segment_rows": SEGMENT_ROWS,
                    "sizes": [size_row(args.work, images) for images in sorted(args.sizes)]}
    if args.rows_images:
        result["rows"] = rows_row(args.work, args.rows_images)
    if args.export_images:
        result["export"] = export_row(args.work, args.export_images)
    if args.float16_images:
        result["float16"] = float16_row(args.work, args.float16_images)
    if args.ray_images:
        result["ray"] = ray_intake(args.work, args.ray_images)
    result["targets"] = targets(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
