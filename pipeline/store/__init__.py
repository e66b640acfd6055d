"""The embedding store: an HDF5 index over immutable HDF5 shards, written crash-safely by every worker.

Modules, one role each: :mod:`~pipeline.store.spec` (the format and its written spec),
:mod:`~pipeline.store.shards` (shard files), :mod:`~pipeline.store.index` (the index file),
:mod:`~pipeline.store.commit` (pending shards, planning state, commit), :mod:`~pipeline.store.compact`
(compaction), :mod:`~pipeline.store.readers` (loading, streaming, lookup by hash),
:mod:`~pipeline.store.legacy` (format 1), :mod:`~pipeline.store.location` (a store's files and current
index), :mod:`~pipeline.store.embedding_store` (the public class, which reads),
:mod:`~pipeline.store.writer` (the one object that writes: appends, workers' shards, commits, compaction),
:mod:`~pipeline.store.neighbors` (the FAISS index of a set's rows derived from the store, kept beside it).
"""

from pipeline.store.commit import Known, Segment
from pipeline.store.embedding_store import EmbeddingStore, Neighbors
from pipeline.store.location import StoreLocation
from pipeline.store.neighbors import NeighborIndex, Pairs
from pipeline.store.readers import Failures, FeatureSet, RowReader
from pipeline.store.shards import ShardEntry
from pipeline.store.spec import FORMAT_VERSION, PIXELS, FileState
from pipeline.store.writer import Compaction, ShardTarget, StoreWriter

__all__ = [
    "FORMAT_VERSION", "PIXELS", "Compaction", "EmbeddingStore", "Failures", "FeatureSet", "FileState", "Known",
    "NeighborIndex", "Neighbors", "Pairs", "RowReader", "Segment", "ShardEntry", "ShardTarget", "StoreLocation",
    "StoreWriter",
]
