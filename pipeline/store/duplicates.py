"""Groups of the same or nearly the same image across a feature set: exact by sha256, near through the neighbor
index at a similarity threshold; what leaks, the report's duplicates and ``transfer duplicates`` are made of."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.store.embedding_store import EmbeddingStore
from pipeline.store.neighbors import Pairs
from pipeline.store.spec import PIXELS

# Cosine similarity of centred, L2-normalised features at or above which two images count as near duplicates
# (docs/report.md has the measurements). On the 32x32 pixels, copies resized to 70% and re-saved as JPEG at
# quality 60 measured >= 0.999 and distinct images at most 0.958 (99.9th percentile; 0.995 for overlapping
# crops of one photo); on a trained backbone's embeddings the threshold is a documented guess: no ImageNet
# weights could be had to measure it.
PIXEL_DUPLICATE = 0.99
NEAR_DUPLICATE = 0.95


def threshold_for(name: str) -> float:
    """The near-duplicate threshold of feature set ``name``: the pixels' measured one, or the embeddings'."""
    return PIXEL_DUPLICATE if name == PIXELS else NEAR_DUPLICATE


def hash_pairs(sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows with the same file hash (``""`` is no hash): each row paired with the first row of its hash,
    ``first < second``."""
    known = np.flatnonzero(np.asarray(sha256, dtype=str) != "")
    hashes = np.asarray(sha256, dtype=str)[known]
    order = np.argsort(hashes, kind="stable")
    hashes, known = hashes[order], known[order]
    starts = np.ones(len(hashes), bool)
    starts[1:] = hashes[1:] != hashes[:-1]
    head = known[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    repeat = ~starts
    return head[repeat].astype(np.int64), known[repeat].astype(np.int64)


@dataclass(frozen=True)
class DuplicateGroups:
    """Images grouped with the copies of them: the members of each group together, largest group first.

    Attributes
    ----------
    group : numpy.ndarray
        int ``[M]``, each member's group (0 is the largest).
    rows : numpy.ndarray
        int ``[M]``, the members' rows.
    similarity : numpy.ndarray
        float ``[M]``, the highest similarity linking the member to another of its group (1.0 for an exact copy).
    exact : numpy.ndarray
        bool ``[M]``: the member's file has the same sha256 as another member's.
    """

    group: np.ndarray
    rows: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray

    @property
    def count(self) -> int:
        """How many groups."""
        return int(self.group.max()) + 1 if len(self.group) else 0

    def images(self) -> int:
        """How many images have a copy."""
        return len(self.rows)


def group_duplicates(rows: int, pairs: Pairs, sha256: np.ndarray) -> DuplicateGroups:
    """The groups that ``pairs`` (near duplicates) and equal ``sha256`` (exact ones) make among ``rows`` rows:
    connected components, so a chain of near copies is one group."""
    same_first, same_second = hash_pairs(sha256)
    first = np.concatenate([pairs.first, same_first])
    second = np.concatenate([pairs.second, same_second])
    similarity = np.concatenate([pairs.similarity, np.ones(len(same_first), np.float32)])
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(rows, rows))
    _, component = connected_components(graph, directed=False)
    linked = np.zeros(rows, np.float32)
    np.maximum.at(linked, first, similarity)
    np.maximum.at(linked, second, similarity)
    exact = np.zeros(rows, bool)
    exact[same_first] = exact[same_second] = True
    members = np.unique(np.concatenate([first, second]))
    sizes = np.bincount(component[members], minlength=rows)
    # largest group first; among equals, the one whose first row comes first
    first_row = np.full(rows, rows, np.int64)
    np.minimum.at(first_row, component[members], members)
    order = np.lexsort((members, first_row[component[members]], -sizes[component[members]]))
    members = members[order]
    _, number = np.unique(-sizes[component[members]] * (rows + 1) + first_row[component[members]],
                          return_inverse=True)
    return DuplicateGroups(number.astype(np.int64), members, linked[members], exact[members])


@dataclass(frozen=True)
class Duplicates:
    """A feature set's duplicate groups with what each member is (see :func:`find_duplicates`)."""

    groups: DuplicateGroups
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    root: str
    name: str
    threshold: float
    method: str
    recall: float
    recall_pairs: int
    untrained: bool
    rows: int


def find_duplicates(store: EmbeddingStore, name: str, threshold: float | None = None,
                    progress: bool | None = False) -> Duplicates:
    """Groups of the same image (sha256) or nearly (similarity at least ``threshold``, default
    :func:`threshold_for`) among feature set ``name``'s rows, through its neighbor index."""
    snapshot = store if store.pinned is not None else store.snapshot()
    threshold = threshold_for(name) if threshold is None else threshold
    stored = snapshot.load(name, embeddings=False)
    pairs, index = snapshot.similar_pairs(name, threshold, progress)
    groups = group_duplicates(len(stored.paths), pairs, stored.sha256)
    label_names = np.append(stored.classes, "").astype(object)
    return Duplicates(
        groups, stored.paths[groups.rows], label_names[stored.labels[groups.rows]], stored.splits[groups.rows],
        stored.root, name, threshold, index.method, pairs.recall, pairs.recall_pairs,
        bool(stored.attrs.get("untrained")), len(stored.paths),
    )
