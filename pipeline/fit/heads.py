"""The classifier heads, scikit-learn pipelines whose hyper-parameters are chosen by cross-validation."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils import check_random_state

CLASSIFIERS = ("logreg", "svm")
SCALERS = {"standard": StandardScaler, "l2": Normalizer}
LOGREG_C = (0.01, 0.1, 1.0, 10.0)
SVM_C = (0.1, 1.0, 10.0)
LINEAR_SVM_C = (0.001, 0.01, 0.1)
LINEAR_SVM_MAX_ITER = 300
RBF_GAMMA_FACTORS = (0.1, 1.0, 10.0)  # times scikit-learn's "scale" value on the scaled features
RBF_MAX_TRAIN = 5_000  # above this many training images the SVM is linear: an RBF kernel grows as n^2
SEARCH_MAX_TRAIN = {"logreg": 5_000, "svm": 2_000}  # settings are chosen on at most this many images (stratified)
FOLDS = 3


@dataclass
class FittedHead:
    """A classifier fitted on the training part, and how it was chosen.

    Attributes
    ----------
    pipeline : sklearn.pipeline.Pipeline
        ``scale`` (StandardScaler or Normalizer) then ``clf``; has ``predict_proba``.
    params : dict
        The chosen hyper-parameters, JSON-ready (e.g. ``{"scale": "standard", "C": 0.1}``).
    validation_score : float
        Mean accuracy (balanced accuracy with class weights) of the chosen setting on the validation folds
        (or the validation split).
    selection : str
        How it was chosen, in words.
    seconds : float
        Wall time of the search and the final fit.
    notes : list of str
        Fallbacks and warnings met on the way (e.g. fewer folds, no convergence).
    """

    pipeline: Pipeline
    params: dict[str, Any]
    validation_score: float
    selection: str
    seconds: float
    notes: list[str] = field(default_factory=list)


def describe_classifier(name: str, params: dict[str, Any]) -> str:
    """What classifier ``name`` with the chosen ``params`` is, in words."""
    if name == "logreg":
        return "multinomial logistic regression (lbfgs)"
    if params.get("kernel") == "rbf":
        return "RBF-kernel SVC with sigmoid-calibrated probabilities"
    return "linear SVM (LinearSVC) with sigmoid-calibrated probabilities"


def _scalers() -> list:
    return [make() for make in SCALERS.values()]


def search_space(
    name: str, X: np.ndarray, seed: int, class_weight: str | None
) -> tuple[Pipeline, list[dict[str, list]]]:
    """The uncalibrated pipeline for ``name`` and its grid, sized for the training features ``X``."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")
    if name == "logreg":
        clf = LogisticRegression(max_iter=2000, class_weight=class_weight)
        grid = [{"scale": _scalers(), "clf__C": list(LOGREG_C)}]
    elif len(X) <= RBF_MAX_TRAIN:
        clf = SVC(kernel="rbf", class_weight=class_weight, random_state=seed)
        # gamma is relative to each scaling: a standardised and an L2-normalised row differ in norm by sqrt(D)
        grid = []
        for scaler in _scalers():
            scale_gamma = 1.0 / (X.shape[1] * max(float(clone(scaler).fit_transform(X).var()), 1e-12))
            grid.append({
                "scale": [scaler], "clf__C": list(SVM_C), "clf__gamma": [scale_gamma * f for f in RBF_GAMMA_FACTORS],
            })
    else:
        # liblinear slows down sharply as C grows on dense, high-dimensional rows: small Cs, bounded iterations
        clf = LinearSVC(C=1.0, class_weight=class_weight, random_state=seed, max_iter=LINEAR_SVM_MAX_ITER)
        grid = [{"scale": _scalers(), "clf__C": list(LINEAR_SVM_C)}]
    return Pipeline([("scale", StandardScaler()), ("clf", clf)]), grid


def fit_head(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    *,
    validation: np.ndarray | None = None,
    seed: int = 0,
    folds: int = FOLDS,
    n_jobs: int | None = None,
    class_weight: str | None = None,
) -> FittedHead:
    """Choose hyper-parameters for classifier ``name`` on ``(X, y)`` and fit it on all of them.

    Parameters
    ----------
    name : {"logreg", "svm"}
        The classifier.
    X, y : numpy.ndarray
        Training features ``[N, D]`` and integer labels ``[N]``.
    validation : numpy.ndarray of bool, optional
        Rows that form a recorded validation split: when given, settings are scored on them (trained on
        the rest) instead of by cross-validation, and the final fit uses every row.
    seed : int
        Seeds the folds, the search subsample and the SVMs; the same seed gives the same result.
    folds : int
        Stratified cross-validation folds; fewer when the smallest class has fewer images (noted). Every
        class needs at least two training images.
    n_jobs : int, optional
        Parallel fits through joblib.
    class_weight : {None, "balanced"}
        Weight classes inversely to their frequency.

    Returns
    -------
    FittedHead
    """
    started = time.perf_counter()
    notes: list[str] = []
    estimator, grid = search_space(name, X, seed, class_weight)
    rows = search_rows(y, validation, seed, SEARCH_MAX_TRAIN[name])
    if len(rows) < len(y):
        notes.append(f"hyper-parameters chosen on a stratified sample of {len(rows)} of {len(y)} training images")
    Xs, ys = X[rows], y[rows]
    if validation is not None and validation.any():
        splitter: Any = PredefinedSplit(np.where(validation[rows], 0, -1))
        selection = "scored on the recorded validation split"
    else:
        splitter = stratified_folds(ys, folds, seed)
        if splitter.n_splits < folds:
            notes.append(f"{splitter.n_splits} folds instead of {folds}: the smallest class has {_smallest_class(ys)} "
                         "training images")
        selection = f"{splitter.n_splits}-fold stratified cross-validation"
    scoring = "balanced_accuracy" if class_weight else "accuracy"  # weighting classes means every class counts alike
    search = GridSearchCV(estimator, grid, scoring=scoring, cv=splitter, n_jobs=n_jobs, refit=False)
    # Fits in joblib workers would print their ConvergenceWarnings; convergence is read from n_iter_ instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(Xs, ys)
        # the grid's scaler objects are the search's own: the chosen pipeline gets unfitted copies
        chosen = clone(estimator).set_params(
            **{key: clone(value, safe=False) for key, value in search.best_params_.items()}
        )
        final = _calibrated(chosen, y, n_jobs) if name == "svm" else chosen
        final.fit(X, y)
    if name == "svm":
        final.set_params(clf__n_jobs=None)  # so a bundle's bytes do not depend on the cores that fitted it
    score = float(search.best_score_)
    if not _converged(final):
        notes.append("the final fit stopped at its iteration limit before converging; the scores say how much "
                     "that matters")
    return FittedHead(final, _params(chosen), score, selection, time.perf_counter() - started, notes)


def search_rows(y: np.ndarray, validation: np.ndarray | None, seed: int, limit: int) -> np.ndarray:
    """Sorted indices of a stratified sample of about ``limit`` rows (all rows when there are fewer).

    Each class, within the validation rows and within the others, keeps its share and at least two rows.
    """
    if len(y) <= limit:
        return np.arange(len(y))
    rng = check_random_state(seed)
    keep = []
    for part in ([validation, ~validation] if validation is not None else [np.ones(len(y), bool)]):
        for label in np.unique(y[part]):
            members = np.flatnonzero(part & (y == label))
            count = max(2, round(len(members) * limit / len(y)))
            keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _calibrated(chosen: Pipeline, y: np.ndarray, n_jobs: int | None) -> Pipeline:
    """The chosen SVM pipeline with sigmoid-calibrated probabilities (cross-validated, one final SVM).

    The calibration's folds cost one SVM fit each: three for an RBF SVM, two for the linear one, whose
    fits dominate the time on large training sets.
    """
    folds = 3 if isinstance(chosen.named_steps["clf"], SVC) else 2
    return Pipeline([
        ("scale", chosen.named_steps["scale"]),
        ("clf", CalibratedClassifierCV(
            chosen.named_steps["clf"], method="sigmoid", cv=min(folds, _smallest_class(y)), ensemble=False,
            n_jobs=n_jobs,
        )),
    ])


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    """Shuffled stratified ``folds``-fold cross-validation, with fewer folds (two at least) when the smallest class
    of ``y`` has fewer images than that."""
    return StratifiedKFold(max(2, min(folds, _smallest_class(y))), shuffle=True, random_state=seed)


def _smallest_class(y: np.ndarray) -> int:
    counts = np.bincount(y)
    return int(counts[counts > 0].min())


def _params(chosen: Pipeline) -> dict[str, Any]:
    scaler = chosen.named_steps["scale"]
    params: dict[str, Any] = {"scale": next(k for k, kind in SCALERS.items() if isinstance(scaler, kind))}
    clf = chosen.named_steps["clf"]
    params["C"] = float(clf.C)
    if isinstance(clf, SVC):
        params["kernel"] = "rbf"
        params["gamma"] = float(clf.gamma)
    elif isinstance(clf, LinearSVC):
        params["kernel"] = "linear"
    if clf.class_weight:
        params["class_weight"] = clf.class_weight
    return params


def _converged(fitted: Pipeline) -> bool:
    """False when the fitted classifier (the calibrated SVM's own, for svm) hit its iteration limit."""
    clf = fitted.named_steps["clf"]
    if isinstance(clf, CalibratedClassifierCV):
        clf = clf.calibrated_classifiers_[0].estimator
    if isinstance(clf, SVC):
        return not getattr(clf, "fit_status_", 0)
    return int(np.max(clf.n_iter_)) < clf.max_iter
