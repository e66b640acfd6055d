"""``make bench-findings``: the neighbor index behind leaks, duplicates and ``transfer neighbors``, at 100k and 1M rows.

Synthetic rows that behave like embeddings are written through the real store code: 2,048 floats, Gaussian
clusters (1,000 centres; two rows of a cluster have a centred cosine of about 0.5, of different clusters about
0), 1% planted near copies of another row (centred cosine 0.96 to 0.995) and 0.1% exact copies (the same
vector and sha256); a fifth of the rows are the test part. For each size, through the pipeline's own code:

- ``build``: the neighbor index made from the store (exact up to 50,000 rows, else IVF-SQ8), seconds and peak
  resident memory above what the process held;
- ``pairs``: every pair at the leak threshold (0.95) over all rows, as leaks and duplicates search them, with
  the recall the search measures itself on a seeded sample;
- ``leaks``: the pairs across the training and test parts (fit's own functions), ``duplicates``: the groups;
- ``recall``: of the planted copies (near ones whose centred cosine is at the threshold or above, and exact
  ones), and of each sampled row's true nearest neighbour against an exhaustive search: among the 10 the
  index returns (``transfer neighbors``) and, where that neighbour is at the threshold, among the pairs;
- ``query``: latency of one query for k=10 on the loaded index, and the first query of a new process (index
  read from disk);
- ``add_1_percent``: bringing the index up to a version that adds 1% new rows.

Targets (issue 25): on this machine, the 1M-row leak search and duplicate groups within 10 minutes and 4 GB;
recall >= 0.99 at the leak threshold.

    python benchmarks/bench_findings.py [--sizes 100000 1000000] [--work build/bench-findings]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_store import Memory  # benchmarks/ is on the path: make bench-findings sets it

from pipeline.extract.discover import ImageRecord
from pipeline.files import available_cores
from pipeline.fit import findings
from pipeline.store import EmbeddingStore, FileState, Segment, neighbors
from pipeline.store.duplicates import NEAR_DUPLICATE, group_duplicates
from pipeline.store.readers import Shards

DIM = 2048
NAME = "resnet50"
ATTRS = {"kind": "onnx", "model": NAME, "fingerprint": "synthetic", "embedding_dim": DIM, "weights_id": "synthetic"}
ROOT = Path("/synthetic")
SEGMENT_ROWS = 512  # extract's journal rows
CENTRES = 1_000
NEAR_SHARE, EXACT_SHARE = 0.01, 0.001
SAMPLE_QUERIES = 1_000


class Synthetic:
    """The rows of a store of ``rows`` images: cluster members, near copies and exact copies of earlier rows."""

    def __init__(self, rows: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rows, self.seed = rows, seed
        self.centres = rng.standard_normal((CENTRES, DIM), dtype=np.float32)
        self.cluster = rng.integers(0, CENTRES, rows)
        copies = rng.choice(np.arange(rows // 2, rows), int(rows * (NEAR_SHARE + EXACT_SHARE)), replace=False)
        self.exact_copies = np.sort(copies[: int(rows * EXACT_SHARE)])
        self.near_copies = np.sort(copies[int(rows * EXACT_SHARE) :])
        self.is_exact = np.zeros(rows, bool)
        self.is_exact[self.exact_copies] = True
        self.original = np.full(rows, -1, np.int64)  # a copy's original: a row before half the store, never a copy
        self.original[copies] = rng.integers(0, rows // 2, len(copies))
        # cosine of a near copy with its original: 0.96 to 0.995, by the noise added (|x|^2 is about 2 x DIM)
        cosine = rng.uniform(0.96, 0.995, rows)
        self.noise = np.sqrt(2 / cosine**2 - 2).astype(np.float32)
        self.test = rng.random(rows) < 0.2

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1``; a copy is made from its original's row, regenerated (rows are seeded by number)."""
        return np.stack([self.row(n) for n in range(start, stop)])

    def row(self, number: int) -> np.ndarray:
        original = self.original[number]
        if original < 0:
            rng = np.random.default_rng((self.seed, number))
            return self.centres[self.cluster[number]] + rng.standard_normal(DIM, dtype=np.float32)
        base = self.row(int(original))
        if self.is_exact[number]:
            return base
        rng = np.random.default_rng((self.seed, number, 1))
        return base + self.noise[number] * rng.standard_normal(DIM, dtype=np.float32)

    def sha256(self, number: int) -> str:
        return f"{self.original[number] if self.is_exact[number] else number:064x}"

    def path(self, number: int) -> str:
        return f"class{self.cluster[number] % 10}/{number:09d}.jpg"


def write_store(store: EmbeddingStore, data: Synthetic, numbers: np.ndarray) -> float:
    """Write the rows ``numbers`` as extract does (a shard every 512 rows), then commit every row so far."""
    started = time.perf_counter()
    with store.writer() as writer:
        for start in range(0, len(numbers), SEGMENT_ROWS):
            part = numbers[start : start + SEGMENT_ROWS]
            segment = Segment(NAME, "synthetic", ATTRS, str(ROOT))
            segment.records = [ImageRecord(data.path(n), f"class{data.cluster[n] % 10}",
                                           "test" if data.test[n] else "train") for n in part.tolist()]
            segment.states = [FileState(data.sha256(n), 1000, n) for n in part.tolist()]
            segment.embeddings = list(data.block(int(part[0]), int(part[-1]) + 1))
            writer.append(segment)
        listed = np.arange(int(numbers[-1]) + 1)
        writer.commit(ROOT, [ImageRecord(data.path(n), f"class{data.cluster[n] % 10}",
                                         "test" if data.test[n] else "train") for n in listed.tolist()],
                      {NAME: "synthetic"})
    return time.perf_counter() - started


def timed(function, *args):
    with Memory() as memory:
        started = time.perf_counter()
        result = function(*args)
        seconds = time.perf_counter() - started
    return result, round(seconds, 2), round(memory.peak / 2**20)


def exhaustive_nearest(store: EmbeddingStore, index: neighbors.NeighborIndex, queries: np.ndarray,
                       rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's nearest other row and its similarity, by comparing it with every row (in blocks)."""
    set_index = store.index().sets[NAME]
    shards = Shards(store.shards, store.path, set_index, False)
    try:
        Q = index.centred(neighbors._read_rows(shards, set_index, queries))
        best, best_row = np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
        for numbers, embeddings in neighbors._live_blocks(shards, set_index):
            scores = Q @ index.centred(embeddings).T
            scores[np.equal.outer(queries, numbers)] = -np.inf  # not itself
            top = scores.argmax(axis=1)
            better = scores[np.arange(len(queries)), top] > best
            best[better] = scores[np.arange(len(queries)), top][better]
            best_row[better] = numbers[top][better]
    finally:
        shards.close()
    return best_row, best


def size_row(work: Path, rows: int) -> dict:
    folder = work / f"n{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    store = EmbeddingStore(folder / "embeddings.h5")
    data = Synthetic(rows + rows // 100)
    row: dict = {"rows": rows, "dim": DIM}
    row["write_seconds"] = round(write_store(store, data, np.arange(rows)), 1)
    print(f"{rows}: store written in {row['write_seconds']} s", file=sys.stderr, flush=True)

    index, seconds, peak = timed(store.neighbor_index, NAME)
    row["build"] = {"seconds": seconds, "peak_mb": peak, "method": index.method, "rows": len(index)}
    del index
    print(f"{rows}: built {row['build']}", file=sys.stderr, flush=True)

    (pairs, index), seconds, peak = timed(store.similar_pairs, NAME, NEAR_DUPLICATE)
    row["pairs"] = {"seconds": seconds, "peak_mb": peak, "count": len(pairs), "measured_recall": pairs.recall,
                    "measured_on_pairs": pairs.recall_pairs, "truncated": pairs.truncated}
    print(f"{rows}: pairs {row['pairs']}", file=sys.stderr, flush=True)

    loaded = store.load(NAME, embeddings=False)
    order = np.array([int(Path(p).stem) for p in loaded.paths])  # the store's rows are the data's rows in order
    assert (order == np.arange(rows)).all()
    train = loaded.splits != "test"

    def leak_search(found: neighbors.Pairs) -> findings.Leaks:
        merged = findings.split_pairs([(found, np.arange(rows), NAME)], loaded.sha256)
        return findings.leaks_of(merged, train)

    leaks, seconds, peak = timed(leak_search, pairs)
    row["leaks"] = {"seconds": seconds, "count": len(leaks), "exact": int(leaks.exact.sum())}
    groups, seconds, peak = timed(group_duplicates, rows, pairs, loaded.sha256)
    row["duplicates"] = {"seconds": seconds, "groups": groups.count, "images": groups.images()}
    row["leak_search_and_duplicates_seconds"] = round(row["pairs"]["seconds"] + row["leaks"]["seconds"]
                                                      + row["duplicates"]["seconds"], 1)
    row["with_build_seconds"] = round(row["leak_search_and_duplicates_seconds"] + row["build"]["seconds"], 1)
    row["peak_mb"] = max(row["build"]["peak_mb"], row["pairs"]["peak_mb"])

    found = set(zip(pairs.first.tolist(), pairs.second.tolist()))
    copies = np.concatenate([data.near_copies, data.exact_copies])
    copies = copies[copies < rows]
    planted = [(int(min(c, data.original[c])), int(max(c, data.original[c]))) for c in copies]
    pair_cosine = np.array([float(index.centred(np.stack([data.row(a), data.row(b)])).prod(axis=0).sum())
                            for a, b in planted])
    due = pair_cosine >= NEAR_DUPLICATE
    row["recall"] = {
        "planted_pairs": int(due.sum()),
        "planted": round(float(np.mean([pair in found for pair, d in zip(planted, due) if d])), 4),
    }
    sample = np.sort(np.random.default_rng(1).choice(rows, SAMPLE_QUERIES, replace=False))
    truth, similarity = exhaustive_nearest(store, index, sample, rows)
    queries = store.neighbors(NAME, _rows(store, index, sample), 11)
    returned = [set(r[r != q].tolist()[:10]) for q, r in zip(sample, queries.rows)]
    row["recall"]["nearest_in_10"] = round(float(np.mean([t in r for t, r in zip(truth, returned)])), 4)
    at_threshold = similarity >= NEAR_DUPLICATE
    row["recall"]["nearest_at_threshold"] = round(float(np.mean(
        [(min(q, t), max(q, t)) in found for q, t in zip(sample[at_threshold], truth[at_threshold])])), 4) \
        if at_threshold.any() else None
    row["recall"]["nearest_at_threshold_queries"] = int(at_threshold.sum())

    one = _rows(store, index, sample[:200])
    index.search(one[:1], 10)
    latencies = []
    for query in one:
        started = time.perf_counter()
        index.search(query[None], 10)
        latencies.append(time.perf_counter() - started)
    row["query"] = {"k": 10, "median_ms": round(1000 * float(np.median(latencies)), 2),
                    "p99_ms": round(1000 * float(np.quantile(latencies, 0.99)), 2)}
    cold = subprocess.run([sys.executable, "-c", COLD, str(store.path), NAME], capture_output=True, text=True,
                          check=True)
    row["query"]["new_process_seconds"] = float(cold.stdout.strip())
    del index, pairs, found

    write_store(store, data, np.arange(rows, rows + rows // 100))
    index, seconds, peak = timed(store.neighbor_index, NAME)
    row["add_1_percent"] = {"seconds": seconds, "peak_mb": peak, "rows": len(index)}
    print(f"{rows}: {json.dumps(row)}", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return row


COLD = """
import sys, time
started = time.perf_counter()
import numpy as np
from pipeline.store import EmbeddingStore
store = EmbeddingStore(sys.argv[1])
with store.rows(sys.argv[2]) as rows:
    query = rows.read(0, 1)
store.neighbors(sys.argv[2], query, 10)
print(round(time.perf_counter() - started, 2))
"""


def _rows(store: EmbeddingStore, index: neighbors.NeighborIndex, rows: np.ndarray) -> np.ndarray:
    set_index = store.index().sets[NAME]
    shards = Shards(store.shards, store.path, set_index, False)
    try:
        return neighbors._read_rows(shards, set_index, rows)
    finally:
        shards.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("build/bench-findings"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_findings.json"))
    args = parser.parse_args()
    result = {"cores": available_cores(), "dim": DIM, "exact_rows": neighbors.EXACT_ROWS,
              "pair_probes": neighbors.PAIR_PROBES, "knn_probes": neighbors.KNN_PROBES, "sizes": []}
    for rows in args.sizes:
        result["sizes"].append(size_row(args.work, rows))
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    print(table(result))


def table(result: dict) -> str:
    lines = ["| rows | index | build s | pairs s | leaks + groups s | peak MB | pairs | recall planted | nearest in 10 "
             "| nearest at 0.95 | measured recall | query ms | +1% s |", "|" + "---|" * 13]
    for row in result["sizes"]:
        lines.append(
            f"| {row['rows']:,} | {row['build']['method'].split(' (')[0]} | {row['build']['seconds']} | "
            f"{row['pairs']['seconds']} | {row['leaks']['seconds'] + row['duplicates']['seconds']:.1f} | "
            f"{row['peak_mb']} | {row['pairs']['count']:,} | {row['recall']['planted']} | "
            f"{row['recall']['nearest_in_10']} | {row['recall']['nearest_at_threshold']} | "
            f"{row['pairs']['measured_recall']:.3f} | {row['query']['median_ms']} | "
            f"{row['add_1_percent']['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
