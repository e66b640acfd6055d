"""``python -m pipeline.fit``: split the stored embeddings, fit and score the heads, save and report."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.base import clone

from pipeline.errors import Interrupted, UserError, command
from pipeline.extract import cluster
from pipeline.extract.features import describe_features
from pipeline.files import classifiers_dir, exclusive, sha256_file
from pipeline.fit import findings
from pipeline.fit.bundle import BUNDLE_SUFFIX, ClassifierBundle, library_versions, provenance_of
from pipeline.fit.heads import CLASSIFIERS, FOLDS, FittedHead
from pipeline.fit.streaming import CHUNK_ROWS, EPOCHS, RowStream
from pipeline.fit.training import FitSettings, InMemoryRows, OutOfCore, training_rows
from pipeline.models import feature_set_name
from pipeline.models.registry import feature_set_order, parse_feature_set
from pipeline.report.build import (
    PAGE,
    comparison_rows,
    confusion_figure,
    evaluate,
    learning_curve_figure,
    map_figure,
    text_table,
    write_findings,
    write_page,
    write_report,
)
from pipeline.report.results import best_index
from pipeline.store import PIXELS, EmbeddingStore, FeatureSet

logger = logging.getLogger(__name__)

CURVE_PER_CLASS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CURVE_REPEATS = 3  # random draws averaged per point of the learning curve
MIN_TRAIN_PER_CLASS = 2
STAGING = ".fit-in-progress"
LOCK = ".fit.lock"
JOBLIB_BACKENDS = ("loky", "ray")
THUMBNAILS = 8


@dataclass(frozen=True)
class PageOptions:
    """The HTML report: whether to write it, thumbnails per section, and every classifier or the best only."""

    html: bool = True
    thumbnails: int = THUMBNAILS
    every: bool = False


@dataclass
class Split:
    """Labelled rows common to every feature set, and which part each belongs to.

    Attributes
    ----------
    paths : numpy.ndarray
        str ``[N]``, the rows' image paths (the key that aligns feature sets).
    labels : numpy.ndarray
        int ``[N]``, indices into ``classes``.
    classes : list of str
        The classes that have labelled rows.
    part : numpy.ndarray
        str ``[N]``: ``train``, ``validation`` or ``test``.
    source : str
        Where the split came from, in words.
    """

    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]
    part: np.ndarray
    source: str

    @property
    def train(self) -> np.ndarray:
        """Rows used for fitting, validation rows included (they score the hyper-parameters)."""
        return self.part != "test"

    @property
    def test(self) -> np.ndarray:
        return self.part == "test"


def load_features(store: EmbeddingStore, models: Sequence[str] | None,
                  embeddings: bool = True) -> dict[str, FeatureSet]:
    """The feature sets to fit: ``models`` (default: every backbone in the store), then the pixel baseline.

    Without ``embeddings``, only the rows' paths, labels and splits are loaded (for fitting out of core).
    """
    present = store.feature_sets()
    if not store.exists():
        store.load(PIXELS)  # raises the store's own "run extract first" error
    names = [feature_set_name(model) for model in models] if models else sorted(set(present) - {PIXELS},
                                                                                 key=feature_set_order)
    for name in names:
        if name not in present:
            raise UserError(missing_set(store, name, present))
    if not names:
        raise UserError(
            f"{store.path} holds no backbone features (it has: {', '.join(present) or 'none'}); run extract."
        )
    if PIXELS in present:
        names.append(PIXELS)
    else:
        logger.warning(f"{store.path} has no pixels feature set, so the report has no raw-pixel baseline.")
    features = {}
    for name in names:
        feature_set = store.load(name, embeddings)
        if not embeddings:
            features[name] = feature_set  # non-finite rows are caught chunk by chunk
            continue
        finite = np.isfinite(feature_set.embeddings).all(axis=1)
        if not finite.all():
            raise UserError(
                f"{store.path}: {(~finite).sum()} {name} embeddings hold NaN or infinite values (first: "
                f"{feature_set.paths[~finite][0]}); the model file is broken: export it again and extract with "
                "--overwrite."
            )
        features[name] = feature_set
    return features


def missing_set(store: EmbeddingStore, name: str, present: Sequence[str]) -> str:
    """Why ``name`` cannot be fitted, in a sentence: the store holds none, or holds the model at another precision
    (as after an int8 extract), naming that set and the command that makes the one asked for."""
    model, precision = parse_feature_set(name)
    others = [other for other in present if other != PIXELS and parse_feature_set(other)[0] == model]
    if not others:
        return f"{store.path} has no {name!r} features (it has: {', '.join(present) or 'none'}); extract them first."
    return (f"{store.path} holds {model.name} at another precision ({', '.join(others)}), not {name!r}; fit on it with "
            f"--models {others[0]}, or make the {precision} set: {command('extract')} DATA --models {model.name} "
            f"--precision {precision} --cache {store.path}.")


def make_split(features: dict[str, FeatureSet], test_size: float, seed: int, store_path: Path) -> Split:
    """Align the labelled rows of every feature set by path and assign train, validation and test.

    The split recorded by extract is used when the store has one: with a test split as it is; with train
    and validation only (``DATA/{train,validation}/``), the validation images are the test part and the
    settings are chosen by cross-validation on train. Otherwise ``test_size`` of each class is held out at
    random (seeded), keeping at least two training images per class.
    """
    first = next(iter(features.values()))
    common = None
    for feature_set in features.values():  # numpy set operations: no Python object per image
        labelled = np.unique(feature_set.paths[feature_set.labels >= 0])
        common = labelled if common is None else np.intersect1d(common, labelled, assume_unique=True)
    if not len(common):
        raise UserError(
            f"{store_path} has no labelled images to fit on; extract a folder of class sub-folders "
            "(DATA/<class>/<image>) or a CSV with a label column."
        )
    lost = {name: int((fs.labels >= 0).sum()) - len(common) for name, fs in features.items()}
    if any(lost.values()):
        logger.warning(f"fitting on the {len(common)} labelled images every feature set has "
                       f"(others skipped: {lost}); run extract again to complete the store.")
    order = np.flatnonzero(np.isin(first.paths, common))
    paths, store_labels, recorded = first.paths[order], first.labels[order], first.splits[order]
    present = np.unique(store_labels)
    if len(present) < 2:
        raise UserError(
            f"{store_path} has labelled images of only one class ({str(first.classes[present[0]])!r}); a classifier "
            "needs at least two: add a folder per class."
        )
    classes = [str(first.classes[i]) for i in present]
    labels = np.searchsorted(present, store_labels)
    if (recorded == "test").any():
        part = np.where(np.isin(recorded, ["validation", "test"]), recorded, "train").astype(object)
        source = "the train/validation/test split recorded by extract"
    elif (recorded == "validation").any() and (recorded == "train").any():
        # DATA/{train,validation}/<class>/, the classic layout: fitted on train, scored on validation
        part = np.where(recorded == "validation", "test", "train").astype(object)
        source = (f"fitted on the train folder ({int((recorded == 'train').sum())} images; settings by cross-"
                  f"validation on it), scored on the validation folder ({int((recorded == 'validation').sum())} "
                  "images), as the layout recorded by extract says")
    else:
        part = _hold_out(labels, test_size, seed)
        part[recorded == "validation"] = np.where(part[recorded == "validation"] == "test", "test", "validation")
        source = f"a stratified hold-out of {test_size:.0%} per class (seed {seed})"
    split = Split(paths, labels, classes, part.astype(str), source)
    fitting = np.bincount(labels[split.part == "train"], minlength=len(classes))
    if (split.part == "validation").any() and fitting.min() == 0:
        name = classes[int(fitting.argmin())]
        raise UserError(
            f"class {name!r} in {store_path} has all its training images in the validation split, so no setting can "
            "learn it; move some of them to train/."
        )
    counts = np.bincount(labels[split.train], minlength=len(classes))
    if counts.min() < MIN_TRAIN_PER_CLASS:
        name = classes[int(counts.argmin())]
        raise UserError(
            f"class {name!r} has {counts.min()} training image(s) in {store_path}; fitting needs at least "
            f"{MIN_TRAIN_PER_CLASS} per class: add images of it, or leave it out of the dataset."
        )
    return split


def _hold_out(labels: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Per class, ``test_size`` of the rows (rounded) as test, keeping at least two for training."""
    rng = np.random.default_rng(seed)
    part = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(round(len(members) * test_size), len(members) - MIN_TRAIN_PER_CLASS)
        part[members[:max(count, 0)]] = "test"
    return part


def row_indices(feature_set: FeatureSet, paths: np.ndarray) -> np.ndarray:
    """The store rows of ``paths`` (all present), in that order."""
    order = np.argsort(feature_set.paths, kind="stable")
    return order[np.searchsorted(feature_set.paths[order], paths)]


def learning_curve(
    head: FittedHead, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int
) -> dict[str, list]:
    """Test accuracy of ``head``'s chosen pipeline trained on 1, 2, 5, ... images per class, then on all."""
    smallest = int(np.bincount(y).min())
    rng = np.random.default_rng(seed)
    per_class, accuracy = [], []
    for n in [n for n in CURVE_PER_CLASS if n < smallest]:
        scores = []
        for _ in range(CURVE_REPEATS):
            rows = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in np.unique(y)])
            model = clone(head.pipeline).fit(X[rows], y[rows])
            scores.append(float((model.predict(X_test) == y_test).mean()))
        per_class.append(n)
        accuracy.append(float(np.mean(scores)))
    per_class.append(round(len(y) / len(np.unique(y)), 1))
    accuracy.append(float((head.pipeline.predict(X_test) == y_test).mean()))
    return {"per_class": per_class, "accuracy": accuracy}


def run_fit(
    cache: str | Path = "features/embeddings.h5",
    models: Sequence[str] | None = None,
    classifiers: Sequence[str] = CLASSIFIERS,
    out: str | Path | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    n_jobs: int | None = -1,
    folds: int = FOLDS,
    class_weight: str | None = None,
    curve: bool = True,
    reuse: bool = False,
    out_of_core: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    epochs: int = EPOCHS,
    joblib_backend: str = "loky",
    page: PageOptions = PageOptions(),
) -> dict[str, Any]:
    """Fit every classifier on every feature set of the store, score them on the test part, save and report.

    ``out`` defaults to the store's own folder, ``models/classifiers/<store name>/`` (see
    :func:`pipeline.bundle.classifiers_dir`). With ``reuse``, a report in ``out`` made from the same store
    bytes and arguments, whose bundles are
    all present and unchanged, is returned instead of fitting again. With ``out_of_core``, embeddings are
    never all in memory: linear models are fitted by SGD over chunks of ``chunk_rows`` rows for ``epochs``
    passes (see :mod:`pipeline.streaming`), and no learning curve is drawn. ``joblib_backend`` runs the
    hyper-parameter search's parallel fits on ``loky`` (this machine's cores) or ``ray`` (the Ray cluster
    at ``RAY_ADDRESS``, or a local Ray instance).

    Returns
    -------
    dict
        The report, as written to ``out/report.json``.

    Raises
    ------
    UserError
        No store, labels or classes to fit on; a class with fewer than two training images; a backbone
        missing from the store; non-finite embeddings.
    """
    for name in classifiers:
        if name not in CLASSIFIERS:
            raise UserError(f"unknown classifier {name!r}; choose from: {', '.join(CLASSIFIERS)}.")
    if folds < 2:
        raise UserError(f"--folds {folds} must be at least 2.")
    if not 0 <= test_size < 1:
        raise UserError(f"--test-size {test_size} must be at least 0 and below 1.")
    if n_jobs == 0:
        raise UserError("--n-jobs 0 runs nothing; use a positive number of parallel fits, or -1 for every core.")
    if page.thumbnails < 0:
        raise UserError(f"--thumbnails {page.thumbnails} must be at least 0.")
    if out_of_core and (chunk_rows < 1 or epochs < 1):
        raise UserError(f"--chunk-rows {chunk_rows} and --epochs {epochs} must be at least 1.")
    if joblib_backend not in JOBLIB_BACKENDS:
        raise UserError(f"--joblib-backend {joblib_backend} is not one of {', '.join(JOBLIB_BACKENDS)}.")
    store = EmbeddingStore(cache)
    features = load_features(store, models, embeddings=not out_of_core)
    out = Path(out) if out is not None else classifiers_dir(cache)
    inputs = {
        "store_sha256": sha256_file(store.path), "models": list(features), "classifiers": list(classifiers),
        "test_size": test_size, "seed": seed, "folds": folds, "class_weight": class_weight, "learning_curve": curve,
        "report_html": page.html,
    }
    if out_of_core:
        inputs["out_of_core"] = {"chunk_rows": chunk_rows, "epochs": epochs}
    if reuse and (previous := _previous_report(out, inputs)) is not None:
        return previous
    split = make_split(features, test_size, seed, store.path)
    if curve and out_of_core:
        logger.warning("the learning curve needs the training embeddings in memory; none is drawn with --out-of-core.")
        curve = False
    if curve and "logreg" not in classifiers:
        logger.warning("the learning curve is drawn with logreg, which is not among --classifiers; no curve this time.")
    validation = (split.part[split.train] == "validation") if (split.part == "validation").any() else None
    settings = FitSettings(seed, folds, n_jobs, class_weight, validation)
    busy = f"another fit is writing {out}; wait for it to finish, or use another --out."
    with exclusive(out / LOCK, busy), _joblib_backend(joblib_backend):
        try:
            return _fit_all(store, features, split, classifiers, out, inputs, settings, curve,
                            OutOfCore(chunk_rows, epochs) if out_of_core else None, page)
        except KeyboardInterrupt:
            if (out / "report.json").exists():
                raise Interrupted(f"the previous report and classifiers in {out} are as they were") from None
            raise


def _fit_all(
    store: EmbeddingStore, features: dict[str, FeatureSet], split: Split, classifiers: Sequence[str], out: Path,
    inputs: dict[str, Any], settings: FitSettings, curve: bool, out_of_core: OutOfCore | None, page: PageOptions,
) -> dict[str, Any]:
    # Everything is written to a staging folder and moved into ``out`` at the end, report last: until then
    # the previous report and the bundles it lists stay as they were, whatever stops this run.
    final_out, out = out, out / STAGING
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    y_test = split.labels[split.test]
    results, curves, heads, probabilities = [], {}, [], []
    for name, feature_set in features.items():
        rows = training_rows(store, name, feature_set, row_indices(feature_set, split.paths), split.labels,
                             split.train, out_of_core)
        for classifier in classifiers:
            head = rows.fit(classifier, settings)
            result = _result(name, classifier, feature_set.attrs, head, split, rows.describe(classifier, head.params))
            heads.append(head)
            probabilities.append(rows.test_probabilities(head) if len(y_test) else np.zeros((0, len(split.classes))))
            if len(y_test):
                result["test"] = evaluate(probabilities[-1], y_test, split.classes)
                figure = f"confusion-{name}-{classifier}.png"
                title = (f"{_label(name, feature_set.attrs)} + {classifier}: "
                         f"test accuracy {result['test']['accuracy']:.3f}")
                confusion_figure(np.array(result["test"]["confusion"]), split.classes, title, out / figure)
                result["confusion_figure"] = figure
            bundle = ClassifierBundle(
                head.pipeline, split.classes, name, classifier, provenance_of(feature_set.attrs), head.params,
                {"validation_score": head.validation_score, "test": result["test"]}, settings.seed,
            )
            bundle_path = out / f"{name}-{classifier}{BUNDLE_SUFFIX}"
            result["bundle"] = {"path": bundle_path.name, "sha256": bundle.save(bundle_path)}
            results.append(result)
            if classifier == "logreg" and curve and len(y_test) and isinstance(rows, InMemoryRows):
                curves[name] = learning_curve(head, rows.X_train, rows.y_train, rows.X_test, y_test, settings.seed)
                curves[name]["label"] = _label(name, feature_set.attrs)
        rows = None  # one feature set in memory at a time
    report = _report(store, features, split, results, curves, settings.seed, out)
    report["inputs"] = inputs
    if page.html:
        report["findings"] = _findings(store, features, split, results, heads, probabilities, settings, out,
                                       out_of_core)
    write_report(out, report)
    if page.html:
        write_page(out, report, page.thumbnails, page.every)
    _publish(out, final_out)
    return report


def _findings(
    store: EmbeddingStore, features: dict[str, FeatureSet], split: Split, results: list[dict], heads: list[FittedHead],
    probabilities: list[np.ndarray], settings: FitSettings, out: Path, out_of_core: OutOfCore | None,
) -> dict[str, Any]:
    """Leaks, label issues and the map for the best classifier's feature set; the page's data in ``out``."""
    best = best_index(results)
    name = results[best]["features"]
    feature_set = features[name]
    sample = np.arange(len(split.paths))
    if out_of_core is not None:  # a seeded sample, read from the shards
        sample = np.sort(np.random.default_rng(settings.seed).permutation(len(sample))[:findings.LEAK_ROWS])
    X = _rows(store, features, name, split, sample, out_of_core)
    # Near duplicates on the 32x32 pixels (measured), and on the best backbone's embeddings when it is trained.
    searches = [(PIXELS, findings.PIXEL_DUPLICATE)] if PIXELS in features else []
    if name != PIXELS and not feature_set.attrs.get("untrained"):
        searches.append((name, findings.NEAR_DUPLICATE))
    found = []
    for source, threshold in searches or [(name, findings.NEAR_DUPLICATE)]:
        searched = X if source == name else _rows(store, features, source, split, sample, out_of_core)
        sha256 = (features[source].sha256[row_indices(features[source], split.paths)][sample] if out_of_core is None
                  else np.full(len(sample), "", dtype=object))  # identical files still meet as near duplicates (1.0)
        found.append((findings.find_leaks(searched, sha256, split.train[sample], threshold, settings.seed), source))
    leaks = findings.merged(found)
    leaks.held_out, leaks.train = sample[leaks.held_out], sample[leaks.train]
    test_rows = np.flatnonzero(split.test)
    predicted = probabilities[best].argmax(axis=1) if len(test_rows) else np.zeros(0, int)
    wrong = np.zeros(len(split.paths), bool)
    wrong[test_rows[predicted != split.labels[test_rows]]] = True
    leaked = np.isin(test_rows, leaks.held_out)
    correct = predicted == split.labels[test_rows]
    summary = {
        "searched": {source: threshold for source, threshold in searches},
        "pairs": len(leaks), "exact": int(leaks.exact.sum()),
        "near": int((~leaks.exact).sum()), "held_out_images": int(len(np.unique(leaks.held_out))),
        "sampled": leaks.sampled, "truncated": leaks.truncated,
        "accuracy_with": float(correct.mean()) if len(correct) else float("nan"),
        "accuracy_without": float(correct[~leaked].mean()) if (~leaked).any() else float("nan"),
    }
    map_rows, coordinates = findings.embedding_map(X, settings.seed)
    map_figure(coordinates, split.labels[sample][map_rows], wrong[sample][map_rows], split.classes,
               f"{_label(name, feature_set.attrs)}: t-SNE of {len(map_rows)} images", out / "map.png")
    data = {"paths": split.paths, "labels": split.labels, "part": split.part, "best": best,
            "leak_held_out": leaks.held_out, "leak_train": leaks.train, "leak_similarity": leaks.similarity,
            "leak_exact": leaks.exact, "leak_source": leaks.source.astype(str),
            **{f"proba{n}": p for n, p in enumerate(probabilities)}}
    issues = _label_issues(heads[best], X, split, sample, settings, out_of_core, data)
    write_findings(out, data, split.classes)
    return {"best": f"{name}-{results[best]['classifier']}", "features": name, "leaks": summary,
            "label_issues": issues, "map": "map.png", "page": PAGE}


def _rows(store: EmbeddingStore, features: dict[str, FeatureSet], name: str, split: Split, sample: np.ndarray,
          out_of_core: OutOfCore | None) -> np.ndarray:
    """The embeddings of feature set ``name`` at the split's rows ``sample``: from memory, or read from the shards."""
    rows = row_indices(features[name], split.paths)[sample]
    if out_of_core is None:
        return features[name].embeddings[rows]
    return RowStream(store, name, rows, split.labels[sample]).read()


def _label_issues(head: FittedHead, X: np.ndarray, split: Split, sample: np.ndarray, settings: FitSettings,
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


@contextlib.contextmanager
def _joblib_backend(name: str) -> Iterator[None]:
    """Run joblib's parallel fits (the hyper-parameter search's) on ``name``: loky here, or the Ray cluster."""
    if name == "loky":
        yield
        return
    started = cluster.connect()
    try:
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_config(backend="ray"):
            yield
    finally:
        if started:
            cluster.shutdown()


def _publish(staging: Path, out: Path) -> None:
    """Move a finished run's files from ``staging`` into ``out``, the report last, and remove ``staging``."""
    reports = [staging / "report.md", staging / "report.json"]
    for path in [p for p in sorted(staging.iterdir()) if p not in reports] + reports:
        os.replace(path, out / path.name)
    staging.rmdir()


def _previous_report(out: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if report.get("inputs") != inputs:
        return None
    for bundle in report["bundles"]:
        path = out / bundle["path"]
        if not path.exists() or sha256_file(path) != bundle["sha256"]:
            return None
    report["reused"] = True  # not written: says this call fitted nothing
    return report


def _label(name: str, attrs: dict[str, Any]) -> str:
    return f"{name} (untrained)" if attrs.get("untrained") else name


def _result(
    name: str, classifier: str, attrs: dict[str, Any], head: FittedHead, split: Split, description: str
) -> dict[str, Any]:
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


def _report(
    store: EmbeddingStore, features: dict[str, FeatureSet], split: Split, results: list[dict], curves: dict,
    seed: int, out: Path,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.path),
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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.fit``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.fit",
        description=(
            "Fit logistic regression and SVM classifiers on stored embeddings and on the raw-pixel baseline, choose "
            "their hyper-parameters by cross-validation on the training part, score them on the test part, and "
            "save the classifiers and a report (JSON, Markdown, PNG figures)."
        ),
        epilog="Exit status: 0 when done; 2 for an error you can fix (no store, no labels, one class...): one line.",
    )
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="the HDF5 store (default: features/embeddings.h5)")
    parser.add_argument("--models", nargs="+", metavar="MODEL", type=feature_set_name,
                        help="backbone feature sets to fit on: vgg16, resnet50, timm/NAME[.TAG], torchvision/NAME, "
                        "or a precision variant such as resnet50-int8 (default: every one in the store); the pixel "
                        "baseline is added")
    parser.add_argument("--classifiers", nargs="+", choices=CLASSIFIERS, default=list(CLASSIFIERS), metavar="NAME",
                        help=f"classifiers to fit (default: {' '.join(CLASSIFIERS)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="bundles and report (default: models/classifiers/<store name>, "
                        "e.g. models/classifiers/embeddings for features/embeddings.h5: each store its own)")
    parser.add_argument("--test-size", type=float, default=0.2,
                        help="share of each class held out for testing when the store has no recorded test split "
                        "(default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, folds and SVMs (default: 0)")
    parser.add_argument("--n-jobs", type=int, default=-1,
                        help="parallel fits during the search (default: -1, every core)")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"cross-validation folds (default: {FOLDS})")
    parser.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                        help="balanced: weight classes inversely to their frequency (default: none)")
    parser.add_argument("--no-learning-curve", action="store_true", help="skip the learning-curve figure")
    parser.add_argument(
        "--out-of-core", action="store_true",
        help="never hold all embeddings in memory: standardise from a streaming first pass, then fit linear models by "
        "SGD (log-loss for logreg, hinge for svm) over chunks of --chunk-rows rows; for stores larger than memory",
    )
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS,
                        help=f"with --out-of-core: embeddings in memory at once (default: {CHUNK_ROWS})")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help=f"with --out-of-core: SGD passes over the training rows (default: {EPOCHS})")
    parser.add_argument("--report-html", action=argparse.BooleanOptionalAction, default=True,
                        help="write report.html: the images behind the scores, leaks between the split's parts, likely "
                        "label errors, a map of the embeddings (default: on)")
    parser.add_argument("--thumbnails", type=int, default=THUMBNAILS,
                        help=f"images per section of report.html (default: {THUMBNAILS})")
    parser.add_argument("--report-every-classifier", action="store_true",
                        help="confusions and mistakes of every classifier in report.html, not only the best's")
    parser.add_argument(
        "--joblib-backend", choices=JOBLIB_BACKENDS, default="loky",
        help="where the hyper-parameter search's parallel fits run: loky (this machine) or ray (the Ray cluster at "
        "RAY_ADDRESS, or a local Ray instance; needs pip install -e '.[ray]') (default: loky)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Fit, then print the comparison table and where the report is."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    report = run_fit(
        args.cache, args.models, args.classifiers, args.out, args.test_size, args.seed, args.n_jobs,
        args.folds, None if args.class_weight == "none" else args.class_weight, not args.no_learning_curve,
        out_of_core=args.out_of_core, chunk_rows=args.chunk_rows, epochs=args.epochs,
        joblib_backend=args.joblib_backend,
        page=PageOptions(args.report_html, args.thumbnails, args.report_every_classifier),
    )
    print_summary(report, args.out or classifiers_dir(args.cache), time.perf_counter() - started)
    return 0


def print_summary(report: dict[str, Any], out: Path, seconds: float) -> None:
    """Print the provenance, the comparison table and where the report, figures and bundles are."""
    for name, source in report["features"].items():
        flag = "  ** UNTRAINED random weights: not a transfer-learning result **" if source["untrained"] else ""
        print(f"{name}: {source['description']}{flag}")
    data = report["data"]
    print(f"\n{data['classes']} classes, {data['n_train']} training / {data['n_test']} test images; "
          f"split: {data['split']}\n")
    print(text_table(comparison_rows(report["results"])))
    for result in report["results"]:
        for note in result["notes"]:
            print(f"note: {result['features']} + {result['classifier']}: {note}", file=sys.stderr)
    leaks = report.get("findings", {}).get("leaks", {})
    if leaks.get("pairs"):
        without = leaks["accuracy_without"]
        rescored = (f"test accuracy of {report['findings']['best']} without them {without:.3f}, with them "
                    f"{leaks['accuracy_with']:.3f}" if without == without else "no test image is left without one")
        print(f"warning: {leaks['held_out_images']} held-out images also appear in the training part ({leaks['exact']} "
              f"exact, {leaks['near']} near duplicates): {rescored}; see leaks.csv.", file=sys.stderr)
    backbones = [r for r in report["results"] if r["features"] != PIXELS]
    if backbones:  # the pixel baseline has no backbone to merge with: the best backbone bundle is the one to ship
        best = backbones[best_index(backbones)]
        print("to ship the best backbone classifier as one ONNX file: "
              f"make deploy BUNDLE={out / best['bundle']['path']}")
    page = f"{out / PAGE} (open it in a browser), " if report.get("findings") else ""
    print(f"\nreport: {page}{out / 'report.md'} (and report.json, PNG figures); classifiers: {out}/*{BUNDLE_SUFFIX}; "
          f"{seconds:.0f} s")
