"""Report: metrics from probabilities, tables, the Markdown report and the figures."""

from __future__ import annotations

import numpy as np

from pipeline.report.build import (
    comparison_rows,
    confusion_figure,
    evaluate,
    learning_curve_figure,
    markdown_report,
    text_table,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_metrics_from_probabilities():
    probabilities = np.array([[0.7, 0.2, 0.1, 0], [0.1, 0.6, 0.3, 0], [0.5, 0.1, 0.4, 0], [0.1, 0.1, 0.2, 0.6]])
    metrics = evaluate(probabilities, np.array([0, 1, 2, 3]), ["a", "b", "c", "d"])
    assert metrics["accuracy"] == 0.75 and metrics["n_test"] == 4
    assert metrics["balanced_accuracy"] == 0.75
    assert metrics["top_k"] == {"top3": 1.0}  # top5 is not below 4 classes
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["a"]["precision"] == 0.5
    assert metrics["confusion"][2] == [1, 0, 0, 0]


def result(features="resnet50", untrained=False, accuracy=0.9):
    return {
        "features": features, "classifier": "logreg", "untrained": untrained, "description": "logistic regression",
        "selection": "3-fold", "params": {"C": 1.0}, "validation_score": 0.8, "train_seconds": 1.25,
        "n_train": 8, "n_test": 2, "notes": ["a note"], "confusion_figure": "c.png",
        "test": {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy, "top_k": {},
                 "per_class": {"a": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}},
        "bundle": {"path": "resnet50-logreg.skops", "sha256": "ab" * 32},
    }


def test_tables_align_and_flag_untrained_features():
    rows = comparison_rows([result(), result("pixels", accuracy=0.5), result("vgg16", untrained=True)])
    assert rows[0][:3] == ["features", "classifier", "accuracy"]
    assert rows[1][:3] == ["resnet50", "logreg", "0.900"] and rows[3][0] == "vgg16 (untrained)"
    lines = text_table(rows).splitlines()
    assert len(lines) == 5 and set(lines[1]) == {"-", " "}
    assert lines[2].index("logreg") == lines[0].index("classifier") == lines[4].index("logreg")
    assert lines[2].index("0.900") == lines[0].index("accuracy")


def test_markdown_report_heads_with_provenance_in_bold_when_untrained():
    report = {
        "features": {"vgg16": {"description": "vgg16 random", "untrained": True},
                     "pixels": {"description": "raw pixels", "untrained": False}},
        "store": "s.h5", "seed": 0,
        "data": {"dataset_root": "/d", "classes": 1, "n_train": 8, "n_test": 2, "split": "recorded"},
        "results": [result("vgg16", untrained=True)], "learning_curve": None,
    }
    text = markdown_report(report)
    assert text.index("Where the features come from") < text.index("Comparison")
    assert "- **vgg16: UNTRAINED random weights (vgg16 random); these scores say nothing" in text
    assert "- **pixels**: raw pixels" in text and "sha256 `" + "ab" * 32 in text and "- note: a note" in text


def test_figures_are_pngs(tmp_path):
    confusion_figure(np.array([[3, 1], [0, 4]]), ["cat", "dog"], "title", tmp_path / "c.png")
    curves = {"pixels": {"per_class": [1, 2, 4.5], "accuracy": [0.3, 0.4, 0.5]}}
    learning_curve_figure(curves, "title", tmp_path / "l.png")
    for name in ("c.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp"))
