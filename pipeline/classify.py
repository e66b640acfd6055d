"""Stage driver: ``python -m pipeline.classify FOLDER``: predict a class for every image with a fitted bundle."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipeline.bundle import ClassifierBundle, check_listed
from pipeline.decode import MAX_PIXELS, PIXELS_FINGERPRINT, batches
from pipeline.discover import discover
from pipeline.embedder import Embedded, embed_files, stored_features
from pipeline.errors import UserError, run_cli
from pipeline.heads import CLASSIFIERS
from pipeline.files import sha256_file
from pipeline.manifest import FEATURE_VARIANTS, PRECISIONS, variant_name
from pipeline.runtime import DEVICES, BackboneSession, open_backbone
from pipeline.store import PIXELS

EXIT_UNREADABLE = 1  # every image got a row, but some could not be decoded (their rows hold the error)
OUTPUT_FORMATS = (".csv", ".jsonl")
PARTIAL = ".partial"


@dataclass
class Prediction:
    """One output row: the image, its top-k classes with probabilities, or why it has none."""

    path: str
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""
    label: str | None = None

    @property
    def prediction(self) -> str:
        return self.classes[0] if self.classes else ""

    @property
    def probability(self) -> float | None:
        return self.probabilities[0] if self.probabilities else None


def choose_bundle(
    classifier: str | os.PathLike | None, model: str | None, classifier_name: str | None, classifiers_dir: Path
) -> Path:
    """The bundle to use: a path, ``<model>-<name>.joblib``, or the best by validation score in ``report.json``.

    A bundle chosen through the report must still have the sha256 the report lists for it.
    """
    if classifier is not None:
        return Path(classifier)
    report_path = classifiers_dir / "report.json"
    if model and classifier_name:
        return classifiers_dir / f"{model}-{classifier_name}.joblib"
    if not report_path.exists():
        raise UserError(f"no {report_path} to choose a classifier from; run fit first (make fit), or pass --classifier PATH.")
    try:
        listed = json.loads(report_path.read_text(encoding="utf-8"))["bundles"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{report_path} is not a report written by pipeline.fit; fit again or pass --classifier PATH.") from None
    candidates = [b for b in listed if (not model or b["features"] == model) and
                  (not classifier_name or b["classifier"] == classifier_name)]
    if not candidates:
        wanted = " ".join(filter(None, [model, classifier_name]))
        raise UserError(f"{report_path} lists no {wanted} classifier; fit it first, or pass --classifier PATH.")
    best = max(candidates, key=lambda b: np.nan_to_num(b["validation_score"], nan=-1.0))  # first of equals
    path = classifiers_dir / best["path"]
    if path.exists() and sha256_file(path) != best["sha256"]:
        raise UserError(f"{path} is not the file {report_path} lists (sha256 differs); fit again or pass --classifier {path}.")
    return path


def open_features(
    bundle: ClassifierBundle, bundle_path: Path, models_dir: Path, device: str,
    precision: str = "auto", allow_precision_change: bool = False,
) -> BackboneSession | None:
    """The backbone the bundle was fitted on, checked by ONNX sha256 (None for the pixel baseline).

    ``precision`` ``auto`` is the bundle's own. Another precision of the same fp32 export is refused
    unless ``allow_precision_change``: its embeddings differ slightly from those the classifier learnt.
    """
    if bundle.features == PIXELS:
        if precision != "auto":
            print(f"notice: --precision {precision} does not apply to {bundle_path}: it classifies raw pixels.", file=sys.stderr)
        return None
    fitted = bundle.provenance.get("precision", "fp32")
    model = bundle.provenance.get("model") or bundle.features
    wanted = fitted if precision == "auto" else precision
    if wanted != fitted and not allow_precision_change:
        raise UserError(
            f"{bundle_path} was fitted on {fitted} embeddings ({bundle.features}), not {wanted}; classify with "
            f"--precision {fitted}, fit a classifier on {variant_name(model, wanted)} features, or pass "
            "--allow-precision-change to use it anyway (predictions may shift slightly)."
        )
    session = open_backbone(models_dir, variant_name(model, wanted), device)
    if wanted == fitted and session.manifest.onnx_sha256 != bundle.onnx_sha256:
        remedy = ("export that model again" if fitted == "fp32" else
                  f"fit again on {session.manifest.name} features extracted with it (the variant was made again)")
        raise UserError(
            f"{bundle_path} was fitted on {bundle.features} embeddings of ONNX sha256 {bundle.onnx_sha256[:12]} "
            f"({bundle.provenance.get('weights_id')}), but {session.onnx_path} has sha256 "
            f"{session.manifest.onnx_sha256[:12]} ({session.manifest.weights_id}); {remedy}, or use a classifier "
            "fitted on this one."
        )
    source = bundle.provenance.get("source_onnx_sha256", bundle.onnx_sha256)
    if wanted != fitted and session.manifest.source_sha256 != source:
        raise UserError(
            f"{session.onnx_path} derives from an fp32 export of sha256 {session.manifest.source_sha256[:12]}, but "
            f"{bundle_path} from one of sha256 {source[:12]}; make the variant again from the current export "
            f"(python -m pipeline.quantize --model {model} --precision {wanted} --force"
            + (" --calibration DATA" if wanted == "int8" else "") + ") or classify at --precision " + fitted + "."
        )
    return session


def predict(
    bundle: ClassifierBundle, embedded: Iterator[Embedded], top_k: int, batch_size: int
) -> Iterator[Prediction]:
    """Predictions in input order, computed a batch at a time; files that could not be decoded keep their error."""
    classes = np.array(bundle.classes)
    for batch in batches(embedded, batch_size):
        good = [item for item in batch if item.features is not None]
        if good:
            probabilities = bundle.pipeline.predict_proba(np.stack([item.features for item in good]))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
            ranked = iter(zip(order, probabilities))
        for item in batch:
            if item.features is None:
                yield Prediction(item.path, error=item.error)
                continue
            top, row = next(ranked)
            yield Prediction(item.path, classes[top].tolist(), [round(float(row[i]), 6) for i in top])


def csv_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function writing one Prediction per CSV row (header first)."""
    writer = csv.writer(stream)
    header = ["path", "prediction", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"top{rank}", f"top{rank}_probability"]
    writer.writerow(header + (["label"] if labelled else []) + ["error"])

    def write(row: Prediction) -> None:
        cells: list[Any] = [row.path, row.prediction, "" if row.probability is None else row.probability]
        for rank in range(1, top_k):
            has = rank < len(row.classes)
            cells += [row.classes[rank] if has else "", row.probabilities[rank] if has else ""]
        writer.writerow(cells + ([row.label or ""] if labelled else []) + [row.error])

    return write


def jsonl_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function writing one Prediction per JSON line."""

    def write(row: Prediction) -> None:
        record: dict[str, Any] = {
            "path": row.path, "prediction": row.prediction or None, "probability": row.probability,
            "top_k": [{"class": c, "probability": p} for c, p in zip(row.classes, row.probabilities)],
        }
        if labelled:
            record["label"] = row.label
        record["error"] = row.error
        stream.write(json.dumps(record) + "\n")

    return write


def table_writer(stream: TextIO, top_k: int, labelled: bool) -> Any:
    """A function printing one Prediction per readable line."""

    def write(row: Prediction) -> None:
        if row.error:
            stream.write(f"{row.path}  ERROR: {row.error}\n")
            return
        others = ", ".join(f"{c} {p:.2f}" for c, p in zip(row.classes[1:], row.probabilities[1:]))
        truth = f"  [label {row.label}]" if labelled and row.label is not None else ""
        stream.write(f"{row.path}  {row.prediction} {row.probability:.2f}" + (f"  ({others})" if others else "") + truth + "\n")

    return write


def run_classify(
    folder: str | os.PathLike,
    bundle_path: Path,
    output: Path | None,
    top_k: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    models_dir: Path = Path("models"),
    cache: Path | None = Path("features/embeddings.h5"),
    workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
    allow_precision_change: bool = False,
    trust: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Classify every image of ``folder`` and write the rows to ``output`` (or print them).

    ``precision`` ``auto`` runs the backbone at the precision the classifier was fitted on. The bundle
    must be listed, with its sha256, in the ``report.json`` beside it (loading it runs code), unless ``trust``.

    Returns
    -------
    dict
        ``images``, ``classified``, ``unreadable``, ``cached`` counts, and ``correct`` / ``labelled`` when
        the folder has class sub-folders.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    if output is not None and output.suffix not in OUTPUT_FORMATS:
        raise UserError(f"--output {output} must end in {' or '.join(OUTPUT_FORMATS)}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k} must be at least 1.")
    if max_pixels < 1:
        raise UserError(f"--max-pixels {max_pixels} must be at least 1.")
    dataset = discover(folder)
    if not trust:
        check_listed(bundle_path)
    bundle = ClassifierBundle.load(bundle_path)
    top_k = min(top_k or 3, len(bundle.classes))
    if bundle.provenance.get("untrained"):
        print(f"warning: {bundle_path} was fitted on UNTRAINED random-weight features; its predictions show the "
              "pipeline works, not what transfer learning can do.", file=sys.stderr)
    session = open_features(bundle, bundle_path, models_dir, device, precision, allow_precision_change)
    batch_size = batch_size or (session.default_batch_size if session else 16)
    if session is None:
        known = stored_features(cache, PIXELS, PIXELS_FINGERPRINT)
    else:
        known = stored_features(cache, session.manifest.name, session.manifest.onnx_sha256)
    shown = [os.path.join(os.fspath(folder), r.path) if dataset.layout != "csv" else str(dataset.absolute(r))
             for r in dataset.records]
    labels = {path: r.label for path, r in zip(shown, dataset.records)}
    labelled = any(label is not None for label in labels.values())
    counts = {"images": len(shown), "classified": 0, "unreadable": 0, "cached": 0, "labelled": 0, "correct": 0}

    def tally(stream: Iterator[Embedded]) -> Iterator[Embedded]:
        for item in stream:
            counts["cached"] += item.cached
            yield item

    embedded = tally(embed_files(shown, session, known, batch_size, workers, progress, max_pixels))
    with _destination(output) as stream:
        write = {".csv": csv_writer, ".jsonl": jsonl_writer}.get(output.suffix if output else "", table_writer)(
            stream, top_k, labelled)
        for row in predict(bundle, embedded, top_k, batch_size):
            row.label = labels[row.path]
            write(row)
            if row.error:
                counts["unreadable"] += 1
                continue
            counts["classified"] += 1
            if row.label is not None:
                counts["labelled"] += 1
                counts["correct"] += row.label == row.prediction
    return counts


@contextlib.contextmanager
def _destination(output: Path | None) -> Iterator[TextIO]:
    """stdout, or ``<output>.partial`` renamed to ``output`` when complete.

    A run that stops early leaves its rows so far in the ``.partial`` file rather than a short ``output``
    that looks complete.
    """
    if output is None:
        yield sys.stdout
        return
    partial = output.with_name(output.name + PARTIAL)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8", newline="") as stream:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, output)


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
    parser.add_argument("--classifier", type=Path, help="a bundle file (default: the best in --classifiers-dir/report.json)")
    parser.add_argument("--model", choices=[*FEATURE_VARIANTS, PIXELS],
                        metavar="FEATURES", help="choose among bundles of these features: vgg16, resnet50, resnet50-int8, "
                        "pixels...")
    parser.add_argument("--classifier-name", choices=CLASSIFIERS, help="choose among bundles of this classifier")
    parser.add_argument("--classifiers-dir", type=Path, default=Path("models/classifiers"), help="fit's --out (default: models/classifiers)")
    parser.add_argument("--output", type=Path, help="write rows to a .csv or .jsonl file (default: print a table)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image, most probable first (default: 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default: 16 on the CPU, 128 on CUDA)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when usable, else CPU (default: auto)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="backbone precision (default: auto, the one the classifier was fitted on)")
    parser.add_argument("--allow-precision-change", action="store_true",
                        help="run a classifier at another precision than it was fitted on (same fp32 export)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"),
                        help="reuse embeddings of images already in this store, by content (default: features/embeddings.h5)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: available cores)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"images that would decode to more pixels get a 'too large' error row (default: {MAX_PIXELS:,})")
    parser.add_argument("--trust", action="store_true",
                        help="load a bundle that no report.json beside it lists with its sha256 (loading runs its code)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Classify, print a summary line on stderr, and return the documented exit status."""
    args = build_parser().parse_args(argv)
    if args.classifier is not None and (args.model or args.classifier_name):
        raise UserError("pass either --classifier PATH or --model / --classifier-name, not both.")
    bundle_path = choose_bundle(args.classifier, args.model, args.classifier_name, args.classifiers_dir)
    counts = run_classify(args.folder, bundle_path, args.output, args.top_k, args.batch_size, args.device,
                          args.models_dir, args.cache, args.workers, precision=args.precision,
                          allow_precision_change=args.allow_precision_change, trust=args.trust,
                          max_pixels=args.max_pixels)
    accuracy = f"; {counts['correct']}/{counts['labelled']} match their folder's label" if counts["labelled"] else ""
    where = f" into {args.output}" if args.output else ""
    reused = (f"{counts['cached']} embeddings reused from {args.cache}" if args.cache.exists()
              else f"no store at {args.cache} to reuse embeddings from")
    print(f"classified {counts['classified']} of {counts['images']} images with {bundle_path}{where} "
          f"({reused}){accuracy}.", file=sys.stderr)
    if counts["unreadable"]:
        print(f"{counts['unreadable']} files could not be decoded; their rows hold the reason.", file=sys.stderr)
        return EXIT_UNREADABLE
    return 0


if __name__ == "__main__":
    run_cli(main)
