"""What the report shows beyond scores: leaks across the split, likely label errors, a map of the embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import Pipeline

from pipeline.fit.heads import stratified_folds

# Cosine similarity of centred, L2-normalised features at or above which two images count as near duplicates
# (docs/report.md has the measurements). Exact duplicates (same sha256) are found first, by hash. On the 32x32
# pixels, copies resized to 70% and re-saved as JPEG at quality 60 measured >= 0.999 and distinct images at
# most 0.958 (99.9th percentile; 0.995 for overlapping crops of one photo); on a trained backbone's
# embeddings the threshold is a documented guess: no ImageNet weights could be had to measure it.
PIXEL_DUPLICATE = 0.99
NEAR_DUPLICATE = 0.95
LEAK_ROWS = 100_000  # above this many images, leaks are searched among a seeded sample of them
MAP_POINTS = 3_000  # the 2-D map shows at most this many images
BLOCK_ROWS = 256  # query rows per block of the similarity search: 256 x 100,000 float32 is 100 MB
MAX_PAIRS = 100_000  # a threshold that lets more pairs through says more about the features than about leaks


@dataclass
class Leaks:
    """Pairs of images, one in the training part and one held out, that are the same image or nearly.

    ``held_out`` and ``train`` are row numbers of the split; ``similarity`` is 1.0 for an exact duplicate.
    """

    held_out: np.ndarray
    train: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    sampled: int = 0  # images searched when a sample was taken; 0 when all were
    truncated: bool = False  # more than MAX_PAIRS pairs passed the threshold; the closest are kept
    source: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # features that found each pair

    def __len__(self) -> int:
        return len(self.held_out)


def centred(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Embeddings minus the training mean, L2-normalised. Post-ReLU embeddings all point into one orthant,
    so their raw cosines are close to 1 for any two images; centred ones spread over [-1, 1]."""
    Z = np.asarray(X, np.float32) - mean
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def find_leaks(X: np.ndarray, sha256: np.ndarray, train: np.ndarray, threshold: float = NEAR_DUPLICATE,
               seed: int = 0, limit: int = LEAK_ROWS) -> Leaks:
    """Held-out images (validation or test) whose content also appears in the training part.

    Exact duplicates by sha256; near duplicates by an exact search, in blocks, of the cosine similarity of
    :func:`centred` embeddings: every pair at or above ``threshold``. Beyond ``limit`` images, a seeded
    sample of ``limit`` of them (in proportion to each part) is searched, and ``sampled`` says so.

    Parameters
    ----------
    X : numpy.ndarray
        float32 ``[N, D]``, the split's rows.
    sha256 : numpy.ndarray
        str ``[N]``, each file's content hash (``""`` when unknown).
    train : numpy.ndarray
        bool ``[N]``: the training part; the others are held out.
    """
    rows = np.arange(len(X))
    sampled = 0
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
        sampled = limit
    base, queries = rows[train[rows]], rows[~train[rows]]
    held, other, similarity, exact = [], [], [], []
    by_hash: dict[str, list[int]] = {}
    for row in base:
        if sha256[row]:
            by_hash.setdefault(str(sha256[row]), []).append(int(row))
    for row in queries:
        for match in by_hash.get(str(sha256[row]), []) if sha256[row] else []:
            held.append(int(row))
            other.append(match)
            similarity.append(1.0)
            exact.append(True)
    if len(base) and len(queries):
        mean = X[base].mean(axis=0)
        Z_base = centred(X[base], mean)
        seen = set(zip(held, other))
        for start in range(0, len(queries), BLOCK_ROWS):
            block = queries[start : start + BLOCK_ROWS]
            scores = centred(X[block], mean) @ Z_base.T
            for q, b in zip(*np.nonzero(scores >= threshold)):
                pair = (int(block[q]), int(base[b]))
                if pair not in seen:
                    held.append(pair[0])
                    other.append(pair[1])
                    similarity.append(float(scores[q, b]))
                    exact.append(False)
            if len(held) > 2 * MAX_PAIRS:  # keep memory bounded; the closest are kept below
                break
    order = np.argsort(-np.array(similarity, float), kind="stable")[:MAX_PAIRS]
    return Leaks(np.array(held, np.int64)[order], np.array(other, np.int64)[order],
                 np.array(similarity, float)[order], np.array(exact, bool)[order], sampled,
                 truncated=len(held) > MAX_PAIRS)


def merged(found: list[tuple[Leaks, str]]) -> Leaks:
    """Several searches' leaks as one: each pair once, with its highest similarity and the features that found it
    (``sha256`` for exact duplicates)."""
    best: dict[tuple[int, int], tuple[float, bool, str]] = {}
    for leaks, source in found:
        for held, train, similarity, exact in zip(leaks.held_out, leaks.train, leaks.similarity, leaks.exact):
            key, value = (int(held), int(train)), (float(similarity), bool(exact), "sha256" if exact else source)
            if key not in best or value[:2] > best[key][:2]:
                best[key] = value
    pairs = sorted(best.items(), key=lambda item: (-item[1][0], not item[1][1]))
    return Leaks(
        np.array([k[0] for k, _ in pairs], np.int64), np.array([k[1] for k, _ in pairs], np.int64),
        np.array([v[0] for _, v in pairs], float), np.array([v[1] for _, v in pairs], bool),
        max((leaks.sampled for leaks, _ in found), default=0), any(leaks.truncated for leaks, _ in found),
        np.array([v[2] for _, v in pairs], dtype=object),
    )


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
