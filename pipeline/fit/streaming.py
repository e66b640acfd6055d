"""Heads fitted out of core: SGD over the store in chunks, standardised from a first streaming pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state

from pipeline.errors import UserError
from pipeline.fit.heads import FOLDS, SEARCH_MAX_TRAIN, FittedHead, search_rows, stratified_folds
from pipeline.store import EmbeddingStore

CHUNK_ROWS = 4096  # default rows in memory at once: 64 MB of 4096-d float32 embeddings
EPOCHS = 5
SGD_LOSS = {"logreg": "log_loss", "svm": "hinge"}
SGD_ALPHA = (1e-5, 1e-4, 1e-3, 1e-2)
CALIBRATION_ROWS = 2_000  # the linear SVM's sigmoid calibration is fitted on this many held-out training rows
MIN_CLASS_ROWS = 2  # rows per class on each side of the calibration hold-out


@dataclass
class RowStream:
    """Rows of one feature set read from the store in chunks, never all at once.

    Attributes
    ----------
    store : EmbeddingStore
    name : str
        The feature set.
    rows : numpy.ndarray
        int ``[n]``, the store rows to read, in sample order.
    labels : numpy.ndarray
        int ``[n]``, each sample's label.
    chunk_rows : int
        At most this many samples per chunk (while reading, up to one HDF5 chunk, at most 1 MB, more).
    """

    store: EmbeddingStore
    name: str
    rows: np.ndarray
    labels: np.ndarray
    chunk_rows: int = CHUNK_ROWS

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> RowStream:
        """The stream of the samples where ``keep`` is true (or at the indices ``keep``)."""
        return RowStream(self.store, self.name, self.rows[keep], self.labels[keep], self.chunk_rows)

    def chunks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(samples, X, y)`` chunks of at most ``chunk_rows`` samples, covering every sample once.

        ``samples`` are positions in this stream. Without ``rng`` the store is read front to back; with it,
        the HDF5 chunks of its shards are visited in random order and the samples of a chunk are shuffled:
        reads stay whole chunks, and a chunk mixes rows from all over the store (stores are in folder order,
        so contiguous rows would often be one class).
        """
        with self.store.rows(self.name) as reader:
            blocks = list(reader.blocks())  # each within one HDF5 chunk of one shard: read whole, decompressed once
            starts = np.array([start for start, _ in blocks] + [len(reader)], np.int64)
            order = np.argsort(self.rows, kind="stable")
            bounds = np.searchsorted(self.rows[order], starts)
            wanted = [b for b in range(len(blocks)) if bounds[b + 1] > bounds[b]]
            if rng is not None:
                wanted = list(rng.permutation(wanted))
            pieces: list[tuple[np.ndarray, np.ndarray]] = []
            pending = 0
            for number in wanted:
                samples = order[bounds[number] : bounds[number + 1]]
                rows = self.rows[samples]
                first = int(rows.min())
                read = reader.read(first, int(rows.max()) + 1)
                if len(read) != len(rows) or (rows != np.arange(first, first + len(rows))).any():
                    read = read[rows - first]
                pieces.append((samples, read))
                pending += len(samples)
                if pending >= self.chunk_rows:  # joined once per chunk, not once per HDF5 chunk
                    index, X = self._joined(pieces, rng)
                    whole = len(index) - len(index) % self.chunk_rows
                    for start in range(0, whole, self.chunk_rows):
                        yield self._checked(index[start : start + self.chunk_rows], X[start : start + self.chunk_rows])
                    pieces = [(index[whole:], X[whole:])] if whole < len(index) else []
                    pending = len(index) - whole
            if pieces:
                yield self._checked(*self._joined(pieces, rng))

    @staticmethod
    def _joined(
        pieces: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        index, X = np.concatenate([i for i, _ in pieces]), np.concatenate([x for _, x in pieces])
        if rng is None:
            return index, X
        mix = rng.permutation(len(index))
        return index[mix], X[mix]

    def _checked(self, index: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            raise UserError(
                f"{self.store.path}: {self.name} row {self.rows[index[~finite][0]]} holds NaN or infinite values; "
                "the model file is broken: export it again and extract with --overwrite."
            )
        return index, X, self.labels[index]

    def read(self) -> np.ndarray:
        """All the samples' rows at once, in sample order (for samples known to be few)."""
        return self.apply(lambda X: X)

    def apply(self, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``function`` applied chunk by chunk, its output rows put back in sample order."""
        out = None
        for index, X, _ in self.chunks():
            result = function(X)
            if out is None:
                out = np.zeros((len(self), *result.shape[1:]), result.dtype)
            out[index] = result
        return out if out is not None else np.zeros((0, 0), np.float32)


def streamed_scaler(stream: RowStream) -> StandardScaler:
    """A StandardScaler fitted by one pass over the stream (``partial_fit`` per chunk)."""
    scaler = StandardScaler()
    for _, X, _ in stream.chunks():
        scaler.partial_fit(X)
    return scaler


def fit_streaming(
    name: str,
    train: RowStream,
    scaler: StandardScaler,
    *,
    validation: np.ndarray | None = None,
    seed: int = 0,
    folds: int = FOLDS,
    epochs: int = EPOCHS,
    n_jobs: int | None = None,
    class_weight: str | None = None,
    alpha: float | None = None,
) -> FittedHead:
    """Fit classifier ``name`` as a linear model by SGD over ``train`` in chunks: log-loss for logreg, hinge for svm.

    ``alpha`` is chosen on an in-memory stratified sample of at most ``chunk_rows`` rows (and 5,000 for
    logreg, 2,000 for svm, as the in-memory heads choose their settings), scored on the recorded validation
    split or by cross-validation; then ``epochs`` passes of ``partial_fit`` over the whole training stream in
    shuffled chunks. The SVM's probabilities are sigmoid-calibrated on training rows held out of the SGD
    passes (a fifth of them, at most 2,000 and ``chunk_rows``; on training rows when a class has fewer
    than four). Memory
    holds one chunk at a time, besides the rows' labels and indices.

    Parameters
    ----------
    name : {"logreg", "svm"}
    train : RowStream
        The training rows (validation rows included) and their labels.
    scaler : StandardScaler
        Fitted on ``train`` (see :func:`streamed_scaler`).
    validation : numpy.ndarray of bool, optional
        Which training samples form a recorded validation split.
    seed, folds, n_jobs, class_weight
        As for :func:`pipeline.fit.heads.fit_head`.
    epochs : int
        Passes over the training stream.
    alpha : float, optional
        The regularisation to use, chosen already (no search).

    Returns
    -------
    FittedHead
        Its pipeline is the scaler then the SGD classifier (calibrated for svm), with ``predict_proba``.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    y = train.labels
    classes = np.unique(y)
    weights = _class_weights(y, classes) if class_weight == "balanced" else None
    notes = [f"fitted out of core: {epochs} SGD epochs over chunks of at most {train.chunk_rows} rows"]
    fitting, held = train, np.zeros(0, np.int64)
    if name == "svm":
        held = calibration_rows(y, min(CALIBRATION_ROWS, train.chunk_rows, len(y) // 5), seed + 1)
        fitting = train.subset(np.setdiff1d(np.arange(len(y)), held))
        validation = None if validation is None else np.delete(validation, held)
    score, selection = float("nan"), "alpha given"
    if alpha is None:
        alpha, score, selection = _choose_alpha(name, fitting, scaler, validation, seed, folds, epochs, n_jobs,
                                                weights)
    sgd = SGDClassifier(loss=SGD_LOSS[name], alpha=alpha, class_weight=weights, random_state=seed)
    for _ in range(epochs):
        for _, X, labels in fitting.chunks(rng):
            sgd.partial_fit(scaler.transform(X), labels, classes=classes)
    clf = sgd
    if name == "svm":
        if len(held):
            calibration = train.subset(held)
            notes.append(f"probabilities calibrated on {len(held)} training images held out of the SGD passes")
        else:
            calibration = fitting.subset(
                search_rows(fitting.labels, None, seed, min(CALIBRATION_ROWS, train.chunk_rows))
            )
            notes.append("probabilities calibrated on training images: too few to hold any out")
        # cv only splits the predictions of the frozen SVM; both folds hold every class
        clf = CalibratedClassifierCV(FrozenEstimator(sgd), method="sigmoid", cv=MIN_CLASS_ROWS)
        clf.fit(scaler.transform(calibration.read()), calibration.labels)
    params = {"scale": "standard", "loss": SGD_LOSS[name], "alpha": alpha, "epochs": epochs}
    if weights:
        params["class_weight"] = "balanced"
    pipeline = Pipeline([("scale", scaler), ("clf", clf)])
    return FittedHead(pipeline, params, score, selection, time.perf_counter() - started, notes)


def predict_proba_streaming(head: FittedHead, stream: RowStream) -> np.ndarray:
    """``head.pipeline.predict_proba`` over the stream chunk by chunk, in sample order."""
    return stream.apply(head.pipeline.predict_proba)


def out_of_fold_streaming(name: str, head: FittedHead, train: RowStream, folds: int, seed: int,
                          epochs: int) -> np.ndarray:
    """Class probabilities of each training row from a copy of the out-of-core classifier ``name`` (``head``'s
    scaler and alpha) fitted by SGD on the other folds; out of core, as ``head`` was: memory holds a chunk.

    Returns
    -------
    numpy.ndarray
        ``[len(train), classes]``, in the stream's sample order.
    """
    y = train.labels
    probabilities = np.zeros((len(y), len(np.unique(y))))
    scaler = head.pipeline.named_steps["scale"]
    weights = "balanced" if head.params.get("class_weight") == "balanced" else None
    for fitting, held in stratified_folds(y, folds, seed).split(np.zeros(len(y)), y):
        fold = fit_streaming(name, train.subset(fitting), scaler, seed=seed, epochs=epochs, class_weight=weights,
                             alpha=head.params["alpha"])
        probabilities[held] = predict_proba_streaming(fold, train.subset(held))
    return probabilities


def describe_streaming(name: str) -> str:
    """What the out-of-core classifier ``name`` is, in words."""
    if name == "logreg":
        return "logistic regression by SGD (log-loss), out of core"
    return "linear SVM by SGD (hinge) with sigmoid-calibrated probabilities, out of core"


def calibration_rows(y: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``limit`` rows to hold out for calibration, each class in proportion.

    Every class gives at least two rows and keeps at least two for the SGD passes; when some class cannot
    (fewer than four training images), nothing is held out and the result is empty.
    """
    rng = check_random_state(seed)
    held = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        count = min(max(MIN_CLASS_ROWS, round(len(members) * limit / len(y))), len(members) - MIN_CLASS_ROWS)
        if count < MIN_CLASS_ROWS:
            return np.zeros(0, np.int64)
        held.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(held))


def _choose_alpha(
    name: str, train: RowStream, scaler: StandardScaler, validation: np.ndarray | None, seed: int, folds: int,
    epochs: int, n_jobs: int | None, weights: dict | None,
) -> tuple[float, float, str]:
    sample = search_rows(train.labels, validation, seed, min(SEARCH_MAX_TRAIN[name], train.chunk_rows))
    X, y = scaler.transform(train.subset(sample).read()), train.labels[sample]
    if validation is not None and validation[sample].any():
        splitter = PredefinedSplit(np.where(validation[sample], 0, -1))
        selection = "alpha scored on the recorded validation split"
    else:
        splitter = stratified_folds(y, folds, seed)
        selection = f"alpha by {splitter.n_splits}-fold stratified cross-validation"
    selection += f" on a stratified sample of {len(sample)} of {len(train)} training images"
    search = GridSearchCV(
        SGDClassifier(loss=SGD_LOSS[name], max_iter=epochs, tol=None, class_weight=weights, random_state=seed),
        {"alpha": list(SGD_ALPHA)}, scoring="balanced_accuracy" if weights else "accuracy", cv=splitter,
        n_jobs=n_jobs, refit=False,
    )
    search.fit(X, y)
    return float(search.best_params_["alpha"]), float(search.best_score_), selection


def _class_weights(y: np.ndarray, classes: np.ndarray) -> dict[int, float]:
    """scikit-learn's "balanced" weights, n / (k * count), which ``partial_fit`` does not compute itself."""
    counts = np.bincount(y, minlength=int(classes.max()) + 1)[classes]
    return {int(c): float(len(y) / (len(classes) * n)) for c, n in zip(classes, counts)}
