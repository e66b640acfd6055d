"""How the neighbor index's approximate kind was chosen: IVF-SQ8 against HNSW-SQ8 on the same rows.

100,000 synthetic 2,048-d rows (1,000 Gaussian clusters, centred and L2-normalised, as the index holds them);
for each kind: build seconds, 1,000 k-nearest queries (k=10; IVF probing 16 cells, HNSW with efSearch 64),
recall@10 against an exhaustive search, bytes per row, and whether FAISS can remove ids from it (deleted rows)
and search it by range (pairs at a threshold). docs/findings.md quotes its output.

    python benchmarks/index_choice.py
"""

from __future__ import annotations

import time

import faiss
import numpy as np

ROWS, DIM, QUERIES = 100_000, 2048, 1_000


def main() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1_000, DIM), dtype=np.float32)
    X = centres[rng.integers(0, 1_000, ROWS)] + rng.standard_normal((ROWS, DIM), dtype=np.float32)
    X -= X.mean(axis=0)
    faiss.normalize_L2(X)
    exhaustive = faiss.IndexFlatIP(DIM)
    exhaustive.add(X)
    _, truth = exhaustive.search(X[:QUERIES], 11)
    for spec in ("IVF256,SQ8", "HNSW32,SQ8"):
        index = faiss.index_factory(DIM, spec, faiss.METRIC_INNER_PRODUCT)
        started = time.perf_counter()
        index.train(X[:10_240])
        index.add(X)
        build = time.perf_counter() - started
        if spec.startswith("IVF"):
            index.nprobe = 16
        else:
            index.hnsw.efSearch = 64
        started = time.perf_counter()
        _, found = index.search(X[:QUERIES], 11)
        query_ms = (time.perf_counter() - started) / QUERIES * 1000
        recall = np.mean([len(set(f[1:]) & set(t[1:])) / 10 for f, t in zip(found, truth)])
        removes = _can(index.remove_ids, faiss.IDSelectorBatch(np.array([1], np.int64)))
        print(f"{spec}: build {build:.1f} s, {query_ms:.2f} ms per query, recall@10 {recall:.3f}, "
              f"{faiss.serialize_index(index).nbytes // ROWS} bytes per row, removes ids: {removes}, "
              f"range search: {_can(index.range_search, X[:4], 0.95)}")


def _can(method, *args) -> str:
    try:
        method(*args)
    except RuntimeError:
        return "no"
    return "yes"


if __name__ == "__main__":
    main()
