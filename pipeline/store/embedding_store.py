"""EmbeddingStore: the store's reader, and the one entry point (its :meth:`~EmbeddingStore.writer` writes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store.commit import pending_shards
from pipeline.store.index import Index, open_store_file
from pipeline.store.location import StoreLocation
from pipeline.store.readers import Failures, FeatureSet, RowReader, StoredEmbeddings, load_failures, load_set
from pipeline.store.shards import ShardReader
from pipeline.store.writer import StoreWriter

logger = logging.getLogger(__name__)


class EmbeddingStore(StoreLocation):
    """Embeddings per feature set (one per backbone and precision, plus ``pixels``): an index file and shards.

    The index at ``path`` lists immutable shard files in the folder ``<path>.shards/`` beside it. A run
    writes its rows as shards every few hundred images (its journal: a shard is whole once renamed), then
    commits: a new index listing them, written beside the old one and renamed over it. So the store opens at
    every moment, a killed run keeps every shard it finished (the next commit lists them), a run costs what
    it adds, and files that changed or left the dataset become deleted rows, not rewrites. Compaction
    rewrites shards once they are small or mostly deleted. A format-1 store (one file) is read as it is and
    converted by the first write.

    Parameters
    ----------
    path : path-like
        The index file, e.g. ``features/embeddings.h5``.

    Examples
    --------
    >>> features = EmbeddingStore("features/embeddings.h5").load("resnet50")  # doctest: +SKIP
    >>> features.embeddings.shape, features.classes  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._verified: set[str] = set()  # sha256 of the shards whose bytes this process has checked

    # ---- reading -------------------------------------------------------------------------------------------

    def feature_sets(self) -> list[str]:
        """Names of the feature sets in the store."""
        return sorted(self.index(arrays=False).sets)

    def root_attrs(self) -> dict[str, Any]:
        """The index's root attributes (``format_version``, ``dataset_root``, ...); empty if there is none."""
        if not self.exists():
            return {}
        with open_store_file(self.path) as store:
            return dict(store.attrs)

    def load(self, name: str, embeddings: bool = True) -> FeatureSet:
        """Load one feature set (a backbone name or ``"pixels"``) into memory, rows in store order.

        Without ``embeddings``, only paths, labels and splits are read (``embeddings`` None, ``sha256``
        empty), for streaming the embeddings with :meth:`rows`.

        Raises
        ------
        UserError
            If the store or the feature set does not exist, or a shard is missing or altered.
        """
        index = self._set_index(name)
        self._warn_if_pending(index)
        return load_set(self.shards, self.path, index.sets[name], index.classes, index.dataset_root, embeddings,
                        self._verified)

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

    # ---- writing -------------------------------------------------------------------------------------------

    def writer(self) -> StoreWriter:
        """The object that writes this store (appends, registers workers' shards, commits, compacts); in a
        ``with`` block it holds the store's lock (see :class:`~pipeline.store.writer.StoreWriter`)."""
        return StoreWriter(self)

    # ---- what interrupted runs left ----------------------------------------------------------------------

    def pending_sets(self) -> dict[str, int]:
        """Shards per feature set that interrupted runs wrote and no commit has listed yet."""
        counts: dict[str, int] = {}
        for shard in pending_shards(self.shards, self.index(arrays=False)):
            counts[shard.header.feature_set] = counts.get(shard.header.feature_set, 0) + 1
        return counts

    def pending_roots(self) -> set[str]:
        """Dataset roots of the results interrupted runs left pending."""
        return {p.header.dataset_root for p in pending_shards(self.shards, self.index(arrays=False))}

    # ---- internals -----------------------------------------------------------------------------------------

    def _set_index(self, name: str, arrays: bool = True) -> Index:
        if not self.exists():
            pending = " again to commit the interrupted run's results" if self.shards.exists() else " first"
            raise UserError(f"no embedding store at {self.path}; run extract{pending} (make extract DATA=...).")
        index = self.index(arrays)
        if name not in index.sets:
            present = ", ".join(sorted(index.sets)) or "none"
            raise UserError(f"{self.path} has no {name!r} features (it has: {present}); extract them first.")
        return index

    def _warn_if_pending(self, index: Index) -> None:
        if (self.journal.is_dir() and any(self.journal.iterdir())) or pending_shards(self.shards, index):
            logger.warning(
                f"{self.path} has results of an interrupted run that are not committed yet; run extract again to "
                "commit them."
            )
