"""Classifier heads: the hyper-parameter search, its fallbacks, calibration and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC, LinearSVC

from pipeline.fit import heads
from pipeline.fit.heads import fit_head
from tests.stores import blobs


def data(per_class: int = 20, classes: int = 3, dim: int = 8, spread: float = 0.3, seed: int = 0):
    y = np.repeat(np.arange(classes), per_class)
    return blobs(y, dim, spread, seed), y


@pytest.mark.parametrize("name, estimator", [("logreg", LogisticRegression), ("svm", CalibratedClassifierCV)])
def test_separable_data_is_learned_with_probabilities(name, estimator):
    X, y = data()
    head = fit_head(name, X, y, seed=0, n_jobs=1)
    assert isinstance(head.pipeline.named_steps["clf"], estimator)
    assert (head.pipeline.predict(X) == y).mean() >= 0.99
    probabilities = head.pipeline.predict_proba(X)
    assert probabilities.shape == (len(y), 3) and np.allclose(probabilities.sum(axis=1), 1)
    assert head.params["scale"] in ("standard", "l2") and head.params["C"] > 0
    assert head.validation_score >= 0.99 and head.selection == "3-fold stratified cross-validation"


def test_small_training_sets_get_an_rbf_svm_large_ones_a_linear_one(monkeypatch):
    X, y = data()
    assert isinstance(fit_head("svm", X, y, n_jobs=1).pipeline.named_steps["clf"].estimator, SVC)
    monkeypatch.setattr(heads, "RBF_MAX_TRAIN", 30)
    head = fit_head("svm", X, y, n_jobs=1)
    assert isinstance(head.pipeline.named_steps["clf"].estimator, LinearSVC) and head.params["kernel"] == "linear"


def test_large_training_sets_are_searched_on_a_stratified_sample(monkeypatch):
    monkeypatch.setattr(heads, "SEARCH_MAX_TRAIN", {"logreg": 30})
    X, y = data(per_class=40)
    head = fit_head("logreg", X, y, n_jobs=1)
    assert any("stratified sample of" in note and "of 120 training images" in note for note in head.notes)
    assert (head.pipeline.predict(X) == y).mean() >= 0.99


def test_fewer_images_than_folds_falls_back_to_fewer_folds():
    X, y = data(per_class=2)
    head = fit_head("logreg", X, y, folds=5, n_jobs=1)
    assert head.selection == "2-fold stratified cross-validation"
    assert head.notes == ["2 folds instead of 5: the smallest class has 2 training images"]


def test_a_recorded_validation_split_scores_the_settings():
    X, y = data()
    validation = np.zeros(len(y), bool)
    validation[::4] = True
    head = fit_head("logreg", X, y, validation=validation, n_jobs=1)
    assert head.selection == "scored on the recorded validation split"
    assert head.pipeline.named_steps["clf"].n_features_in_ == 8


def test_same_seed_same_model_and_class_weights_are_recorded():
    X, y = data(spread=2.0)
    first = fit_head("svm", X, y, seed=3, n_jobs=2, class_weight="balanced")
    second = fit_head("svm", X, y, seed=3, n_jobs=1, class_weight="balanced")
    assert first.params == second.params and first.params["class_weight"] == "balanced"
    assert first.validation_score == second.validation_score
    np.testing.assert_array_equal(first.pipeline.predict_proba(X), second.pipeline.predict_proba(X))


def test_unknown_classifier_is_refused():
    with pytest.raises(ValueError, match="unknown classifier 'tree'"):
        heads.search_space("tree", np.zeros((4, 2)), 0, None)


def test_a_fit_that_hits_its_iteration_limit_is_noted_not_printed(monkeypatch, capfd):
    monkeypatch.setattr(heads, "RBF_MAX_TRAIN", 10)
    monkeypatch.setattr(heads, "LINEAR_SVM_MAX_ITER", 1)
    X, y = data(spread=3.0)
    head = fit_head("svm", X, y, n_jobs=2)
    assert any("stopped at its iteration limit" in note for note in head.notes)
    assert "ConvergenceWarning" not in capfd.readouterr().err
    assert not any("iteration limit" in note for note in fit_head("logreg", X, y, n_jobs=1).notes)
