"""What fit finds beyond scores, on the best classifier's feature set: leaks across the split, duplicates, likely
label errors, a map of the embeddings; written as the report page's data (the algorithms are in :mod:`findings`
and the store's :mod:`~pipeline.store.neighbors` and :mod:`~pipeline.store.duplicates`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fit import findings
from pipeline.fit.results import Fitted, set_label
from pipeline.fit.split import row_indices
from pipeline.fit.streaming import RowStream, out_of_fold_streaming
from pipeline.fit.training import FitSettings, OutOfCore
from pipeline.report.build import PAGE, map_figure, write_findings
from pipeline.report.results import best_index
from pipeline.store import PIXELS
from pipeline.store.duplicates import group_duplicates, threshold_for


def review(fitted: Fitted, settings: FitSettings, out: Path, out_of_core: OutOfCore | None) -> dict[str, Any]:
    """Leaks, duplicates, label issues and the map for the best classifier's feature set; the page's data in
    ``out``.

    Returns
    -------
    dict
        The report's ``findings``.
    """
    split = fitted.split
    best = best_index(fitted.results)
    name = fitted.results[best]["features"]
    sha256 = split_hashes(fitted, name)
    pairs, searched = search_pairs(fitted, name, sha256)
    leaks = findings.leaks_of(pairs, split.train)
    wrong, summary = leak_summary(fitted, best, leaks)
    duplicates = group_duplicates(len(split.paths), pairs.as_pairs(), sha256)
    map_rows = np.arange(len(split.paths))
    if len(map_rows) > findings.MAP_POINTS:
        map_rows = np.sort(np.random.default_rng(settings.seed).choice(map_rows, findings.MAP_POINTS, replace=False))
    drawn, coordinates = findings.embedding_map(split_rows(fitted, name, map_rows, out_of_core), settings.seed)
    map_rows = map_rows[drawn]
    map_figure(coordinates, split.labels[map_rows], wrong[map_rows], split.classes,
               f"{set_label(name, fitted.features[name].attrs)}: t-SNE of {len(map_rows)} images", out / "map.png")
    data = {"paths": split.paths, "labels": split.labels, "part": split.part, "best": best,
            "leak_held_out": leaks.held_out, "leak_train": leaks.train, "leak_similarity": leaks.similarity,
            "leak_exact": leaks.exact, "leak_source": leaks.source.astype(str),
            "duplicate_group": duplicates.group, "duplicate_rows": duplicates.rows,
            "duplicate_similarity": duplicates.similarity, "duplicate_exact": duplicates.exact,
            **{f"proba{n}": p for n, p in enumerate(fitted.probabilities)}}
    issues = label_issues(fitted, best, settings, out_of_core, data)
    write_findings(out, data, split.classes)
    return {"best": f"{name}-{fitted.results[best]['classifier']}", "features": name,
            "leaks": {**searched, **summary},
            "duplicates": {"groups": duplicates.count, "images": duplicates.images(),
                           "exact": int(duplicates.exact.sum()), "csv": "duplicates.csv"},
            "label_issues": issues, "map": "map.png", "page": PAGE}


def search_pairs(fitted: Fitted, name: str, sha256: np.ndarray) -> tuple[findings.SplitPairs, dict[str, Any]]:
    """Pairs of the split's images that are the same file (equal ``sha256``, the split's) or nearly the same
    image: on the 32x32 pixels
    (measured), and on ``name``'s embeddings when its model is trained; each through the feature set's neighbor
    index over every row of the store version fit reads.

    Returns
    -------
    tuple
        The pairs (row numbers of the split), and the searches run: ``searched`` (feature set to threshold)
        and ``search`` (feature set to its method and measured recall).
    """
    features, split = fitted.features, fitted.split
    searches = [PIXELS] if PIXELS in features else []
    if name != PIXELS and not features[name].attrs.get("untrained"):
        searches.append(name)
    found, method = [], {}
    for source in searches or [name]:
        pairs, index = fitted.store.similar_pairs(source, threshold_for(source), progress=None)
        split_row = np.full(len(features[source].paths), -1, np.int64)
        split_row[row_indices(features[source], split.paths)] = np.arange(len(split.paths))
        found.append((pairs, split_row, source))
        method[source] = {"method": index.method, "recall": pairs.recall, "recall_pairs": pairs.recall_pairs,
                          "truncated": pairs.truncated}
    merged = findings.split_pairs(found, sha256)
    return merged, {"searched": {source: threshold_for(source) for source in searches}, "search": method}


def split_hashes(fitted: Fitted, name: str) -> np.ndarray:
    """The content hash of each of the split's images."""
    feature_set = fitted.features[name]
    return feature_set.sha256[row_indices(feature_set, fitted.split.paths)]


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
        "truncated": leaks.truncated,
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


def label_issues(fitted: Fitted, best: int, settings: FitSettings, out_of_core: OutOfCore | None,
                 data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Confident learning on the best classifier's out-of-fold probabilities of the training images: its settings
    refitted on the other folds, in memory or out of core as it was fitted."""
    split = fitted.split
    name, classifier = fitted.results[best]["features"], fitted.results[best]["classifier"]
    feature_set, head = fitted.features[name], fitted.heads[best]
    train = np.flatnonzero(split.train)
    rows, labels = row_indices(feature_set, split.paths)[train], split.labels[train]
    if out_of_core is None:
        probabilities = findings.out_of_fold_probabilities(head.pipeline, feature_set.embeddings[rows], labels,
                                                           settings.folds, settings.seed)
        method = f"{settings.folds}-fold cross-validation of the chosen classifier"
    else:
        stream = RowStream(fitted.store, name, rows, labels, out_of_core.chunk_rows)
        probabilities = out_of_fold_streaming(classifier, head, stream, settings.folds, settings.seed,
                                              out_of_core.epochs)
        method = (f"{settings.folds}-fold cross-validation of the chosen classifier, out of core (SGD over chunks of "
                  f"at most {out_of_core.chunk_rows} rows)")
    found, suggested = findings.label_issues(probabilities, labels)
    data.update(issue_rows=train[found], issue_suggested=suggested, issue_probabilities=probabilities[found])
    return {"count": int(len(found)), "method": method}
