"""Training rows: the same split in memory or streamed over shards, behind one interface."""

from __future__ import annotations

import numpy as np

import pipeline.fit.training as training
from pipeline.fit.training import FitSettings, InMemoryRows, OutOfCore, StreamedRows, training_rows
from pipeline.store import EmbeddingStore
from tests.stores import synthetic_store


def rows_both_ways(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", per_class=20, classes=3, features={"resnet50": (8, 0.3)})
    loaded, light = store.load("resnet50"), store.load("resnet50", embeddings=False)
    rows = np.arange(len(loaded.paths))[::-1]  # any order of store rows
    labels = loaded.labels[rows]
    train = np.arange(len(rows)) % 4 != 0
    return (store, training_rows(store, "resnet50", loaded, rows, labels, train, None),
            training_rows(store, "resnet50", light, rows, labels, train, OutOfCore(chunk_rows=16, epochs=3)),
            loaded.embeddings[rows], labels, train)


def test_both_kinds_hold_the_same_split(tmp_path):
    _, memory, streamed, X, labels, train = rows_both_ways(tmp_path)
    assert isinstance(memory, InMemoryRows) and isinstance(streamed, StreamedRows)
    np.testing.assert_array_equal(memory.X_train, X[train])
    np.testing.assert_array_equal(memory.X_test, X[~train])
    np.testing.assert_array_equal(streamed.train.read(), X[train])
    np.testing.assert_array_equal(streamed.test.read(), X[~train])
    np.testing.assert_array_equal(streamed.train.labels, labels[train])


def test_fit_and_score_through_the_one_interface(tmp_path, monkeypatch):
    _, memory, streamed, _, labels, train = rows_both_ways(tmp_path)
    passes = []
    scaler = training.streamed_scaler
    monkeypatch.setattr(training, "streamed_scaler", lambda stream: passes.append(1) or scaler(stream))
    settings = FitSettings(seed=0, folds=3, n_jobs=1)
    for rows in (memory, streamed):
        for classifier in ("logreg", "svm"):
            head = rows.fit(classifier, settings)
            probabilities = rows.test_probabilities(head)
            assert probabilities.shape == ((~train).sum(), 3)
            assert (probabilities.argmax(1) == labels[~train]).mean() > 0.9  # separable synthetic classes
            assert rows.describe(classifier, head.params)
    assert passes == [1]  # one streaming pass fits the scaler both streamed heads share
    assert "out of core" in streamed.describe("svm", {}) and "out of core" not in memory.describe("logreg", {"C": 1})


def test_streamed_rows_never_load_the_embeddings(tmp_path, monkeypatch):
    store, _, streamed, _, _, _ = rows_both_ways(tmp_path)
    monkeypatch.setattr(EmbeddingStore, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    streamed.fit("logreg", FitSettings(seed=0, folds=2, n_jobs=1))
