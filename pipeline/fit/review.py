"""What fit finds beyond scores, on the best classifier's feature set: leaks across the split, likely label
errors, a map of the embeddings; written as the report page's data (the algorithms are in :mod:`findings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fit import findings
from pipeline.fit.heads import FittedHead
from pipeline.fit.results import Fitted, set_label
from pipeline.fit.split import Split, row_indices
from pipeline.fit.streaming import RowStream
from pipeline.fit.training import FitSettings, OutOfCore
from pipeline.report.build import PAGE, map_figure, write_findings
from pipeline.report.results import best_index
from pipeline.store import PIXELS


def review(fitted: Fitted, settings: FitSettings, out: Path, out_of_core: OutOfCore | None) -> dict[str, Any]:
    """Leaks, label issues and the map for the best classifier's feature set; the page's data in ``out``.

    Returns
    -------
    dict
        The report's ``findings``.
    """
    split = fitted.split
    best = best_index(fitted.results)
    name = fitted.results[best]["features"]
    sample = np.arange(len(split.paths))
    if out_of_core is not None:  # a seeded sample, read from the shards
        sample = np.sort(np.random.default_rng(settings.seed).permutation(len(sample))[:findings.LEAK_ROWS])
    X = split_rows(fitted, name, sample, out_of_core)
    leaks, searched = search_leaks(fitted, name, X, sample, settings, out_of_core)
    wrong, summary = leak_summary(fitted, best, leaks)
    summary = {"searched": searched, **summary}
    map_rows, coordinates = findings.embedding_map(X, settings.seed)
    map_figure(coordinates, split.labels[sample][map_rows], wrong[sample][map_rows], split.classes,
               f"{set_label(name, fitted.features[name].attrs)}: t-SNE of {len(map_rows)} images", out / "map.png")
    data = {"paths": split.paths, "labels": split.labels, "part": split.part, "best": best,
            "leak_held_out": leaks.held_out, "leak_train": leaks.train, "leak_similarity": leaks.similarity,
            "leak_exact": leaks.exact, "leak_source": leaks.source.astype(str),
            **{f"proba{n}": p for n, p in enumerate(fitted.probabilities)}}
    issues = label_issues(fitted.heads[best], X, split, sample, settings, out_of_core, data)
    write_findings(out, data, split.classes)
    return {"best": f"{name}-{fitted.results[best]['classifier']}", "features": name, "leaks": summary,
            "label_issues": issues, "map": "map.png", "page": PAGE}


def search_leaks(fitted: Fitted, name: str, X: np.ndarray, sample: np.ndarray, settings: FitSettings,
                 out_of_core: OutOfCore | None) -> tuple[findings.Leaks, dict[str, float]]:
    """Pairs of a training and a held-out image among the split's rows ``sample`` that are the same image or
    nearly: on the 32x32 pixels (measured), and on ``name``'s embeddings ``X`` when its model is trained.

    Returns
    -------
    tuple
        The leaks (row numbers of the split), and the searches run: feature set to threshold.
    """
    features, split = fitted.features, fitted.split
    searches = [(PIXELS, findings.PIXEL_DUPLICATE)] if PIXELS in features else []
    if name != PIXELS and not features[name].attrs.get("untrained"):
        searches.append((name, findings.NEAR_DUPLICATE))
    found = []
    for source, threshold in searches or [(name, findings.NEAR_DUPLICATE)]:
        searched = X if source == name else split_rows(fitted, source, sample, out_of_core)
        sha256 = (features[source].sha256[row_indices(features[source], split.paths)][sample] if out_of_core is None
                  else np.full(len(sample), "", dtype=object))  # identical files still meet as near duplicates (1.0)
        found.append((findings.find_leaks(searched, sha256, split.train[sample], threshold, settings.seed), source))
    leaks = findings.merged(found)
    leaks.held_out, leaks.train = sample[leaks.held_out], sample[leaks.train]
    return leaks, dict(searches)


def leak_summary(fitted: Fitted, best: int, leaks: findings.Leaks) -> tuple[np.ndarray, dict[str, Any]]:
    """Which rows the best classifier gets wrong, and the leaks in figures: pairs, exact and near, and its test
    accuracy with and without the held-out images that leaked."""
    split = fitted.split
    test_rows = np.flatnonzero(split.test)
    predicted = fitted.probabilities[best].argmax(axis=1) if len(test_rows) else np.zeros(0, int)
    wrong = np.zeros(len(split.paths), bool)
    wrong[test_rows[predicted != split.labels[test_rows]]] = True
    leaked = np.isin(test_rows, leaks.held_out)
    correct = predicted == split.labels[test_rows]
    return wrong, {
        "pairs": len(leaks), "exact": int(leaks.exact.sum()),
        "near": int((~leaks.exact).sum()), "held_out_images": int(len(np.unique(leaks.held_out))),
        "sampled": leaks.sampled, "truncated": leaks.truncated,
        "accuracy_with": float(correct.mean()) if len(correct) else float("nan"),
        "accuracy_without": float(correct[~leaked].mean()) if (~leaked).any() else float("nan"),
    }


def split_rows(fitted: Fitted, name: str, sample: np.ndarray, out_of_core: OutOfCore | None) -> np.ndarray:
    """The embeddings of feature set ``name`` at the split's rows ``sample``: from memory, or read from the shards."""
    feature_set, split = fitted.features[name], fitted.split
    rows = row_indices(feature_set, split.paths)[sample]
    if out_of_core is None:
        return feature_set.embeddings[rows]
    return RowStream(fitted.store, name, rows, split.labels[sample]).read()


def label_issues(head: FittedHead, X: np.ndarray, split: Split, sample: np.ndarray, settings: FitSettings,
                  out_of_core: OutOfCore | None, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Confident learning on the best classifier's out-of-fold probabilities of the training images."""
    if out_of_core is not None:
        data.update(issue_rows=np.zeros(0, int), issue_suggested=np.zeros(0, int),
                    issue_probabilities=np.zeros((0, len(split.classes))))
        return {"note": "Not looked for out of core: it refits the classifier on folds held in memory."}
    train = np.flatnonzero(split.train[sample])
    probabilities = findings.out_of_fold_probabilities(head.pipeline, X[train], split.labels[sample][train],
                                                       settings.folds, settings.seed)
    rows, suggested = findings.label_issues(probabilities, split.labels[sample][train])
    data.update(issue_rows=sample[train][rows], issue_suggested=suggested, issue_probabilities=probabilities[rows])
    return {"count": int(len(rows)), "method": f"{settings.folds}-fold cross-validation of the chosen classifier"}
