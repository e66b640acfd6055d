"""``python -m pipeline.classify FOLDER``: predict every image's class with a bundle or a deployed ONNX."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import UserError, counted
from pipeline.extract.decode import MAX_PIXELS, PIXELS_FINGERPRINT, batches
from pipeline.extract.discover import Dataset, discover
from pipeline.files import classifiers_dir, sha256_file
from pipeline.fit.bundle import BUNDLE_SUFFIX, ClassifierBundle
from pipeline.fit.heads import CLASSIFIERS
from pipeline.models import PRECISIONS, BackboneSession, ModelRepository, feature_set_name, open_deployed
from pipeline.models.session import DEVICES
from pipeline.options import AtLeast, OneOf, Options, Suffix
from pipeline.report.results import Report
from pipeline.serve.bundles import check_listed, open_fitted_backbone
from pipeline.serve.embedder import Embedded, embed_files, stored_features
from pipeline.serve.predictions import OUTPUT_FORMATS, Prediction, write_predictions
from pipeline.store import PIXELS, StoreLocation

logger = logging.getLogger(__name__)

EXIT_UNREADABLE = 1  # every image got a row, but some could not be decoded (their rows hold the error)


@dataclass(frozen=True)
class ClassifyOptions(Options):
    """How :func:`run_classify` classifies: ``python -m pipeline.classify``'s options, one field each.

    Attributes
    ----------
    output : path-like, optional
        A ``.csv`` or ``.jsonl`` file for the rows (default: a table on stdout).
    top_k : int, optional
        Classes per image, most probable first (default: 3, or every class when fewer).
    batch_size : int, optional
        Images per inference batch (default: the device's).
    device : {"auto", "cuda", "cpu"}
    models_dir : path-like
        The exported models.
    cache : path-like, optional
        A store whose embeddings are reused by content hash (not with a deployed ``.onnx``).
    workers : int, optional
        Decoding threads (default: the available cores).
    progress : bool, optional
        Draw a progress bar (default: when stderr is a terminal).
    precision : {"auto", "fp32", "fp16", "int8"}
        ``auto`` runs the backbone at the precision the classifier was fitted on.
    allow_precision_change : bool
        Run a classifier at another precision than it was fitted on.
    trust : bool
        Load a bundle that no ``report.json`` beside it lists, or a joblib bundle of an earlier version.
    max_pixels : int
        Images that would decode to more pixels get a "too large" error row.
    """

    output: Path | None = None
    top_k: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    models_dir: Path = Path("models")
    cache: Path | None = Path("features/embeddings.h5")
    workers: int | None = None
    progress: bool | None = None
    precision: str = "auto"
    allow_precision_change: bool = False
    trust: bool = False
    max_pixels: int = MAX_PIXELS

    constraints: ClassVar = {
        "output": [None, Suffix(OUTPUT_FORMATS)],
        "top_k": [None, AtLeast(1)],
        "batch_size": [None, AtLeast(1)],
        "device": [OneOf(DEVICES)],
        "workers": [None, AtLeast(1)],
        "precision": [OneOf(("auto", *PRECISIONS))],
        "max_pixels": [AtLeast(1)],
    }


def choose_bundle(
    classifier: str | os.PathLike | None, model: str | None, classifier_name: str | None, classifiers_dir: Path
) -> Path:
    """The bundle to use: a path, ``<model>-<name>.skops``, or the best by validation score in ``report.json``.

    A bundle chosen through the report must still have the sha256 the report lists for it.
    """
    if classifier is not None:
        return Path(classifier)
    report_path = classifiers_dir / "report.json"
    if model and classifier_name:
        return classifiers_dir / f"{model}-{classifier_name}{BUNDLE_SUFFIX}"
    best = Report.load(report_path).best("bundles", features=model, classifier=classifier_name)
    if best is None:
        wanted = " ".join(filter(None, [model, classifier_name]))
        raise UserError(f"{report_path} lists no {wanted} classifier; fit it first, or pass --classifier PATH.")
    path = classifiers_dir / best["path"]
    if path.exists() and sha256_file(path) != best["sha256"]:
        raise UserError(f"{path} is not the file {report_path} lists (sha256 differs); fit again or pass "
                        f"--classifier {path}.")
    return path


@dataclass
class Classifier:
    """What classify runs: the images' session, how its outputs become probabilities, and the class names.

    Attributes
    ----------
    classes : list of str
        Class names, in the order of the probabilities' columns.
    session : BackboneSession or None
        The backbone (or deployed classifier) images go through; None for the raw-pixel baseline.
    probabilities : callable
        ``[N, D]`` session outputs to ``[N, C]`` class probabilities (the identity for a deployed classifier).
    known : mapping
        Stored features reusable by content hash (empty for a deployed classifier: they are not probabilities).
    untrained : bool
        Whether the features come from random weights.
    """

    classes: list[str]
    session: BackboneSession | None
    probabilities: Callable[[np.ndarray], np.ndarray]
    known: Mapping[str, np.ndarray]
    untrained: bool

    @property
    def features(self) -> str:
        """What its features are, in words: the backbone, its precision, weights and their licence."""
        if self.session is None:
            return "raw 32x32 pixels"
        manifest = self.session.manifest
        return f"{manifest.model} {manifest.precision}, weights {manifest.weights_id}, licence {manifest.license}"


def open_classifier(path: Path, options: ClassifyOptions) -> Classifier:
    """A bundle with the backbone it was fitted on, or a deployed ``.onnx`` classifier (no pickle loaded).

    Raises
    ------
    UserError
        An unlisted bundle (unless ``options.trust``), a backbone or precision that does not match, or a changed
        file.
    """
    if path.suffix == ".onnx":
        deployed = open_deployed(path)
        if options.precision not in ("auto", deployed.precision):
            raise UserError(
                f"{path} runs its backbone at {deployed.precision}, merged into the file; classify without "
                f"--precision {options.precision}, or deploy a classifier fitted on {options.precision} features."
            )
        session = deployed.open(options.device)
        return Classifier(deployed.manifest.classes, session, lambda probabilities: probabilities, {},
                          deployed.untrained)
    if not options.trust:
        check_listed(path)
    bundle = ClassifierBundle.load(path, options.trust)
    session = open_fitted_backbone(bundle, path, ModelRepository(options.models_dir), options.device,
                                   options.precision, options.allow_precision_change)
    if session is None:
        known = stored_features(options.cache, PIXELS, PIXELS_FINGERPRINT)
    else:
        known = stored_features(options.cache, session.manifest.name, session.manifest.onnx_sha256)
    return Classifier(bundle.classes, session, bundle.pipeline.predict_proba, known,
                      bool(bundle.provenance.get("untrained")))


def predict(
    classifier: Classifier, embedded: Iterator[Embedded], top_k: int, batch_size: int
) -> Iterator[Prediction]:
    """Predictions in input order, computed a batch at a time; files that could not be decoded keep their error."""
    classes = np.array(classifier.classes)
    for batch in batches(embedded, batch_size):
        good = [item for item in batch if item.features is not None]
        if good:
            probabilities = classifier.probabilities(np.stack([item.features for item in good]))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
            ranked = iter(zip(order, probabilities))
        for item in batch:
            if item.features is None:
                yield Prediction(item.path, error=item.error)
                continue
            top, row = next(ranked)
            yield Prediction(item.path, classes[top].tolist(), [round(float(row[i]), 6) for i in top])


def run_classify(folder: str | os.PathLike, bundle_path: Path, options: ClassifyOptions | None = None,
                 **settings: Any) -> dict[str, Any]:
    """Classify every image of ``folder`` and write the rows to ``options.output`` (or print them).

    Parameters
    ----------
    folder : path-like
        An image folder (any layout extract accepts) or a CSV manifest.
    bundle_path : Path
        A bundle written by fit, or a ``.onnx`` classifier written by deploy (which loads no pickle and reuses
        no stored embeddings). A bundle must be listed, with its sha256, in the ``report.json`` beside it,
        unless ``options.trust``.
    options : ClassifyOptions, optional
    **settings
        Or some of :class:`ClassifyOptions`' fields by name (``output=..., cache=None``).

    Returns
    -------
    dict
        ``images``, ``classified``, ``unreadable``, ``cached`` counts, and ``correct`` / ``labelled`` when
        the folder has class sub-folders.
    """
    options = ClassifyOptions.of(options, settings)
    dataset = discover(folder)
    classifier = open_classifier(bundle_path, options)
    check_fits(classifier, dataset, folder, bundle_path)
    shown = [os.path.join(os.fspath(folder), r.path) if dataset.layout != "csv" else str(dataset.absolute(r))
             for r in dataset.records]
    labels = {path: r.label for path, r in zip(shown, dataset.records)}
    counts = {"images": len(shown), "classified": 0, "unreadable": 0, "cached": 0, "labelled": 0, "correct": 0}

    def tally(stream: Iterator[Embedded]) -> Iterator[Embedded]:
        for item in stream:
            counts["cached"] += item.cached
            yield item

    session = classifier.session
    batch_size = options.batch_size or (session.default_batch_size if session else 16)
    embedded = tally(embed_files(shown, session, classifier.known, batch_size, options.workers, options.progress,
                                 options.max_pixels))
    top_k = min(options.top_k or 3, len(classifier.classes))
    write_predictions(predict(classifier, embedded, top_k, batch_size), labels, top_k, options.output, counts)
    return counts


def check_fits(classifier: Classifier, dataset: Dataset, folder: str | os.PathLike, bundle_path: Path) -> None:
    """Say what the classifier's features are, and warn when they are untrained or its classes are not the
    folder's."""
    if classifier.untrained:
        logger.warning(f"{bundle_path} was fitted on UNTRAINED random-weight features; its predictions show the "
                       "pipeline works, not what transfer learning can do.")
    if dataset.classes and not set(dataset.classes) & set(classifier.classes):
        logger.warning(f"none of {folder}'s class names ({_few(dataset.classes)}) is a class of {bundle_path} "
                       f"({_few(classifier.classes)}): it was fitted on other images; the classifiers fitted on "
                       "a store are in models/classifiers/<store name> (classify --cache STORE picks them).")
    logger.info(f"{bundle_path}: features {classifier.features}.")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.classify``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.classify",
        description="Predict a class for every image of a folder (or CSV) with a classifier fitted by pipeline.fit.",
        epilog=(
            "Exit status: 0 when every image was classified; 1 when some files could not be decoded (they still get a "
            "row, with the error); 2 when the folder has no images, an argument is wrong, or the classifier and the "
            "model do not match (one line, no traceback); 130 when interrupted."
        ),
    )
    parser.add_argument("folder", help="image folder (any layout extract accepts) or CSV manifest")
    parser.add_argument("--classifier", type=Path,
                        help="a bundle (.skops; a .joblib of an earlier version with --trust) or a classifier made by "
                        "pipeline.deploy (.onnx) (default: the best bundle in --classifiers-dir/report.json)")
    parser.add_argument("--model", type=_features, metavar="FEATURES",
                        help="choose among bundles of these features: vgg16, resnet50, resnet50-int8, "
                        "timm/convnext_atto.d2_in1k, pixels...")
    parser.add_argument("--classifier-name", choices=CLASSIFIERS, help="choose among bundles of this classifier")
    parser.add_argument("--classifiers-dir", type=Path, default=None,
                        help="fit's --out (default: the classifiers fitted on --cache: "
                        "models/classifiers/<store name>)")
    parser.add_argument("--output", type=Path, help="write rows to a .csv or .jsonl file (default: print a table)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image, most probable first (default: 3)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per inference batch (default: 16 on the CPU, 128 on CUDA)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA when usable, else CPU (default: auto)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="backbone precision (default: auto, the one the classifier was fitted on; "
                        "a deployed .onnx has its own)")
    parser.add_argument("--allow-precision-change", action="store_true",
                        help="run a classifier at another precision than it was fitted on (same fp32 export)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="reuse embeddings of images already in this store, by content "
                        "(default: features/embeddings.h5; not with a deployed .onnx, which gives probabilities)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: available cores)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="images that would decode to more pixels get a 'too large' error row "
                        f"(default: {MAX_PIXELS:,})")
    parser.add_argument("--trust", action="store_true",
                        help="load a bundle that no report.json beside it lists with its sha256, or a joblib bundle "
                        "of an earlier version (unpickling it runs its code; transfer bundles FOLDER rewrites those "
                        "as skops)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Classify, print a summary line on stderr, and return the documented exit status."""
    args = build_parser().parse_args(argv)
    if args.classifier is not None and (args.model or args.classifier_name):
        raise UserError("pass either --classifier PATH or --model / --classifier-name, not both.")
    options = ClassifyOptions(
        output=args.output, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
        models_dir=args.models_dir, cache=args.cache, workers=args.workers, precision=args.precision,
        allow_precision_change=args.allow_precision_change, trust=args.trust, max_pixels=args.max_pixels,
    )
    folder = args.classifiers_dir or classifiers_dir(args.cache)
    chosen_by_store = args.classifier is None and args.classifiers_dir is None
    if chosen_by_store and not StoreLocation(args.cache).exists() and not folder.exists():
        raise UserError(f"no store at --cache {args.cache}, and no classifiers fitted on it in {folder}; check --cache "
                        "(the store you fitted), or run fit on it first.")
    bundle_path = choose_bundle(args.classifier, args.model, args.classifier_name, folder)
    counts = run_classify(args.folder, bundle_path, options=options)
    print_summary(counts, bundle_path, options)
    if counts["unreadable"]:
        print(f"{counted(counts['unreadable'], 'file')} could not be decoded; their rows hold the reason.",
              file=sys.stderr)
        return EXIT_UNREADABLE
    return 0


def print_summary(counts: dict[str, int], bundle_path: Path, options: ClassifyOptions) -> None:
    """One line on stderr: how many images were classified, with what, into where, and how many matched."""
    accuracy = f"; {counts['correct']}/{counts['labelled']} match their folder's label" if counts["labelled"] else ""
    where = f" into {options.output}" if options.output else ""
    if bundle_path.suffix == ".onnx":
        reused = "a deployed classifier embeds every image"
    elif StoreLocation(options.cache).exists():
        reused = f"{counts['cached']} embeddings reused from {options.cache}"
    else:
        reused = f"no store at {options.cache} to reuse embeddings from"
    print(f"classified {counts['classified']} of {counts['images']} images with {bundle_path}{where} "
          f"({reused}){accuracy}.", file=sys.stderr)


def _features(text: str) -> str:
    """A feature-set name as bundles record it, from a model or feature-set name (argparse's type)."""
    return text if text == PIXELS else feature_set_name(text)


def _few(names: Sequence[str]) -> str:
    return ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
