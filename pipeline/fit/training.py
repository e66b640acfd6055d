"""One feature set's training and test rows for fit, held in memory or streamed from the store's shards."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.base import clone

from pipeline.fit.heads import FittedHead, describe_classifier, fit_head
from pipeline.fit.streaming import (
    CHUNK_ROWS,
    EPOCHS,
    RowStream,
    describe_streaming,
    fit_streaming,
    predict_proba_streaming,
    streamed_scaler,
)
from pipeline.store import EmbeddingStore, FeatureSet

CURVE_PER_CLASS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CURVE_REPEATS = 3  # random draws averaged per point of the learning curve


@dataclass(frozen=True)
class FitSettings:
    """How the heads are chosen and fitted: what fit's options say, passed on as one thing."""

    seed: int = 0
    folds: int = 5
    n_jobs: int | None = None
    class_weight: str | None = None
    validation: np.ndarray | None = None  # bool per training row: the recorded validation split, if any


@dataclass(frozen=True)
class OutOfCore:
    """Settings of fitting out of core (``fit --out-of-core``)."""

    chunk_rows: int = CHUNK_ROWS
    epochs: int = EPOCHS


class TrainingRows(Protocol):
    """A feature set's rows of a split: fit a head on the training part, predict the test part.

    :func:`training_rows` makes one of the two kinds: :class:`InMemoryRows` (every solver, the learning
    curve) or :class:`StreamedRows`, read over the store's shards in chunks (SGD; memory holds one chunk).
    """

    def fit(self, classifier: str, settings: FitSettings) -> FittedHead:
        """The head ``classifier`` chosen and fitted on the training rows."""
        ...

    def test_probabilities(self, head: FittedHead) -> np.ndarray:
        """``head``'s class probabilities for the test rows, in split order."""
        ...

    def describe(self, classifier: str, params: dict[str, Any]) -> str:
        """What the fitted head is, in words."""
        ...


@dataclass
class InMemoryRows:
    """The split's rows as arrays."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray

    def fit(self, classifier: str, settings: FitSettings) -> FittedHead:
        return fit_head(classifier, self.X_train, self.y_train, validation=settings.validation, seed=settings.seed,
                        folds=settings.folds, n_jobs=settings.n_jobs, class_weight=settings.class_weight)

    def test_probabilities(self, head: FittedHead) -> np.ndarray:
        return head.pipeline.predict_proba(self.X_test)

    def describe(self, classifier: str, params: dict[str, Any]) -> str:
        return describe_classifier(classifier, params)


@dataclass
class StreamedRows:
    """The split's rows read in chunks across the store's shards, standardised from one streaming pass."""

    train: RowStream
    test: RowStream
    epochs: int
    _scaler: Any = None

    def fit(self, classifier: str, settings: FitSettings) -> FittedHead:
        if self._scaler is None:  # one pass, shared by every head of this feature set
            self._scaler = streamed_scaler(self.train)
        return fit_streaming(classifier, self.train, copy.deepcopy(self._scaler), validation=settings.validation,
                             seed=settings.seed, folds=settings.folds, epochs=self.epochs, n_jobs=settings.n_jobs,
                             class_weight=settings.class_weight)

    def test_probabilities(self, head: FittedHead) -> np.ndarray:
        return predict_proba_streaming(head, self.test)

    def describe(self, classifier: str, params: dict[str, Any]) -> str:
        return describe_streaming(classifier)


def training_rows(store: EmbeddingStore, name: str, feature_set: FeatureSet, rows: np.ndarray, labels: np.ndarray,
                  train: np.ndarray, out_of_core: OutOfCore | None) -> TrainingRows:
    """The rows of feature set ``name`` at store positions ``rows`` (labels ``labels``), split by ``train``.

    Parameters
    ----------
    store : EmbeddingStore
    name : str
    feature_set : FeatureSet
        As loaded: with its embeddings in memory, or without (``out_of_core``).
    rows : numpy.ndarray
        int ``[N]``: the store rows of the split's images, in split order.
    labels : numpy.ndarray
        int ``[N]``.
    train : numpy.ndarray
        bool ``[N]``: training rows (the others are the test part).
    out_of_core : OutOfCore or None
        Stream the rows from the store instead of holding them.
    """
    if out_of_core is None:
        X = feature_set.embeddings[rows]
        return InMemoryRows(X[train], labels[train], X[~train])
    stream = RowStream(store, name, rows, labels, out_of_core.chunk_rows)
    return StreamedRows(stream.subset(train), stream.subset(~train), out_of_core.epochs)


def learning_curve(
    head: FittedHead, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int
) -> dict[str, list]:
    """Test accuracy of ``head``'s chosen pipeline trained on 1, 2, 5, ... images per class, then on all."""
    smallest = int(np.bincount(y).min())
    rng = np.random.default_rng(seed)
    per_class, accuracy = [], []
    for n in [n for n in CURVE_PER_CLASS if n < smallest]:
        scores = []
        for _ in range(CURVE_REPEATS):
            rows = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in np.unique(y)])
            model = clone(head.pipeline).fit(X[rows], y[rows])
            scores.append(float((model.predict(X_test) == y_test).mean()))
        per_class.append(n)
        accuracy.append(float(np.mean(scores)))
    per_class.append(round(len(y) / len(np.unique(y)), 1))
    accuracy.append(float((head.pipeline.predict(X_test) == y_test).mean()))
    return {"per_class": per_class, "accuracy": accuracy}
