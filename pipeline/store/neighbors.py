"""Nearest neighbors of a feature set's rows: a FAISS index derived from the store and kept beside it.

The index holds each live row's embedding centred on the set's mean and L2-normalised, so inner products are
the cosine similarities the leak and duplicate searches threshold. Up to :data:`EXACT_ROWS` rows it is exact
(a flat inner-product index); above, an inverted file of :func:`lists_for` k-means cells whose vectors are
stored as 8-bit scalars (``IVF<n>,SQ8``: 1 byte per dimension, a quarter of float32), searched in the
:data:`PAIR_PROBES` (pairs at a threshold) or :data:`KNN_PROBES` (k nearest) nearest cells. ``make
bench-findings`` measures both against exact search.

Rows are numbered by where they are stored: each shard gets a block of ids when the index first sees it, a row's
id is its block's first plus its place in the shard. Shards never change, so a later store version costs the
rows of its new shards (read and added) and the rows it deleted (removed); a compaction's new shards are new
rows to the index. The index is rebuilt when the set was computed anew (another fingerprint), when an exact
index grows past :data:`EXACT_ROWS`, or when the set has more than doubled since the build (the mean and the
cells were fitted to the rows then).

Kept in ``<store>.neighbors/``: ``<set>.npz`` (what it covers: fingerprint, version, mean, shards, ids) and
the FAISS file it names; written file first, then the description renamed over the old one. It is derived
data: deleting the folder costs a rebuild, never a result.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from pipeline.files import atomic_path
from pipeline.store.index import SetIndex
from pipeline.store.readers import Layout, Shards

logger = logging.getLogger(__name__)

EXACT_ROWS = 50_000  # up to this many rows the index is exact: a flat search costs N x D per query (measured)
PAIR_PROBES = 2  # cells searched for pairs at a threshold: near duplicates fall in the same cell or the next
KNN_PROBES = 16  # cells searched for the k nearest of a query
TRAIN_PER_LIST = 40  # k-means training rows per cell (FAISS warns below 39)
BLOCK_ROWS = 4096  # rows read, added or searched at a time
QUERY_BLOCK = 1024  # queries of an exact search per matrix product: 1,024 x 50,000 float32 is 200 MB
MAX_PAIRS = 10_000_000  # pairs a threshold search keeps (200 MB); more says more about the threshold than the data
RECALL_QUERIES = 256  # rows an approximate pair search also compares with every row, to measure its recall
FORMAT = 1


def lists_for(rows: int) -> int:
    """Cells of the approximate index for ``rows`` rows: a power of two near sqrt(rows), so each cell holds
    about a thousand rows at a million."""
    return int(2 ** round(np.log2(max(np.sqrt(rows), 16))))


def centred(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Embeddings minus ``mean``, L2-normalised (float32, contiguous). Post-ReLU embeddings all point into one
    orthant, so their raw cosines are close to 1 for any two images; centred ones spread over [-1, 1]."""
    Z = np.asarray(X, np.float32) - mean
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(Z, np.float32)


@dataclass(frozen=True)
class Pairs:
    """Pairs of rows at or above a similarity threshold; ``first < second``, row numbers of the version searched.

    Attributes
    ----------
    truncated : bool
        More than :data:`MAX_PAIRS` passed; the most similar were kept.
    recall : float
        Of the pairs an exhaustive search finds for a seeded sample of :data:`RECALL_QUERIES` rows, the share this
        search found (1.0 for an exact index; NaN when the sample has no pair to find).
    recall_pairs : int
        How many pairs that measure counts.
    """

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray
    truncated: bool = False
    recall: float = 1.0
    recall_pairs: int = 0

    def __len__(self) -> int:
        return len(self.first)


class NeighborIndex:
    """The FAISS index of one feature set at one store version (see the module's docstring).

    Use :func:`neighbor_index` to get one (it loads, brings up to date and saves); row numbers in and out are
    the version's live rows in the order :meth:`EmbeddingStore.load` gives them.

    Attributes
    ----------
    exact : bool
        A flat (exact) index; else an approximate one (IVF, SQ8).
    version : int
        The store version whose rows it holds.
    """

    def __init__(self, faiss_index: object, mean: np.ndarray, shards: dict[str, tuple[int, int]], present: np.ndarray,
                 fingerprint: str, version: int, built_rows: int) -> None:
        self.index, self.mean, self.shards, self.present = faiss_index, mean, shards, present
        self.fingerprint, self.version, self.built_rows = fingerprint, version, built_rows
        self.row_of_id = np.zeros(0, np.int64)  # set by a sync: id -> row of the version, -1 when not live

    @property
    def exact(self) -> bool:
        return _ivf(self.index) is None

    @property
    def method(self) -> str:
        """The search in words, for the outputs that report it."""
        if self.exact:
            return "exact (flat inner product)"
        return f"approximate (FAISS IVF{_ivf(self.index).nlist},SQ8, {PAIR_PROBES} of its cells searched per query)"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def centred(self, embeddings: np.ndarray) -> np.ndarray:
        """``embeddings`` as the index holds them: :func:`centred` on the set's mean."""
        return centred(embeddings, self.mean)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` stored rows most similar to each of ``embeddings`` ``[Q, D]``.

        Returns
        -------
        similarity, rows : numpy.ndarray
            ``[Q, k]`` cosine similarities (highest first) and row numbers; -1 rows (similarity ``-inf``) where
            fewer than ``k`` were found.
        """
        queries = self.centred(embeddings)
        if self.exact:
            similarity, ids = self._exact_search(queries, k)
        else:
            _set_probes(self.index, KNN_PROBES)
            similarity, ids = self.index.search(queries, k)
        rows = self._rows(ids)
        return np.where(rows >= 0, similarity, -np.inf).astype(np.float32), rows

    def pairs(self, store_shards: Shards, set_index: SetIndex, threshold: float,
              progress: bool | None = False) -> Pairs:
        """Every pair of the version's rows whose similarity is at least ``threshold``, each once; read from the
        shards in blocks (memory: a block and the pairs found). An approximate index also measures its recall
        (see :class:`Pairs`): a seeded sample of rows is compared with every block exhaustively on the way."""
        _set_probes(self.index, PAIR_PROBES)
        rows = int(set_index.counts()[0])
        sample = np.zeros(0, np.int64)
        if not self.exact:
            sample = np.sort(np.random.default_rng(0).choice(rows, min(RECALL_QUERIES, rows), replace=False))
        checked = self.centred(_read_rows(store_shards, set_index, sample)) if len(sample) else None
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        exhaustive: list[np.ndarray] = []  # pairs of sample rows found exhaustively, as low * rows + high
        kept, truncated = 0, False
        with tqdm(total=rows, unit="row", desc="pairs", disable=_hidden(progress)) as bar:
            for numbers, embeddings in _live_blocks(store_shards, set_index):
                queries = self.centred(embeddings)
                query, ids, scores = self._range_search(queries, threshold)
                found.append(_ordered(numbers[query], self._rows(ids), scores))
                kept += len(found[-1][0])
                if checked is not None:
                    block, column = np.nonzero(queries @ checked.T >= threshold)
                    low, high, _ = _ordered(numbers[block], sample[column], np.zeros(len(block)))
                    exhaustive.append(low * rows + high)
                bar.update(len(numbers))
                if kept > 2 * MAX_PAIRS:  # keep memory bounded; the most similar are kept below
                    truncated = True
                    break
        low, high, score = (np.concatenate(part) for part in zip(*found)) if found else (np.zeros(0, np.int64),) * 3
        low, high, score = _unique_pairs(low, high, score)
        if len(low) > MAX_PAIRS:
            truncated = True
            top = np.argsort(-score, kind="stable")[:MAX_PAIRS]
            low, high, score = low[top], high[top], score[top]
        recall, counted = 1.0, 0
        if checked is not None and not truncated:
            truth = np.unique(np.concatenate(exhaustive)) if exhaustive else np.zeros(0, np.int64)
            counted = len(truth)
            recall = float(np.isin(truth, low * rows + high).mean()) if counted else float("nan")
        return Pairs(low, high, score, truncated, recall, counted)

    def _range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query positions, ids, similarities)`` of every stored row at ``threshold`` or above. An exact index is
        searched as matrix products (BLAS: 4x FAISS's flat range search here)."""
        if not self.exact:
            limits, scores, ids = self.index.range_search(queries, threshold)
            return np.repeat(np.arange(len(queries)), np.diff(limits).astype(np.int64)), ids, scores
        vectors, ids = self._flat()
        parts = []
        for start in range(0, len(queries), QUERY_BLOCK):
            scores = queries[start : start + QUERY_BLOCK] @ vectors.T
            query, column = np.nonzero(scores >= threshold)
            parts.append((query + start, ids[column], scores[query, column]))
        return tuple(np.concatenate(column) for column in zip(*parts)) if parts else (np.zeros(0, np.int64),) * 3

    def _exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored rows of each query by matrix products: ``(similarities, ids)``."""
        vectors, ids = self._flat()
        similarity = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        take = min(k, len(ids))
        for start in range(0, len(queries) if take else 0, QUERY_BLOCK):
            scores = queries[start : start + QUERY_BLOCK] @ vectors.T
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < len(ids) else \
                np.broadcast_to(np.arange(take), (len(scores), take))
            best = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-best, axis=1, kind="stable")
            similarity[start : start + len(scores), :take] = np.take_along_axis(best, order, axis=1)
            found[start : start + len(scores), :take] = ids[np.take_along_axis(top, order, axis=1)]
        return similarity, found

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact index's vectors ``[n, D]`` (a view of FAISS's own memory) and their ids."""
        flat = faiss.downcast_index(self.index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        return vectors, faiss.vector_to_array(self.index.id_map)

    # ---- bringing it up to a version ---------------------------------------------------------------------------

    def sync(self, store_shards: Shards, set_index: SetIndex, version: int, progress: bool | None = False) -> bool:
        """Hold exactly the live rows of ``set_index`` (the store at ``version``): add new shards' rows, remove
        deleted ones. Returns whether anything changed."""
        expected = self._expected_ids(set_index)
        stale = np.flatnonzero(self.present & ~np.isin(np.arange(len(self.present)), expected))
        if len(stale):
            self.index.remove_ids(faiss.IDSelectorBatch(stale.astype(np.int64)))
            self.present[stale] = False
        missing = expected[~self.present[expected]] if len(self.present) else expected
        if len(missing):
            self._add(store_shards, set_index, missing, progress)
        self.row_of_id = np.full(len(self.present), -1, np.int64)
        self.row_of_id[expected] = np.arange(len(expected))
        changed = bool(len(stale) or len(missing)) or version != self.version
        self.version = version
        return changed

    def _expected_ids(self, set_index: SetIndex) -> np.ndarray:
        """The ids of the set's live rows, in row order; shards new to the index get their blocks of ids."""
        listed = {_shard_key(entry.file, entry.group) for entry in set_index.shards}
        self.shards = {key: block for key, block in self.shards.items() if key in listed}  # ids are never reused
        ids = []
        for entry, local in zip(set_index.shards, Layout(set_index).local):
            key = _shard_key(entry.file, entry.group)
            if key not in self.shards:
                self.shards[key] = (len(self.present), entry.rows)
                self.present = np.concatenate([self.present, np.zeros(entry.rows, bool)])
            ids.append(self.shards[key][0] + local)
        return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)

    def _add(self, store_shards: Shards, set_index: SetIndex, ids: np.ndarray, progress: bool | None) -> None:
        by_shard = {first: number for number, (first, _) in enumerate(
            self.shards[_shard_key(e.file, e.group)] for e in set_index.shards)}
        firsts = np.array(sorted(by_shard), np.int64)
        shard_first = firsts[np.searchsorted(firsts, ids, side="right") - 1]
        with tqdm(total=len(ids), unit="row", desc="neighbor index", disable=_hidden(progress)) as bar:
            for first in np.unique(shard_first):
                local = ids[shard_first == first] - first
                reader = store_shards[by_shard[int(first)]]
                for start in range(0, len(local), BLOCK_ROWS):
                    block = local[start : start + BLOCK_ROWS]
                    self.index.add_with_ids(self.centred(reader.embeddings(block)), block + first)
                    bar.update(len(block))
        self.present[ids] = True

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        inside = (ids >= 0) & (ids < len(self.row_of_id))
        return np.where(inside, self.row_of_id[np.where(inside, ids, 0)], -1)


# ---- building, loading, saving -------------------------------------------------------------------------------


def neighbor_index(folder: Path, name: str, store_shards: Shards, set_index: SetIndex, version: int,
                    progress: bool | None = False) -> NeighborIndex:
    """The neighbor index of feature set ``name`` at ``version``, up to date: loaded from ``folder`` (the store's
    ``.neighbors`` folder) and brought up to that version, or built (streaming from the shards) when there is
    none or it must be rebuilt; saved again when it changed.

    Parameters
    ----------
    store_shards : Shards
        The set's shards at ``version``, opened for reading.
    """
    rows = int(set_index.counts()[0])
    kept = _load(folder, name)
    if kept is not None and _must_rebuild(kept, set_index, rows):
        logger.info(f"rebuilding the neighbor index of {name}: its rows changed too much since it was built")
        kept = None
    if kept is None:
        kept = _build(store_shards, set_index, rows, progress)
    if kept.sync(store_shards, set_index, version, progress) or not _path(folder, name).exists():
        _save(kept, folder, name)
    return kept


def _must_rebuild(kept: NeighborIndex, set_index: SetIndex, rows: int) -> bool:
    return (kept.fingerprint != set_index.fingerprint or (kept.exact and rows > EXACT_ROWS)
            or rows > 2 * max(kept.built_rows, 1) or kept.index.d != set_index.dim)


def _build(store_shards: Shards, set_index: SetIndex, rows: int, progress: bool | None) -> NeighborIndex:
    """An empty index whose mean (and cells, for an approximate one) are fitted to the set's rows, read once."""
    dim = set_index.dim
    lists = lists_for(rows)
    sample_rows = 0 if rows <= EXACT_ROWS else min(rows, lists * TRAIN_PER_LIST)
    chosen = np.zeros(rows, bool)
    chosen[np.random.default_rng(0).choice(rows, sample_rows, replace=False)] = True
    total, sample = np.zeros(dim, np.float64), []
    with tqdm(total=rows, unit="row", desc="neighbor index: mean", disable=_hidden(progress)) as bar:
        for numbers, embeddings in _live_blocks(store_shards, set_index):
            total += embeddings.sum(axis=0, dtype=np.float64)
            sample.append(embeddings[chosen[numbers]])
            bar.update(len(numbers))
    mean = (total / max(rows, 1)).astype(np.float32)
    if rows <= EXACT_ROWS:
        faiss_index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        faiss_index = faiss.index_factory(dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
        logger.info(f"training the neighbor index's {lists} cells on {sample_rows} rows")
        faiss_index.train(centred(np.concatenate(sample), mean))
    return NeighborIndex(faiss_index, mean, {}, np.zeros(0, bool), set_index.fingerprint, -1, rows)


def _live_blocks(store_shards: Shards, set_index: SetIndex) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(row numbers, float32 embeddings)`` of the set's live rows, a block at a time, in row order."""
    layout = Layout(set_index)
    for number, local in enumerate(layout.local):
        for begin in range(0, len(local), BLOCK_ROWS):
            block = local[begin : begin + BLOCK_ROWS]
            start = int(layout.starts[number]) + begin
            yield np.arange(start, start + len(block), dtype=np.int64), store_shards[number].embeddings(block)


def _read_rows(store_shards: Shards, set_index: SetIndex, rows: np.ndarray) -> np.ndarray:
    """float32 embeddings of the set's live rows ``rows`` (sorted row numbers)."""
    layout = Layout(set_index)
    parts = []
    for number, local in enumerate(layout.local):
        start, stop = layout.starts[number], layout.starts[number + 1]
        wanted = rows[(rows >= start) & (rows < stop)] - start
        if len(wanted):
            parts.append(store_shards[number].embeddings(local[wanted]))
    return np.concatenate(parts) if parts else np.zeros((0, set_index.dim), np.float32)


def _ordered(query: np.ndarray, found: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of a query row and a row found, as ``(lower, higher, score)``; a row with itself, or with none (-1),
    left out."""
    other = (found >= 0) & (found != query)
    return np.minimum(query, found)[other], np.maximum(query, found)[other], scores[other]


def _unique_pairs(low: np.ndarray, high: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair once (found from both sides, or once where an approximate search missed a side), its highest
    score kept."""
    order = np.lexsort((-score, high, low))
    low, high, score = low[order].astype(np.int64), high[order].astype(np.int64), score[order].astype(np.float32)
    keep = np.ones(len(low), bool)
    keep[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
    return low[keep], high[keep], np.minimum(score[keep], 1.0)


def _path(folder: Path, name: str) -> Path:
    """The description of set ``name``'s index: a file name any set name can have."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return folder / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.npz"


def _load(folder: Path, name: str) -> NeighborIndex | None:
    path = _path(folder, name)
    try:
        with np.load(path, allow_pickle=False) as kept:
            if int(kept["format"]) != FORMAT:
                return None
            faiss_index = faiss.read_index(str(folder / str(kept["faiss_file"])))
            shards = {str(k): (int(f), int(n)) for k, f, n in zip(kept["shard_keys"], kept["shard_first"],
                                                                  kept["shard_rows"])}
            return NeighborIndex(faiss_index, kept["mean"], shards, kept["present"], str(kept["fingerprint"]),
                                  int(kept["version"]), int(kept["built_rows"]))
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        if path.exists():
            logger.warning(f"{path} could not be read ({error}); building the neighbor index again")
        return None


def _save(kept: NeighborIndex, folder: Path, name: str) -> None:
    """The FAISS file under a new name, then the description naming it renamed over the old one, then older FAISS
    files of the set removed. A folder that cannot be written costs a rebuild next time, nothing else."""
    path = _path(folder, name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        faiss_file = f"{path.stem}.{uuid.uuid4().hex[:12]}.faiss"
        faiss.write_index(kept.index, str(folder / faiss_file))
        keys = list(kept.shards)
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            np.savez(stream, format=FORMAT, faiss_file=faiss_file, mean=kept.mean, present=kept.present,
                     shard_keys=np.array(keys, dtype=str), fingerprint=kept.fingerprint, version=kept.version,
                     shard_first=np.array([kept.shards[k][0] for k in keys], np.int64),
                     shard_rows=np.array([kept.shards[k][1] for k in keys], np.int64), built_rows=kept.built_rows)
        for older in folder.glob(f"{path.stem}.*.faiss"):
            if older.name != faiss_file:
                older.unlink(missing_ok=True)
    except OSError as error:
        logger.warning(f"the neighbor index could not be kept in {folder} ({error}); it is built again next time")


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def _shard_key(file: str, group: str) -> str:
    return f"{file}#{group}"


def _ivf(faiss_index: object) -> object | None:
    try:
        return faiss.extract_index_ivf(faiss_index)
    except RuntimeError:
        return None


def _set_probes(faiss_index: object, probes: int) -> None:
    ivf = _ivf(faiss_index)
    if ivf is not None:
        ivf.nprobe = min(probes, ivf.nlist)

