"""What the report shows beyond scores: leaks across the split, likely label errors, a map of the embeddings
(the pairs behind leaks come from the store's neighbor index: :mod:`pipeline.store.neighbors`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import Pipeline

from pipeline.fit.heads import stratified_folds
from pipeline.store import Pairs
from pipeline.store.duplicates import hash_pairs

MAP_POINTS = 3_000  # the 2-D map shows at most this many images
MAX_PAIRS = 100_000  # leaks kept (the closest); a threshold that lets more through says more about the features


@dataclass
class SplitPairs:
    """Pairs of the split's rows that are the same image or nearly, each once (``first < second``), merged across
    the searches: the highest similarity, and what found it (``sha256`` for an exact duplicate, else the feature
    set)."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    def as_pairs(self) -> Pairs:
        return Pairs(self.first, self.second, self.similarity)


@dataclass
class Leaks:
    """Pairs of images, one in the training part and one held out, that are the same image or nearly.

    ``held_out`` and ``train`` are row numbers of the split; ``similarity`` is 1.0 for an exact duplicate.
    """

    held_out: np.ndarray
    train: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    source: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # what found each pair
    truncated: bool = False  # more than MAX_PAIRS pairs passed the threshold; the closest are kept

    def __len__(self) -> int:
        return len(self.held_out)


def split_pairs(found: list[tuple[Pairs, np.ndarray, str]], sha256: np.ndarray) -> SplitPairs:
    """The pairs each search found, in the split's rows, merged with the pairs of equal ``sha256`` (the split's).

    Parameters
    ----------
    found : list of (Pairs, numpy.ndarray, str)
        Per feature set searched: its pairs (its rows), the split row of each of its rows (-1 outside the
        split), and its name.
    """
    same_first, same_second = hash_pairs(sha256)
    parts = [(same_first, same_second, np.ones(len(same_first)), np.ones(len(same_first), bool),
              np.full(len(same_first), "sha256", dtype=object))]
    for pairs, split_row, source in found:
        first, second = split_row[pairs.first], split_row[pairs.second]
        inside = (first >= 0) & (second >= 0)
        low, high = np.minimum(first, second)[inside], np.maximum(first, second)[inside]
        parts.append((low, high, pairs.similarity[inside].astype(float), np.zeros(len(low), bool),
                      np.full(len(low), source, dtype=object)))
    first, second, similarity, exact, source = (np.concatenate(column) for column in zip(*parts))
    order = np.lexsort((~exact, -similarity, second, first))  # per pair: exact first, then the most similar
    first, second, similarity, exact, source = (a[order] for a in (first, second, similarity, exact, source))
    keep = np.ones(len(first), bool)
    keep[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return SplitPairs(first[keep].astype(np.int64), second[keep].astype(np.int64), similarity[keep], exact[keep],
                      source[keep])


def leaks_of(pairs: SplitPairs, train: np.ndarray) -> Leaks:
    """The pairs with one image in the training part and one held out (validation or test), the closest first
    (exact duplicates before near ones of the same similarity); at most :data:`MAX_PAIRS`."""
    cross = train[pairs.first] != train[pairs.second]
    held = np.where(train[pairs.first], pairs.second, pairs.first)[cross]
    other = np.where(train[pairs.first], pairs.first, pairs.second)[cross]
    similarity, exact, source = pairs.similarity[cross], pairs.exact[cross], pairs.source[cross]
    order = np.lexsort((~exact, -similarity))[:MAX_PAIRS]
    return Leaks(held[order], other[order], similarity[order], exact[order], source[order],
                 truncated=len(held) > MAX_PAIRS)


def out_of_fold_probabilities(pipeline: Pipeline, X: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Class probabilities of each training image from a copy of ``pipeline`` (its chosen settings) fitted on
    the other folds: what the classifier thinks of an image it has not learnt from."""
    return cross_val_predict(clone(pipeline), X, y, cv=stratified_folds(y, folds, seed), method="predict_proba")


def label_issues(probabilities: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images whose given label looks wrong, by confident learning as cleanlab's ``find_label_issues`` does it
    (Northcutt et al., 2021; ``filter_by="prune_by_noise_rate"``).

    A class's threshold is the mean out-of-fold probability of that class over the images labelled with it.
    The confident joint counts, per given label ``i``, the images whose most probable class at or above its
    own threshold is ``j``; calibrated to the class sizes, its off-diagonal cell ``(i, j)`` estimates how many
    images labelled ``i`` belong to ``j``. That many of them, those with the largest margin
    ``p(j) - p(i)``, are issues, unless the classifier agrees with their given label: so an image whose
    given label is the least probable of all is found even when no class reaches its threshold.

    Returns
    -------
    rows, suggested : numpy.ndarray
        The issues' rows, ranked by self-confidence (the given label's probability, lowest first), and
        their suggested labels (the most probable other class).
    """
    count, classes = probabilities.shape
    given = probabilities[np.arange(count), y]
    members = [np.flatnonzero(y == c) for c in range(classes)]
    thresholds = np.array([probabilities[m, c].mean() if len(m) else 1.0 for c, m in enumerate(members)])
    above = probabilities >= thresholds
    counted = above.any(axis=1)
    guess = np.where(above, probabilities, -np.inf).argmax(axis=1)
    joint = np.zeros((classes, classes))
    np.add.at(joint, (y[counted], guess[counted]), 1)
    sizes = np.array([len(m) for m in members], float)
    totals = joint.sum(axis=1)
    estimated = np.rint(joint * np.divide(sizes, totals, out=np.zeros(classes), where=totals > 0)[:, None])
    issue = np.zeros(count, bool)
    for i in range(classes):
        for j in np.flatnonzero(estimated[i] > 0):
            if j == i:
                continue
            margin = probabilities[members[i], j] - given[members[i]]
            issue[members[i][np.argsort(-margin, kind="stable")[: int(estimated[i, j])]]] = True
    issue &= probabilities.argmax(axis=1) != y  # the classifier agrees with the given label: not an issue
    rows = np.flatnonzero(issue)
    rows = rows[np.argsort(given[rows], kind="stable")]
    others = probabilities[rows].copy()
    others[np.arange(len(rows)), y[rows]] = -1.0
    return rows, others.argmax(axis=1)


def embedding_map(X: np.ndarray, seed: int, points: int = MAP_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D map of at most ``points`` images (a seeded sample): PCA to 50 dimensions, then t-SNE.

    Returns the rows drawn and their ``[n, 2]`` coordinates.
    """
    rows = np.arange(len(X))
    if len(rows) > points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, points, replace=False))
    if len(rows) < 3:
        return rows, np.zeros((len(rows), 2))
    Z = np.asarray(X[rows], np.float64)
    Z = PCA(min(50, len(rows) - 1, Z.shape[1]), random_state=seed).fit_transform(Z)
    perplexity = float(min(30, (len(rows) - 1) / 3))
    return rows, TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(Z)
