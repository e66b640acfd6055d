"""Out-of-core heads: chunked reads cover every row once, streamed statistics, SGD that matches in-memory SGD."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler

from pipeline.errors import UserError
from pipeline.fit.run import run_fit
from pipeline.fit.streaming import RowStream, fit_streaming, predict_proba_streaming, streamed_scaler
from tests.stores import synthetic_store


def stream_of(tmp_path, per_class=400, classes=4, dim=64, chunk_rows=300, **options) -> tuple[RowStream, np.ndarray]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = synthetic_store(tmp_path / "e.h5", per_class, classes, {"resnet50": (dim, 1.5)}, **options)
    features = store.load("resnet50")
    stream = RowStream(store, "resnet50", np.arange(len(features.paths)), features.labels, chunk_rows)
    return stream, features.embeddings


def test_chunks_cover_every_row_once_in_order_or_shuffled(tmp_path):
    stream, X = stream_of(tmp_path, chunk_rows=250)
    picked = stream.subset(np.flatnonzero(np.arange(len(stream)) % 3 != 1)[::-1])  # any order, any subset
    seen = [(index, rows, labels) for index, rows, labels in picked.chunks()]
    assert all(len(index) <= 250 for index, _, _ in seen)
    index = np.concatenate([i for i, _, _ in seen])
    np.testing.assert_array_equal(np.sort(index), np.arange(len(picked)))
    for i, rows, labels in seen:
        np.testing.assert_array_equal(rows, X[picked.rows[i]])
        np.testing.assert_array_equal(labels, picked.labels[i])
    np.testing.assert_array_equal(picked.read(), X[picked.rows])

    shuffled = [i for i, _, _ in picked.chunks(np.random.default_rng(0))]
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(len(picked)))
    first = picked.labels[shuffled[0]]
    assert len(np.unique(first)) == 4  # a chunk mixes classes although the store is in class order


def test_streamed_statistics_equal_in_memory_ones(tmp_path):
    stream, X = stream_of(tmp_path, chunk_rows=100)
    scaler = streamed_scaler(stream)
    reference = StandardScaler().fit(X)
    np.testing.assert_allclose(scaler.mean_, reference.mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scaler.var_, reference.var_, rtol=1e-5)


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_out_of_core_sgd_matches_in_memory_sgd(tmp_path, classifier):
    stream, X = stream_of(tmp_path, per_class=600, chunk_rows=400)
    test = np.arange(len(stream)) % 5 == 0
    train_stream, test_stream = stream.subset(~test), stream.subset(test)
    head = fit_streaming(classifier, train_stream, streamed_scaler(train_stream), seed=0, epochs=5)
    proba = predict_proba_streaming(head, test_stream)
    assert proba.shape == (test.sum(), 4) and np.allclose(proba.sum(1), 1)
    predicted = proba.argmax(1)

    scaler = StandardScaler().fit(X[~test])
    reference = SGDClassifier(
        loss=head.params["loss"], alpha=head.params["alpha"], max_iter=5, tol=None, random_state=0
    ).fit(scaler.transform(X[~test]), stream.labels[~test])
    expected = reference.predict(scaler.transform(X[test]))
    y_test = stream.labels[test]
    assert abs((predicted == y_test).mean() - (expected == y_test).mean()) <= 0.03
    assert (predicted == expected).mean() >= 0.9
    assert (predicted == y_test).mean() >= 0.6  # well above the 0.25 of chance


def _streaming_peak(tmp_path, per_class: int) -> int:
    """Peak Python/numpy memory (tracemalloc) of the scaler pass, both SGD heads and scoring, chunks of 256 rows."""
    stream, _ = stream_of(tmp_path / str(per_class), per_class=per_class, dim=1024, chunk_rows=256)
    test = np.arange(len(stream)) % 5 == 0
    tracemalloc.start()
    scaler = streamed_scaler(stream.subset(~test))
    for name in ("logreg", "svm"):
        head = fit_streaming(name, stream.subset(~test), scaler, epochs=2)
        predict_proba_streaming(head, stream.subset(test))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_out_of_core_memory_stays_flat_as_the_store_grows(tmp_path):
    _streaming_peak(tmp_path / "warm-up", 100)  # first-call allocations (imports, caches) are not the store's
    small = _streaming_peak(tmp_path, 1500)  # 4 classes: 24 MB of embeddings
    peak = _streaming_peak(tmp_path, 3000)  # 48 MB
    store_bytes, added = 12000 * 1024 * 4, 6000 * 1024 * 4
    # About one chunk (1 MB) and one HDF5 chunk at a time; what grows is the rows' index (indices and labels).
    assert peak < store_bytes / 4 and peak - small < added / 40, (
        f"{small / 1e6:.1f} MB, then {peak / 1e6:.1f} MB at peak")


def test_out_of_core_fit_reports_sgd_heads_and_copes_with_tiny_classes(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", {"a": 60, "b": 60, "c": 4}, features={"resnet50": (32, 0.5)})
    report = run_fit(store.path, classifiers=["logreg", "svm"], out=tmp_path / "out", n_jobs=1, out_of_core=True,
                     chunk_rows=64, epochs=2)
    results = {r["classifier"]: r for r in report["results"] if r["features"] == "resnet50"}
    assert results["logreg"]["params"]["loss"] == "log_loss" and results["svm"]["params"]["loss"] == "hinge"
    assert "out of core" in results["svm"]["description"] and results["logreg"]["test"]["accuracy"] > 0.5
    assert "too few to hold any out" in results["svm"]["notes"][-1]  # class c has 3 training images
    assert report["inputs"]["out_of_core"] == {"chunk_rows": 64, "epochs": 2} and report["learning_curve"] is None


def test_broken_rows_are_named(tmp_path):
    def poison(name, X):
        X[7, 3] = np.nan
        return X

    stream, _ = stream_of(tmp_path, edit=poison)
    with pytest.raises(UserError, match="row 7 holds NaN"):
        streamed_scaler(stream)
