"""Score fitted classifiers and write the report: JSON, Markdown, PNG figures and the HTML page.

``python -m pipeline.report OUT`` makes the page again from a finished fit, without fitting.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullLocator
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline.errors import UserError
from pipeline.files import atomic_path, classifiers_dir, write_json_atomic
from pipeline.report.duplicates import write_duplicates_csv
from pipeline.report.page import render_page

TOP_K = (3, 5)
PAGE = "report.html"
PAGE_DATA = "report-data.npz"  # what the page shows beyond report.json, so that it can be made again without a fit
_ANNOTATE_MAX_CLASSES = 20  # above this a confusion matrix is drawn without numbers in its cells


def evaluate(probabilities: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Test metrics of one classifier from its predicted probabilities ``[N, C]`` and the true labels ``[N]``.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``top_k`` (``{"top3": ...}`` for each k below the
        number of classes), ``per_class`` (precision, recall, f1, support by class name), ``confusion``
        (rows: true class, columns: predicted) and ``n_test``.
    """
    labels = np.arange(len(classes))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0
    )
    metrics: dict[str, Any] = {
        "n_test": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        "top_k": {
            f"top{k}": float(top_k_accuracy_score(y_true, probabilities, k=k, labels=labels))
            for k in TOP_K if k < len(classes)
        },
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }
    return metrics


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], title: str, path: str | os.PathLike) -> None:
    """Save a confusion matrix, normalised by true class, as a PNG (counts in the cells when it fits)."""
    confusion = np.asarray(confusion, dtype=float)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(classes), 30)
    # Wide enough for the title, which sits over the matrix and its colour bar together.
    figure = Figure(figsize=(max(size, 6.5), size * 0.85 + 0.6), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=90 if len(classes) > 8 else 0)
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.suptitle(title, wrap=True)
    if len(classes) <= _ANNOTATE_MAX_CLASSES:
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                axes.text(column, row, int(count), ha="center", va="center",
                          color="white" if rates[row, column] > 0.5 else "black", fontsize=8)
    _save_png(figure, path)


def learning_curve_figure(curves: dict[str, dict[str, Any]], title: str, path: str | os.PathLike) -> None:
    """Save test accuracy against training images per class, one line per feature set, as a PNG."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    points = set()
    for name, curve in curves.items():
        line, = axes.plot(curve["per_class"], curve["accuracy"], marker="o", label=curve.get("label", name))
        # The last point uses every training image: a star, so that it reads apart from a subset beside it.
        axes.plot(curve["per_class"][-1:], curve["accuracy"][-1:], marker="*", markersize=13, color=line.get_color())
        points |= set(curve["per_class"])
    axes.set_xscale("log")
    ticks = sorted(points)  # a label at each measured point, but for one too close to the next to be read
    axes.set_xticks([t for t, after in zip(ticks, ticks[1:] + [float("inf")]) if after / t >= 1.3])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.set_xlabel("training images per class (log scale; the last point uses them all)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1.02)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title)
    figure.tight_layout()
    _save_png(figure, path)


def map_figure(coordinates: np.ndarray, labels: np.ndarray, wrong: np.ndarray, classes: Sequence[str], title: str,
               path: str | os.PathLike) -> None:
    """Save a 2-D map of embeddings (t-SNE coordinates) as a PNG: colours are classes, crosses test mistakes."""
    figure = Figure(figsize=(7.5, 6), layout="constrained")
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"]
    for number, name in enumerate(classes):
        members = labels == number
        axes.scatter(*coordinates[members].T, s=12, color=colours(number % colours.N), label=name, alpha=0.8)
    if wrong.any():
        axes.scatter(*coordinates[wrong].T, s=40, marker="x", color="black", label="test mistakes")
    axes.set_xticks([])
    axes.set_yticks([])
    if len(classes) <= 20:
        axes.legend(loc="best", fontsize=8, markerscale=1.5)
    axes.set_title(title)
    _save_png(figure, path)


def write_findings(out_dir: str | os.PathLike, data: dict[str, Any], classes: Sequence[str]) -> None:
    """Write the page's data (``report-data.npz``), ``leaks.csv``, ``duplicates.csv`` and ``label-issues.csv`` into
    ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / PAGE_DATA) as tmp, open(tmp, "wb") as stream:
        np.savez_compressed(stream, **{key: np.asarray(value) for key, value in data.items()})
    paths, part = data["paths"], data["part"]
    with atomic_path(out_dir / "leaks.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "other_path", "split", "other_split", "similarity", "found_by"])
        for held, train, similarity, source in zip(data["leak_held_out"], data["leak_train"], data["leak_similarity"],
                                                   data["leak_source"]):
            writer.writerow([paths[held], paths[train], part[held], part[train], f"{similarity:.4f}", source])
    members = data["duplicate_rows"]
    label_names = np.array(classes, dtype=object)
    write_duplicates_csv(out_dir / "duplicates.csv", data["duplicate_group"], paths[members],
                         label_names[data["labels"][members]], part[members], data["duplicate_similarity"],
                         data["duplicate_exact"])
    with atomic_path(out_dir / "label-issues.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "given_label", "suggested_label", "probabilities"])
        for row, suggested, probabilities in zip(data["issue_rows"], data["issue_suggested"],
                                                 data["issue_probabilities"]):
            writer.writerow([paths[row], classes[data["labels"][row]], classes[suggested],
                             json.dumps({name: round(float(p), 4) for name, p in zip(classes, probabilities)})])


def write_page(out_dir: str | os.PathLike, report: dict[str, Any], thumbnails: int = 8, every: bool = False) -> Path:
    """Write ``report.html`` into ``out_dir`` from its report and page data; returns its path."""
    out_dir = Path(out_dir)
    with np.load(out_dir / PAGE_DATA, allow_pickle=False) as loaded:
        data = {key: loaded[key] for key in loaded.files}
    page = render_page(report, data, out_dir, comparison_rows(report["results"]), thumbnails, every)
    with atomic_path(out_dir / PAGE) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_dir / PAGE


def _save_png(figure: Figure, path: str | os.PathLike) -> None:
    # A Figure made without pyplot renders with Agg and leaves the user's interactive backend alone;
    # no Software stamp keeps two runs' figures byte-identical.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def _score(test: dict[str, Any], key: str) -> str:
    return f"{test[key]:.3f}" if key in test else "-"


def comparison_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header and one row per result for the comparison table: features, classifier, scores, time."""
    ks = sorted({k for result in results for k in (result["test"] or {}).get("top_k", {})})
    rows = [["features", "classifier", "accuracy", "balanced acc.", "macro F1", *ks, "validation", "train s",
             "train/test"]]
    for result in results:
        test = result["test"] or {}
        features = result["features"] + (" (untrained)" if result.get("untrained") else "")
        rows.append([
            features, result["classifier"], _score(test, "accuracy"), _score(test, "balanced_accuracy"),
            _score(test, "macro_f1"),
            *[f"{test['top_k'][k]:.3f}" if k in test.get("top_k", {}) else "-" for k in ks],
            f"{result['validation_score']:.3f}", f"{result['train_seconds']:.1f}",
            f"{result['n_train']}/{result['n_test']}",
        ])
    return rows


def text_table(rows: list[list[str]]) -> str:
    """Rows as an aligned plain-text table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    """Rows as a Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_json_atomic(json_path, report)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_report(report), encoding="utf-8")
    return json_path, md_path


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: provenance first, then the comparison, figures and per-class scores."""
    lines = ["# Classifier report", "", "## Where the features come from", ""]
    for name, source in report["features"].items():
        line = f"- **{name}**: {source['description']}"
        lines.append(f"- **{name}: UNTRAINED random weights ({source['description']}); these scores say nothing "
                     "about transfer learning.**" if source.get("untrained") else line)
    data = report["data"]
    lines += [
        "", f"Store `{report['store']}` of `{data['dataset_root']}`: {data['classes']} classes, "
        f"{data['n_train']} training and {data['n_test']} test images; split: {data['split']}. "
        f"Seed {report['seed']}.", "",
        "## Comparison (test part)", "", markdown_table(comparison_rows(report["results"])), "",
        "`validation`: mean accuracy of the chosen hyper-parameters on the validation folds, which chose them; "
        "the test part chose nothing.", "",
    ]
    if report.get("learning_curve"):
        curve = report["learning_curve"]
        lines += ["## Learning curve", "", f"![learning curve]({curve['figure']})", "", curve["description"], ""]
    lines += ["## Each classifier", ""]
    for result in report["results"]:
        title = f"{result['features']} + {result['classifier']}"
        lines += [f"### {title}", "", f"{result['description']}; chosen by {result['selection']}: "
                  f"`{json.dumps(result['params'])}`.", ""]
        lines += [f"- note: {note}" for note in result["notes"]]
        if result["bundle"]:
            lines.append(f"- bundle: `{result['bundle']['path']}` (sha256 `{result['bundle']['sha256']}`)")
        if result["test"]:
            lines += ["", f"![confusion matrix]({result['confusion_figure']})", "",
                      "| class | precision | recall | F1 | test images |", "|---|---|---|---|---|"]
            for name, scores in result["test"]["per_class"].items():
                lines.append(f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | {scores['f1']:.3f} "
                             f"| {scores['support']} |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description=(
            "Make report.html again from a finished fit (its report.json and report-data.npz), without fitting."
        ),
        epilog="Exit status: 0 when written; 2 when there is no finished fit there (one line).",
    )
    parser.add_argument("where", type=Path,
                        help="fit's output folder, or a store (its classifiers: models/classifiers/<store name>)")
    parser.add_argument("--thumbnails", type=int, default=8, help="images per section (default: 8)")
    parser.add_argument("--every-classifier", action="store_true", help="confusions and mistakes of every classifier")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page and say where it is."""
    args = build_parser().parse_args(argv)
    out = args.where if args.where.is_dir() else classifiers_dir(args.where)
    if not (out / "report.json").exists():
        raise UserError(f"no finished fit in {out} (no report.json); run fit first (make fit).")
    if not (out / PAGE_DATA).exists():
        raise UserError(f"{out} has no {PAGE_DATA}: that fit ran without its page (--no-report-html) or before "
                        "pages existed; fit again to make one.")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    print(f"report: {write_page(out, report, args.thumbnails, args.every_classifier)}")
    return 0
