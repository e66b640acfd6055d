"""EmbeddingStore: the store's reader, and the one entry point (its :meth:`~EmbeddingStore.writer` writes)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store.commit import pending_shards
from pipeline.store.index import Index, open_store_file
from pipeline.store.location import StoreLocation
from pipeline.store.neighbors import NeighborIndex, Pairs, neighbor_index
from pipeline.store.readers import Failures, FeatureSet, RowReader, Shards, StoredEmbeddings, load_failures, load_set
from pipeline.store.shards import ShardReader
from pipeline.store.spec import PIXELS
from pipeline.store.writer import StoreWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbors:
    """The stored images nearest to each query (see :meth:`EmbeddingStore.neighbors`); arrays ``[Q, k]``, most
    similar first, ``rows`` -1 (and empty strings) where fewer than ``k`` rows are stored."""

    similarity: np.ndarray
    rows: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    root: str
    version: int
    exact: bool

    @classmethod
    def of(cls, stored: FeatureSet, similarity: np.ndarray, rows: np.ndarray, exact: bool) -> Neighbors:
        """A search's ``similarity`` and ``rows`` (:meth:`NeighborIndex.search`) with what ``stored`` (the set
        loaded without embeddings) says of each row."""
        label_names = np.append(stored.classes, "").astype(object)  # -1 (no row, no label) picks the ""
        return cls(similarity, rows, np.append(stored.paths, "").astype(object)[rows],
                   label_names[np.append(stored.labels, -1)[rows]], np.append(stored.splits, "").astype(object)[rows],
                   stored.root, stored.version, exact)


class EmbeddingStore(StoreLocation):
    """Embeddings per feature set (one per backbone and precision, plus ``pixels``): an index file and shards.

    The index at ``path`` lists immutable shard files in the folder ``<path>.shards/`` beside it. A run
    writes its rows as shards every few hundred images (its journal: a shard is whole once renamed), then
    commits: a new index listing them, written beside the old one and renamed over it. So the store opens at
    every moment, a killed run keeps every shard it finished (the next commit lists them), a run costs what
    it adds, and files that changed or left the dataset become deleted rows, not rewrites. Compaction
    rewrites shards once they are small or mostly deleted. A format-1 store (one file) is read as it is and
    converted by the first write.

    Every commit is a version. Each read (a load, a stream of rows, a lookup) reads one version whole, the
    current one when it starts, even while other processes commit and compact: the versions a commit
    supersedes, and their shards, are kept for a retention period (see :meth:`StoreWriter.cleanup`). A
    store opened at a ``version`` (or ``PATH@N``), or :meth:`snapshot`, reads that version at every call.

    Parameters
    ----------
    path : path-like
        The index file, e.g. ``features/embeddings.h5``; ``features/embeddings.h5@12`` reads version 12.
    version : int, optional
        The version to read (default: the current one at each read).

    Examples
    --------
    >>> features = EmbeddingStore("features/embeddings.h5").load("resnet50")  # doctest: +SKIP
    >>> features.embeddings.shape, features.classes  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, version: int | None = None) -> None:
        super().__init__(path)
        if version is not None:
            self.pinned = version
        self._verified: set[str] = set()  # sha256 of the shards whose bytes this process has checked

    # ---- reading -------------------------------------------------------------------------------------------

    def index(self, arrays: bool = True) -> Index:
        """The index of the version this reads: the one it was opened at, else the current one."""
        if self.pinned is None:
            return self.current_index(arrays)
        return self.version_index(self.pinned, arrays)

    def snapshot(self) -> EmbeddingStore:
        """This store at the version it reads now, for reads that must all see the same rows (fit, a report).

        Raises
        ------
        UserError
            When there is no store (see :meth:`load`).
        """
        if not self.exists():
            self._set_index(PIXELS)  # the store's own "run extract first" error
        return EmbeddingStore(self.path, self.index(arrays=False).version)

    def index_file(self) -> Path:
        """The file that holds the index of the version this reads (the store's own file for the current one)."""
        if self.pinned is None or self.current_index(arrays=False).version == self.pinned:
            return self.path
        self.version_index(self.pinned, arrays=False)  # one sentence when it is not kept
        return self.version_file(self.pinned)

    @property
    def described(self) -> str:
        """The store as a command names it: its path, and ``@N`` when opened at a version."""
        return f"{self.path}@{self.pinned}" if self.pinned is not None else str(self.path)

    def feature_sets(self) -> list[str]:
        """Names of the feature sets in the store."""
        return sorted(self.index(arrays=False).sets)

    def root_attrs(self) -> dict[str, Any]:
        """The index's root attributes (``format_version``, ``dataset_root``, ...); empty if there is none."""
        if not self.exists():
            return {}
        with open_store_file(self.index_file()) as store:
            return dict(store.attrs)

    def load(self, name: str, embeddings: bool = True) -> FeatureSet:
        """Load one feature set (a backbone name or ``"pixels"``) into memory, rows in store order.

        Without ``embeddings``, only paths, hashes, labels and splits are read (``embeddings`` None), for
        streaming the embeddings with :meth:`rows`.

        Raises
        ------
        UserError
            If the store or the feature set does not exist, or a shard is missing or altered.
        """
        index = self._set_index(name)
        self._warn_if_pending(index)
        loaded = load_set(self.shards, self.path, index.sets[name], index.classes, index.dataset_root, embeddings,
                          self._verified)
        return dataclasses.replace(loaded, version=index.version)

    def failures(self, name: str) -> Failures:
        """The files of feature set ``name`` that could not be decoded, with their reasons."""
        index = self._set_index(name, arrays=False)
        return load_failures(self.shards, self.path, index.sets[name])

    @contextlib.contextmanager
    def rows(self, name: str) -> Iterator[RowReader]:
        """The live rows of feature set ``name``, for reading in blocks across shards (see :class:`RowReader`)."""
        reader = RowReader(self.shards, self.path, self._set_index(name, arrays=False).sets[name], self._verified)
        try:
            yield reader
        finally:
            reader.close()

    def lookup(self, name: str, fingerprint: str) -> Mapping[str, np.ndarray]:
        """Stored embeddings of feature set ``name`` by content hash, when computed with ``fingerprint``.

        No embedding is read until one is asked for; empty when the store or set is absent or was computed
        with another model file.
        """
        set_index = self.index(arrays=False).sets.get(name)
        if set_index is None or set_index.fingerprint != fingerprint:
            return {}
        return StoredEmbeddings(self.shards, self.path, set_index, self._verified)

    def counts(self, name: str) -> tuple[int, int]:
        """``(rows, failures)`` of feature set ``name``; ``(0, 0)`` when it is absent."""
        set_index = self.index(arrays=False).sets.get(name)
        return set_index.counts() if set_index else (0, 0)

    def load_attrs(self, name: str) -> dict[str, Any]:
        """The attributes of feature set ``name`` (how its rows were computed)."""
        return dict(self._set_index(name, arrays=False).sets[name].attrs)

    def verify(self) -> int:
        """Check every listed shard's size and sha256; returns how many were checked.

        Raises
        ------
        UserError
            Naming the first shard that is missing or altered, and how to recover.
        """
        checked = 0
        for set_index in self.index(arrays=False).sets.values():
            for entry in set_index.shards:
                ShardReader(self.shards, entry, self.path, verify=True).close()
                checked += 1
        return checked

    # ---- neighbors -----------------------------------------------------------------------------------------

    def neighbor_index(self, name: str, progress: bool | None = False) -> NeighborIndex:
        """The FAISS index of feature set ``name``'s rows at the version this reads, kept in ``<path>.neighbors/``:
        built on first use (streaming from the shards), then brought up to each later version by adding new
        shards' rows and removing deleted ones (see :mod:`pipeline.store.neighbors`)."""
        index = self._set_index(name)
        shards = Shards(self.shards, self.path, index.sets[name], True, self._verified)
        try:
            return neighbor_index(self.neighbors_folder, name, shards, index.sets[name], index.version, progress)
        finally:
            shards.close()

    def similar_pairs(self, name: str, threshold: float, progress: bool | None = False) -> tuple[Pairs, NeighborIndex]:
        """Every pair of feature set ``name``'s rows (numbered as :meth:`load` gives them) whose cosine similarity
        of centred, L2-normalised embeddings is at least ``threshold``, through its neighbor index; and the index
        (its ``exact`` and ``method`` say which search ran)."""
        index = self._set_index(name)  # one version throughout: the one opened, else the current one now
        set_index = index.sets[name]
        shards = Shards(self.shards, self.path, set_index, True, self._verified)
        try:
            found = neighbor_index(self.neighbors_folder, name, shards, set_index, index.version, progress)
            return found.pairs(shards, set_index, threshold, progress), found
        finally:
            shards.close()

    def neighbors(self, name: str, queries: np.ndarray, k: int = 10, progress: bool | None = False) -> Neighbors:
        """The ``k`` stored images of feature set ``name`` most similar to each of the embeddings ``queries``
        ``[Q, D]`` (computed with the set's model), by cosine similarity of centred, L2-normalised embeddings.
        The index is built on first use (``progress``: a bar while it is; None, when stderr is a terminal).

        Examples
        --------
        >>> store = EmbeddingStore("features/embeddings.h5")  # doctest: +SKIP
        >>> found = store.neighbors("resnet50", store.load("resnet50").embeddings[:1], k=5)  # doctest: +SKIP
        >>> found.paths[0][0], found.similarity[0][0]  # the image itself, 1.0  # doctest: +SKIP
        """
        snapshot = self if self.pinned is not None else self.snapshot()
        found = snapshot.neighbor_index(name, progress)
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != found.index.d:
            raise UserError(f"the queries have {queries.shape[1]} values each and {self.described}'s {name} "
                            f"embeddings {found.index.d}; embed them with the model of that set.")
        return Neighbors.of(snapshot.load(name, embeddings=False), *found.search(queries, k), found.exact)

    # ---- writing -------------------------------------------------------------------------------------------

    def writer(self) -> StoreWriter:
        """The object that writes this store (appends, registers workers' shards, commits, compacts); in a
        ``with`` block it holds the store's lock (see :class:`~pipeline.store.writer.StoreWriter`)."""
        return StoreWriter(self)

    # ---- what interrupted runs left ----------------------------------------------------------------------

    def pending_sets(self) -> dict[str, int]:
        """Shards per feature set that interrupted runs wrote and no commit has listed yet."""
        counts: dict[str, int] = {}
        for shard in pending_shards(self.shards, self.current_index(arrays=False)):
            counts[shard.header.feature_set] = counts.get(shard.header.feature_set, 0) + 1
        return counts

    def pending_roots(self) -> set[str]:
        """Dataset roots of the results interrupted runs left pending."""
        return {p.header.dataset_root for p in pending_shards(self.shards, self.current_index(arrays=False))}

    # ---- internals -----------------------------------------------------------------------------------------

    def _set_index(self, name: str, arrays: bool = True) -> Index:
        if not self.exists():
            pending = " again to commit the interrupted run's results" if self.shards.exists() else " first"
            raise UserError(f"no embedding store at {self.path}; run extract{pending} (make extract DATA=...).")
        index = self.index(arrays)
        if name not in index.sets:
            present = ", ".join(sorted(index.sets)) or "none"
            raise UserError(f"{self.described} has no {name!r} features (it has: {present}); extract them first.")
        return index

    def _warn_if_pending(self, index: Index) -> None:
        if self.pinned is not None:
            return  # a version's rows, whatever came after it
        if (self.journal.is_dir() and any(self.journal.iterdir())) or pending_shards(self.shards, index):
            logger.warning(
                f"{self.path} has results of an interrupted run that are not committed yet; run extract again to "
                "commit them."
            )
