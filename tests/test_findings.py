"""Leaks across the split, likely label errors and the map: on small arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.fit import findings
from pipeline.store import Pairs


def clusters(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return (rng.normal(size=(3, 32))[y] * 3 + rng.normal(size=(n, 32))).astype(np.float32), y


def test_pairs_of_the_split_merge_the_searches_and_the_hashes():
    # two searches over sets whose rows are the split's in another order, and one row outside the split
    pixels = Pairs(np.array([0, 1]), np.array([4, 2]), np.array([0.999, 0.995], np.float32))
    embeddings = Pairs(np.array([0, 2, 3]), np.array([4, 1, 5]), np.array([0.97, 0.99, 0.96], np.float32))
    to_split = np.array([0, 1, 2, 3, 4, -1])  # store row 5 is not in the split
    sha = np.array(["a", "b", "c", "d", "a"], dtype=object)  # split rows 0 and 4: the same file
    merged = findings.split_pairs([(pixels, to_split, "pixels"), (embeddings, to_split, "resnet50")], sha)
    assert list(zip(merged.first.tolist(), merged.second.tolist(), merged.source.tolist())) == [
        (0, 4, "sha256"), (1, 2, "pixels")]
    assert merged.exact.tolist() == [True, False] and merged.similarity[1] == pytest.approx(0.995)


def test_leaks_are_the_pairs_across_the_parts_closest_first():
    merged = findings.SplitPairs(np.array([0, 1, 2, 3]), np.array([5, 4, 6, 7]), np.array([0.96, 1.0, 0.99, 0.98]),
                                 np.array([False, True, False, False]), np.array(["r", "sha256", "r", "r"], object))
    train = np.array([True, False, True, True, True, True, True, False])
    leaks = findings.leaks_of(merged, train)
    assert list(zip(leaks.held_out.tolist(), leaks.train.tolist())) == [(1, 4), (7, 3)]
    assert leaks.exact.tolist() == [True, False] and not leaks.truncated


def test_confident_learning_finds_a_mislabelled_image():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.85, 0.15], [0.1, 0.9], [0.2, 0.8], [0.15, 0.85]])
    y = np.array([0, 0, 1, 1, 1, 0])  # row 2 looks like class 0, row 5 like class 1
    rows, suggested = findings.label_issues(probabilities, y)
    assert sorted(zip(rows.tolist(), suggested.tolist())) == [(2, 0), (5, 1)]
    rows, _ = findings.label_issues(probabilities, np.array([0, 0, 0, 1, 1, 1]))
    assert not len(rows)  # labels that agree with the classifier raise nothing


def test_out_of_fold_probabilities_and_the_map():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    X, y = clusters(90)
    y = y.copy()
    y[7] = (y[7] + 1) % 3  # mislabelled
    probabilities = findings.out_of_fold_probabilities(make_pipeline(LogisticRegression()), X, y, folds=3, seed=0)
    assert probabilities.shape == (90, 3)
    rows, suggested = findings.label_issues(probabilities, y)
    assert 7 in rows.tolist() and suggested[rows.tolist().index(7)] == (y[7] - 1) % 3
    drawn, coordinates = findings.embedding_map(X, seed=0, points=50)
    assert len(drawn) == 50 and coordinates.shape == (50, 2) and np.isfinite(coordinates).all()


def test_planted_label_errors_of_every_strength_are_found_and_ranked_by_self_confidence():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 16)) * 2.0
    y = np.arange(180) % 3
    X = centres[y] + rng.normal(size=(180, 16))
    # Planted: images of one class given another's label, drawn a share of the way towards their true class
    # (1.0: an image of it; 0.6: between the two, nearer the true class).
    planted = {6: (0, 1, 1.0), 31: (1, 2, 1.0), 52: (2, 0, 1.0), 70: (1, 0, 0.8), 94: (2, 1, 0.8), 125: (0, 2, 0.6)}
    for row, (given, true, strength) in planted.items():
        X[row] = (1 - strength) * centres[given] + strength * centres[true] + rng.normal(size=16) * 0.5
        y[row] = given
    probabilities = findings.out_of_fold_probabilities(make_pipeline(LogisticRegression()), X, y, folds=5, seed=0)
    rows, suggested = findings.label_issues(probabilities, y)
    found = dict(zip(rows.tolist(), suggested.tolist()))
    clear = [row for row, (_, _, strength) in planted.items() if strength >= 0.8]
    assert set(clear) <= set(found) and all(found[row] == planted[row][1] for row in clear)
    given = probabilities[rows, y[rows]]
    assert (np.diff(given) >= 0).all() and rows[0] == int(np.argmin(probabilities[np.arange(180), y]))
    assert set(found) <= set(planted)  # no image of its own class is listed


def test_the_least_likely_given_label_is_an_issue_when_no_class_reaches_its_threshold():
    # What the earlier rule missed: an image whose given label (0) scores 0.02, the lowest of all, while its
    # true class (1) scores 0.669, just under class 1's threshold (0.678 here); other images labelled 0 that
    # look like class 1 make the confident joint count the pair (0, 1).
    confident = [[0.9, 0.05, 0.05]] * 10 + [[0.3, 0.6, 0.1]] * 2 + [[0.2, 0.7, 0.1]] * 2
    ones = [[0.1, 0.6, 0.3], [0.1, 0.756, 0.144]] * 5
    twos = [[0.05, 0.1, 0.85]] * 10
    probabilities = np.array(confident + ones + twos + [[0.02, 0.669, 0.311]])
    y = np.array([0] * 14 + [1] * 10 + [2] * 10 + [0])
    assert probabilities[y == 1, 1].mean() > 0.669
    rows, suggested = findings.label_issues(probabilities, y)
    assert rows[0] == len(y) - 1 and suggested[0] == 1
