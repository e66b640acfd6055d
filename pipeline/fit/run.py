"""``python -m pipeline.fit``: split the stored embeddings, fit and score the heads, save and report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np

from pipeline.errors import Interrupted
from pipeline.extract import cluster
from pipeline.files import classifiers_dir, exclusive, sha256_file
from pipeline.fit.bundle import BUNDLE_SUFFIX, ClassifierBundle, provenance_of
from pipeline.fit.heads import CLASSIFIERS, FOLDS, FittedHead
from pipeline.fit.results import Fitted, assemble_report, result_row, set_label
from pipeline.fit.review import review
from pipeline.fit.split import load_features, make_split, row_indices
from pipeline.fit.staging import LOCK, STAGING, previous_report, publish
from pipeline.fit.streaming import CHUNK_ROWS, EPOCHS
from pipeline.fit.training import FitSettings, InMemoryRows, OutOfCore, TrainingRows, learning_curve, training_rows
from pipeline.models import feature_set_name
from pipeline.options import AtLeast, EachOneOf, Fraction, NotZero, OneOf, Options
from pipeline.report.build import (
    PAGE,
    comparison_rows,
    confusion_figure,
    evaluate,
    text_table,
    write_page,
    write_report,
)
from pipeline.report.results import best_index
from pipeline.store import PIXELS, EmbeddingStore

logger = logging.getLogger(__name__)

JOBLIB_BACKENDS = ("loky", "ray")
THUMBNAILS = 8


@dataclass(frozen=True)
class PageOptions(Options):
    """The HTML report: whether to write it, thumbnails per section, and every classifier or the best only."""

    html: bool = True
    thumbnails: int = THUMBNAILS
    every: bool = False

    constraints: ClassVar = {"thumbnails": [AtLeast(0)]}


@dataclass(frozen=True)
class FitOptions(Options):
    """How :func:`run_fit` fits: ``python -m pipeline.fit``'s options, one field each.

    Attributes
    ----------
    models : sequence of str, optional
        Backbone feature sets to fit on (default: every one in the store); the pixel baseline is added.
    classifiers : sequence of str
        Heads to fit: ``logreg``, ``svm``.
    out : path-like, optional
        Bundles and report; default: the store's own folder, ``models/classifiers/<store name>/`` (see
        :func:`pipeline.files.classifiers_dir`).
    test_size : float
        Share of each class held out when the store records no test split.
    seed : int
        Seed of the split, the folds and the SVMs.
    n_jobs : int, optional
        Parallel fits of the search, as joblib counts them (-1: every core).
    folds : int
        Cross-validation folds.
    class_weight : {None, "balanced"}
    curve : bool
        Draw the learning curve (not out of core).
    reuse : bool
        Return the report in ``out`` made from the same store bytes and options, whose bundles are all present
        and unchanged, instead of fitting again.
    out_of_core : bool
        Never hold every embedding in memory: linear models fitted by SGD over chunks of ``chunk_rows`` rows for
        ``epochs`` passes (see :mod:`pipeline.fit.streaming`).
    chunk_rows, epochs : int
    joblib_backend : {"loky", "ray"}
        Where the search's parallel fits run: this machine's cores, or the Ray cluster at ``RAY_ADDRESS`` (or a
        local Ray instance).
    page : PageOptions
        The HTML report.
    """

    models: Sequence[str] | None = None
    classifiers: Sequence[str] = CLASSIFIERS
    out: str | Path | None = None
    test_size: float = 0.2
    seed: int = 0
    n_jobs: int | None = -1
    folds: int = FOLDS
    class_weight: str | None = None
    curve: bool = True
    reuse: bool = False
    out_of_core: bool = False
    chunk_rows: int = CHUNK_ROWS
    epochs: int = EPOCHS
    joblib_backend: str = "loky"
    page: PageOptions = field(default_factory=PageOptions)

    constraints: ClassVar = {
        "classifiers": [EachOneOf(CLASSIFIERS, "classifier")],
        "test_size": [Fraction()],
        "n_jobs": [None, NotZero()],
        "folds": [AtLeast(2)],
        "class_weight": [None, OneOf(("balanced",))],
        "chunk_rows": [AtLeast(1)],
        "epochs": [AtLeast(1)],
        "joblib_backend": [OneOf(JOBLIB_BACKENDS)],
    }

    @property
    def streaming(self) -> OutOfCore | None:
        """The settings of fitting out of core, or None in memory."""
        return OutOfCore(self.chunk_rows, self.epochs) if self.out_of_core else None


def run_fit(cache: str | Path = "features/embeddings.h5", options: FitOptions | None = None,
            **settings: Any) -> dict[str, Any]:
    """Fit every classifier on every feature set of the store, score them on the test part, save and report.

    Parameters
    ----------
    cache : path-like
        The store.
    options : FitOptions, optional
        What to fit, and where the bundles and report go.
    **settings
        Or some of :class:`FitOptions`' fields by name (``out=..., classifiers=["logreg"]``).

    Returns
    -------
    dict
        The report, as written to ``out/report.json``.

    Raises
    ------
    UserError
        Bad options; no store, labels or classes to fit on; a class with fewer than two training images; a
        backbone missing from the store; non-finite embeddings.
    """
    options = FitOptions.of(options, settings)
    store = EmbeddingStore(cache).snapshot()  # one version for every read of the run, whatever commits meanwhile
    features = load_features(store, options.models, embeddings=not options.out_of_core)
    out = Path(options.out) if options.out is not None else classifiers_dir(cache)
    inputs = fit_inputs(store, list(features), options)
    if options.reuse and (previous := previous_report(out, inputs)) is not None:
        return previous
    split = make_split(features, options.test_size, options.seed, store.path)
    options = drawable_curve(options)
    validation = (split.part[split.train] == "validation") if (split.part == "validation").any() else None
    fit_settings = FitSettings(options.seed, options.folds, options.n_jobs, options.class_weight, validation)
    busy = f"another fit is writing {out}; wait for it to finish, or use another --out."
    with exclusive(out / LOCK, busy), joblib_backend(options.joblib_backend):
        try:
            return fit_all(Fitted(store, features, split), options, fit_settings, inputs, out)
        except KeyboardInterrupt:
            if (out / "report.json").exists():
                raise Interrupted(f"the previous report and classifiers in {out} are as they were") from None
            raise


def fit_inputs(store: EmbeddingStore, names: list[str], options: FitOptions) -> dict[str, Any]:
    """What a report is made from, recorded in it: the store's bytes and the options that change the results."""
    inputs = {
        "store_sha256": sha256_file(store.index_file()), "store_version": store.pinned, "models": names,
        "classifiers": list(options.classifiers),
        "test_size": options.test_size, "seed": options.seed, "folds": options.folds,
        "class_weight": options.class_weight, "learning_curve": options.curve, "report_html": options.page.html,
    }
    if options.out_of_core:
        inputs["out_of_core"] = {"chunk_rows": options.chunk_rows, "epochs": options.epochs}
    return inputs


def drawable_curve(options: FitOptions) -> FitOptions:
    """``options`` without the learning curve where it cannot be drawn, saying why."""
    if options.curve and options.out_of_core:
        logger.warning("the learning curve needs the training embeddings in memory; none is drawn with --out-of-core.")
        return dataclasses.replace(options, curve=False)
    if options.curve and "logreg" not in options.classifiers:
        logger.warning("the learning curve is drawn with logreg, which is not among --classifiers; no curve this time.")
    return options


def fit_all(fitted: Fitted, options: FitOptions, settings: FitSettings, inputs: dict[str, Any],
            out: Path) -> dict[str, Any]:
    """Fit, score and save every head, then write the report and its page into ``out``.

    Everything is written to a staging folder and moved into ``out`` at the end, report last: until then the
    previous report and the bundles it lists stay as they were, whatever stops this run.
    """
    final_out, out = out, out / STAGING
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in fitted.features:
        fit_feature_set(fitted, name, options, settings, out)
    report = assemble_report(fitted, settings.seed, out)
    report["inputs"] = inputs
    if options.page.html:
        report["findings"] = review(fitted, settings, out, options.streaming)
    write_report(out, report)
    if options.page.html:
        write_page(out, report, options.page.thumbnails, options.page.every)
    publish(out, final_out)
    return report


def fit_feature_set(fitted: Fitted, name: str, options: FitOptions, settings: FitSettings, out: Path) -> None:
    """Fit each classifier on feature set ``name`` (held in memory one set at a time), score it on the test part,
    save its bundle into ``out``, and add it to ``fitted``."""
    feature_set, split = fitted.features[name], fitted.split
    rows = training_rows(fitted.store, name, feature_set, row_indices(feature_set, split.paths), split.labels,
                         split.train, options.streaming)
    for classifier in options.classifiers:
        head = rows.fit(classifier, settings)
        result = result_row(name, classifier, feature_set.attrs, head, split, rows.describe(classifier, head.params))
        score(fitted, rows, head, result, out)
        bundle = ClassifierBundle(
            head.pipeline, split.classes, name, classifier,
            {**provenance_of(feature_set.attrs), "store": fitted.store.described}, head.params,
            {"validation_score": head.validation_score, "test": result["test"]}, settings.seed,
        )
        bundle_path = out / f"{name}-{classifier}{BUNDLE_SUFFIX}"
        result["bundle"] = {"path": bundle_path.name, "sha256": bundle.save(bundle_path)}
        fitted.results.append(result)
        fitted.heads.append(head)
        y_test = split.labels[split.test]
        if classifier == "logreg" and options.curve and len(y_test) and isinstance(rows, InMemoryRows):
            fitted.curves[name] = learning_curve(head, rows.X_train, rows.y_train, rows.X_test, y_test, settings.seed)
            fitted.curves[name]["label"] = set_label(name, feature_set.attrs)


def score(fitted: Fitted, rows: TrainingRows, head: FittedHead, result: dict[str, Any], out: Path) -> None:
    """``head``'s test probabilities into ``fitted``, and its test scores and confusion figure into ``result``."""
    split = fitted.split
    y_test = split.labels[split.test]
    fitted.probabilities.append(rows.test_probabilities(head) if len(y_test) else np.zeros((0, len(split.classes))))
    if not len(y_test):
        return
    result["test"] = evaluate(fitted.probabilities[-1], y_test, split.classes)
    name, classifier = result["features"], result["classifier"]
    figure = f"confusion-{name}-{classifier}.png"
    title = (f"{set_label(name, fitted.features[name].attrs)} + {classifier}: "
             f"test accuracy {result['test']['accuracy']:.3f}")
    confusion_figure(np.array(result["test"]["confusion"]), split.classes, title, out / figure)
    result["confusion_figure"] = figure


@contextlib.contextmanager
def joblib_backend(name: str) -> Iterator[None]:
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
    options = FitOptions(
        models=args.models, classifiers=args.classifiers, out=args.out, test_size=args.test_size, seed=args.seed,
        n_jobs=args.n_jobs, folds=args.folds, class_weight=None if args.class_weight == "none" else args.class_weight,
        curve=not args.no_learning_curve, out_of_core=args.out_of_core, chunk_rows=args.chunk_rows,
        epochs=args.epochs, joblib_backend=args.joblib_backend,
        page=PageOptions(html=args.report_html, thumbnails=args.thumbnails, every=args.report_every_classifier),
    )
    started = time.perf_counter()
    report = run_fit(args.cache, options=options)
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
