"""fit's report, as report.json holds it: a row per fitted classifier, the feature sets' provenance, the data,
the learning curve; :mod:`pipeline.report` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.extract.features import describe_features
from pipeline.fit.bundle import library_versions, provenance_of
from pipeline.fit.heads import FittedHead
from pipeline.fit.split import Split
from pipeline.fit.training import CURVE_REPEATS
from pipeline.report.build import learning_curve_figure
from pipeline.store import EmbeddingStore, FeatureSet


@dataclass
class Fitted:
    """What a fit run has made, handed from fitting to the report and its findings.

    Attributes
    ----------
    store : EmbeddingStore
    features : dict of str to FeatureSet
        The feature sets fitted on, in report order.
    split : Split
    results : list of dict
        The report's rows (see :func:`result_row`), one per fitted head.
    heads : list of FittedHead
        The heads, in the order of ``results``.
    probabilities : list of numpy.ndarray
        Each head's ``[test rows, classes]`` probabilities.
    curves : dict
        Learning curves per feature set.
    """

    store: EmbeddingStore
    features: dict[str, FeatureSet]
    split: Split
    results: list[dict[str, Any]] = field(default_factory=list)
    heads: list[FittedHead] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)


def set_label(name: str, attrs: dict[str, Any]) -> str:
    """A feature set's name as figures show it, flagged when its weights are untrained."""
    return f"{name} (untrained)" if attrs.get("untrained") else name


def result_row(
    name: str, classifier: str, attrs: dict[str, Any], head: FittedHead, split: Split, description: str
) -> dict[str, Any]:
    """The report's row for ``classifier`` fitted on feature set ``name``; its test scores, figure and bundle are
    filled in as they are made."""
    return {
        "features": name,
        "classifier": classifier,
        "untrained": bool(attrs.get("untrained", False)),
        "description": description,
        "selection": head.selection,
        "params": head.params,
        "validation_score": head.validation_score,
        "train_seconds": round(head.seconds, 2),
        "n_train": int(split.train.sum()),
        "n_test": int(split.test.sum()),
        "notes": head.notes,
        "test": None,
        "confusion_figure": None,
        "bundle": None,
    }


def assemble_report(fitted: Fitted, seed: int, out: Path) -> dict[str, Any]:
    """The report of a run: provenance, data, the results and the learning curves (drawn into ``out``)."""
    store, features, split, results, curves = fitted.store, fitted.features, fitted.split, fitted.results, fitted.curves
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": store.described,
        "store_version": store.pinned,
        "seed": seed,
        "versions": library_versions(),
        "features": {
            name: {
                "description": describe_features(fs.attrs, name),
                "untrained": bool(fs.attrs.get("untrained", False)),
                "provenance": provenance_of(fs.attrs),
            }
            for name, fs in features.items()
        },
        "data": {
            "dataset_root": str(store.root_attrs().get("dataset_root", "")),
            "classes": len(split.classes),
            "class_names": split.classes,
            "split": split.source,
            "n_train": int(split.train.sum()),
            "n_validation": int((split.part == "validation").sum()),
            "n_test": int(split.test.sum()),
        },
        "results": results,
        "bundles": [
            {"path": r["bundle"]["path"], "sha256": r["bundle"]["sha256"], "features": r["features"],
             "classifier": r["classifier"], "validation_score": r["validation_score"]}
            for r in results
        ],
        "learning_curve": None,
    }
    if curves:
        learning_curve_figure(curves, "Test accuracy against training images per class (logreg)",
                              out / "learning-curve.png")
        report["learning_curve"] = {
            "figure": "learning-curve.png",
            "classifier": "logreg",
            "description": (
                "Logistic regression with each feature set's chosen hyper-parameters, trained on n random images "
                f"per class (mean of {CURVE_REPEATS} draws) and scored on the whole test part; the last point uses "
                "every training image. The gap between the pixel baseline and a backbone is what transfer "
                "learning adds on this data" + (
                    "; not here, where some backbones have UNTRAINED random weights."
                    if any(fs.attrs.get("untrained") for fs in features.values()) else "."
                )
            ),
            "curves": curves,
        }
    return report
