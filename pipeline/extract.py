"""Stage driver: ``python -m pipeline.extract DATA``: discover, decode in threads, embed on onnxruntime, store."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.backbones import BACKBONES, Preprocessing
from pipeline.decode import PIXELS_FINGERPRINT, PIXELS_PREPROCESSING, PIXELS_SIZE, DecodedImage, batches, decode_file, map_ordered
from pipeline.discover import Dataset, ImageRecord, discover
from pipeline.errors import UserError, run_cli
from pipeline.manifest import PRECISIONS, ModelManifest, model_paths, variant_name
from pipeline.quantize import CALIBRATION_IMAGES, calibration_paths, check_calibration_images, current_variant, describe, make_variant
from pipeline.runtime import CUDA, DEVICES, BackboneSession, available_cores, open_backbone
from pipeline.store import PIXELS, EmbeddingStore, FileState, Segment
from pipeline.weights import parse_weights

EXIT_SKIPPED = 1  # with --strict: the run finished but some files could not be decoded
UNREADABLE = FileState("", -1, -1)
JOURNAL_ROWS = 512  # results are journaled at least every this many images...
JOURNAL_SECONDS = 30.0  # ...or this many seconds, so a kill loses at most that much work


@dataclass
class FeatureSpec:
    """One feature set to compute: a backbone session, or the raw-pixel baseline (``session`` None)."""

    name: str
    fingerprint: str
    attrs: dict
    session: BackboneSession | None = None
    crop_index: int = 0
    seconds: float = 0.0
    embedded: int = 0
    skipped: int = 0

    def features(self, decoded: Sequence[DecodedImage]) -> np.ndarray:
        """Features of successfully decoded images, ``[N, D]`` float32."""
        if self.session is None:
            return np.stack([d.pixels for d in decoded])
        started = time.perf_counter()
        result = self.session.embed(np.stack([d.crops[self.crop_index] for d in decoded]))
        self.seconds += time.perf_counter() - started
        return result


@dataclass
class WorkItem:
    """An image that at least one feature set still needs, with the file state it had when listed."""

    record: ImageRecord
    state: FileState  # UNREADABLE when the file vanished or cannot be stat'ed
    needed: list[str] = field(default_factory=list)


def model_manifest(models_dir: Path, model: str, weights: str) -> ModelManifest:
    """The manifest of ``model``, exporting it first when it is missing or was exported with other weights."""
    onnx_path, manifest_path = model_paths(models_dir, model)
    image_size = BACKBONES[model].crop_size
    if manifest_path.exists() and onnx_path.exists():
        manifest = ModelManifest.load(manifest_path)
        if manifest.weights_id == parse_weights(BACKBONES[model], weights).identity():
            return manifest
        image_size = manifest.input["size"]
        print(f"{model}: {onnx_path} has weights {manifest.weights_id}, not {weights}.", file=sys.stderr)
    try:
        from pipeline.export import UNTRAINED_BANNER, describe, export_backbone
    except ImportError:
        raise UserError(
            f"exporting {onnx_path} needs torch; install the export extra "
            "(pip install -e .[export]) or copy the exported model there."
        ) from None
    print(f"{model}: exporting {onnx_path} with --weights {weights} first.", file=sys.stderr)
    result = export_backbone(model, weights, image_size, out_dir=models_dir)
    if result.manifest.untrained:
        print(UNTRAINED_BANNER.format(model=model), file=sys.stderr)
    print(describe(result), file=sys.stderr)
    return result.manifest


def open_sessions(
    models_dir: Path, models: Sequence[str], device: str, precision: str, dataset: Dataset, calibration_images: int,
    stored: Collection[str] = (),
) -> list[BackboneSession]:
    """Open a session per model at ``precision``, making fp16 / int8 variants first where missing or stale.

    Parameters
    ----------
    models_dir : Path
        Folder of the fp32 exports; variants are written beside them.
    models : sequence of str
        Backbone names.
    device : {"auto", "cuda", "cpu"}
    precision : {"auto", "fp32", "fp16", "int8"}
        ``auto``: the precision the store already holds for that model when it holds exactly one,
        otherwise fp16 where the model runs on CUDA and fp32 on the CPU.
    dataset : Dataset
        int8 variants are calibrated on a sample of its images outside its test split.
    calibration_images : int
        Size of that sample.
    stored : collection of str
        Feature sets the store holds already.

    Returns
    -------
    list of BackboneSession
    """
    sessions = []
    for model in models:
        wanted = precision
        if precision == "auto":
            held = [p for p in PRECISIONS if variant_name(model, p) in stored]
            if len(held) == 1:
                wanted = held[0]
            else:
                session = open_backbone(models_dir, model, device)
                if session.provider != CUDA:
                    sessions.append(session)
                    continue
                wanted = "fp16"
        if wanted != "fp32" and current_variant(models_dir, model, wanted) is None:
            print(f"{model}: making its {wanted} variant first.", file=sys.stderr)
            manifest = make_variant(models_dir, model, wanted, calibration_paths(dataset), calibration_images)
            print(describe(manifest), file=sys.stderr)
        sessions.append(open_backbone(models_dir, variant_name(model, wanted), device))
    return sessions


def feature_specs(sessions: Sequence[BackboneSession]) -> tuple[list[FeatureSpec], list[Preprocessing]]:
    """Feature sets for the sessions plus the pixel baseline, and the distinct crops they need."""
    preprocessings: list[Preprocessing] = []
    specs = []
    for session in sessions:
        manifest = session.manifest
        spec_input = manifest.input
        preprocessing = manifest.preprocessing
        if preprocessing not in preprocessings:
            preprocessings.append(preprocessing)
        attrs = {
            "kind": "onnx",
            "model": manifest.model,
            "precision": manifest.precision,
            "source_onnx_sha256": manifest.source_sha256,
            "calibration_images": manifest.calibration.get("images", 0),
            "calibration_sha256": _digest(manifest.calibration.get("sha256", [])),
            "fingerprint": manifest.onnx_sha256,
            "onnx_file": manifest.onnx_file,
            "onnx_sha256": manifest.onnx_sha256,
            "weights_source": manifest.weights["source"],
            "weights_id": manifest.weights_id,
            "weights_sha256": manifest.weights.get("sha256", ""),
            "weights": json.dumps(manifest.weights),
            "untrained": manifest.untrained,
            "image_size": spec_input["size"],
            "resize_size": spec_input["resize_size"],
            "interpolation": spec_input["interpolation"],
            "provider": session.provider,
            "embedding_dim": manifest.output["dim"],
            "embedding_layer": manifest.output["layer"],
        }
        specs.append(FeatureSpec(manifest.name, manifest.onnx_sha256, attrs, session, preprocessings.index(preprocessing)))
    pixel_attrs = {
        "kind": "pixels",
        "fingerprint": PIXELS_FINGERPRINT,
        "image_size": PIXELS_SIZE,
        "resize_size": PIXELS_PREPROCESSING.resize_size,
        "interpolation": PIXELS_PREPROCESSING.interpolation,
        "embedding_dim": PIXELS_SIZE * PIXELS_SIZE * 3,
        "description": "raw-pixel baseline: 32x32 RGB center crop, flattened (HWC), scaled to [0, 1]",
    }
    specs.append(FeatureSpec(PIXELS, PIXELS_FINGERPRINT, pixel_attrs))
    return specs, preprocessings


def _digest(hashes: Sequence[str]) -> str:
    """One sha256 over a list of image hashes (the list itself is in the model's manifest)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest() if hashes else ""


def check_store(store: EmbeddingStore, dataset: Dataset, specs: Sequence[FeatureSpec], overwrite: bool) -> None:
    """Refuse to mix another dataset or other models' embeddings into the store, unless ``overwrite``."""
    root = store.root_attrs().get("dataset_root")
    if root and root != str(dataset.root):
        if not overwrite:
            raise UserError(
                f"{store.path} holds images of {root}, not {dataset.root}; use another --cache, "
                "or --overwrite to replace it."
            )
        store.path.unlink()
        store.clear_journal()
    others = store.journal_roots() - {str(dataset.root)}
    if others:
        if not overwrite:
            raise UserError(
                f"{store.journal} holds results of an interrupted run on {sorted(others)[0]}; run extract on that "
                "folder again to finish it, or pass --overwrite to discard them."
            )
        store.clear_journal()
    for spec in specs:
        if spec.name not in store.feature_sets():
            continue
        attrs = store.load_attrs(spec.name)
        if attrs.get("fingerprint") != spec.fingerprint and not overwrite:
            raise UserError(
                f"{store.path} holds {spec.name} features from another model file "
                f"({_describe(attrs)}; now {_describe(spec.attrs)}); pass --overwrite to replace them, "
                "or use another --cache."
            )


def _describe(attrs: dict) -> str:
    if attrs.get("kind") == "pixels":
        return f"pixels {attrs.get('image_size')} px"
    return (
        f"weights {attrs.get('weights_id')}, {attrs.get('image_size')} px, {attrs.get('precision')}, "
        f"ONNX sha256 {str(attrs.get('onnx_sha256'))[:12]}"
    )


def plan(dataset: Dataset, store: EmbeddingStore, specs: Sequence[FeatureSpec]) -> list[WorkItem]:
    """The images some feature set still lacks: new files, changed files (size or mtime) and unseen ones."""
    known = {spec.name: store.state(spec.name, spec.fingerprint) for spec in specs}
    work = []
    for record in dataset.records:
        try:
            stat = os.stat(dataset.absolute(record))
            state = FileState("", stat.st_size, stat.st_mtime_ns)
        except OSError:
            state = UNREADABLE
        item = WorkItem(record, state)
        for spec in specs:
            embedded, failed = known[spec.name]
            done = embedded.get(record.path) or failed.get(record.path)
            # A file that could not even be read (no hash) is tried again: permissions may have been fixed.
            if done is None or not done.sha256 or (done.size, done.mtime_ns) != (state.size, state.mtime_ns):
                item.needed.append(spec.name)
        if item.needed:
            work.append(item)
    return work


def decode_stream(
    items: Sequence[WorkItem], dataset: Dataset, preprocessings: Sequence[Preprocessing], workers: int, window: int
) -> Iterator[tuple[WorkItem, DecodedImage]]:
    """Decode ``items`` in ``workers`` threads, in order, at most ``window`` ahead: memory stays flat."""
    decode = lambda item: decode_file(dataset.absolute(item.record), preprocessings)  # noqa: E731
    return zip(items, map_ordered(decode, items, workers, window))


def process_batch(batch: Sequence[tuple[WorkItem, DecodedImage]], specs: Sequence[FeatureSpec], segments: dict[str, Segment]) -> None:
    """Compute every needed feature set for a batch of decoded images and add the rows to the segments."""
    for spec in specs:
        wanted = [(item, decoded) for item, decoded in batch if spec.name in item.needed]
        good = [(item, decoded) for item, decoded in wanted if not decoded.error]
        segment = segments[spec.name]
        for item, decoded in wanted:
            if decoded.error:
                segment.failures.append((item.record.path, _final_state(item, decoded), decoded.error))
                spec.skipped += 1
        if good:
            features = spec.features([decoded for _, decoded in good])
            for (item, decoded), row in zip(good, features):
                segment.records.append(item.record)
                segment.states.append(_final_state(item, decoded))
                segment.embeddings.append(np.asarray(row, dtype=np.float32))
            spec.embedded += len(good)


def _final_state(item: WorkItem, decoded: DecodedImage) -> FileState:
    return FileState(decoded.sha256, item.state.size, item.state.mtime_ns)


def run_extract(
    data: str | os.PathLike,
    models: Sequence[str] = tuple(BACKBONES),
    cache: str | os.PathLike = "features/embeddings.h5",
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    models_dir: str | os.PathLike = "models",
    weights: str = "imagenet",
    overwrite: bool = False,
    progress: bool | None = None,
    journal_rows: int = JOURNAL_ROWS,
    precision: str = "auto",
    calibration_images: int = CALIBRATION_IMAGES,
) -> list[FeatureSpec]:
    """Embed every image of ``data`` with each model (and the pixel baseline) into the store at ``cache``.

    Already stored images are not computed again; new and changed ones are; a killed run resumes.
    Results are journaled every ``journal_rows`` images or 30 seconds, whichever comes first.
    ``precision`` (auto, fp32, fp16, int8) picks the model variant; each precision is its own feature set
    (``resnet50``, ``resnet50-int8``) with its own fingerprint, so precisions never mix.

    Returns
    -------
    list of FeatureSpec
        Per feature set: images embedded and skipped in this run, and inference seconds.

    Raises
    ------
    UserError
        Bad arguments, no images, a store of another dataset or model, a model that cannot be exported.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    if device not in DEVICES:
        raise UserError(f"--device {device} is not one of {', '.join(DEVICES)}.")
    if precision not in ("auto", *PRECISIONS):
        raise UserError(f"--precision {precision} is not one of auto, {', '.join(PRECISIONS)}.")
    check_calibration_images(calibration_images)
    for model in models:
        if model not in BACKBONES:
            raise UserError(f"unknown model {model!r}; choose from: {', '.join(BACKBONES)}.")
    dataset = discover(data)
    models_dir = Path(models_dir)
    store = EmbeddingStore(cache)
    with store.lock():
        for model in models:
            model_manifest(models_dir, model, weights)  # exports the model first when it must
        sessions = open_sessions(models_dir, models, device, precision, dataset, calibration_images, store.feature_sets())
        specs, preprocessings = feature_specs(sessions)
        batch_size = batch_size or min((s.default_batch_size for s in sessions), default=16)
        check_store(store, dataset, specs, overwrite)
        work = plan(dataset, store, specs)
        if not work and store.matches(dataset.records, [spec.name for spec in specs]):
            return specs
        root = str(dataset.root)
        segments = {spec.name: Segment(spec.name, spec.fingerprint, spec.attrs, root) for spec in specs}
        workers = workers or available_cores()
        stream = decode_stream(work, dataset, preprocessings, workers, window=2 * batch_size)
        last_journal = time.monotonic()
        with tqdm(total=len(work), unit="img", desc="extract", disable=None if progress is None else not progress) as bar:
            try:
                for batch in batches(stream, batch_size):
                    process_batch(batch, specs, segments)
                    bar.update(len(batch))
                    if max(map(len, segments.values())) >= journal_rows or time.monotonic() - last_journal > JOURNAL_SECONDS:
                        for segment in segments.values():
                            store.append(segment)
                        last_journal = time.monotonic()
            finally:
                for segment in segments.values():  # on Ctrl-C or an error too: the next run merges it
                    store.append(segment)
        dropped = store.commit(dataset.root, dataset.records, {spec.name: spec.fingerprint for spec in specs})
        for name, count in dropped.items():
            if count:
                print(f"notice: {name}: dropped {_count(count, 'image')} no longer in {dataset.root}.", file=sys.stderr)
    return specs


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pipeline.extract``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.extract",
        description=(
            "Embed every image of a dataset with the exported backbones (and a 32x32 raw-pixel baseline) into an "
            "HDF5 store. Images already in the store are not computed again; an interrupted run resumes."
        ),
        epilog=(
            "Layouts: DATA/<class>/**/<image>; DATA/{train,validation|val,test}/<class>/**/<image>; a flat folder "
            "of unlabelled images; or a CSV file path,label[,split]. Exit status: 0 when the run finished (skipped "
            "files are listed in the store), 1 with --strict when the store lists files of DATA that could not be "
            "decoded, 2 for an error you can fix (a bad option or path, weights that cannot be had, a store of "
            "another dataset): one line, no traceback; 130 when interrupted (the work done so far is kept)."
        ),
    )
    parser.add_argument("data", help="image folder, or CSV manifest (path,label[,split])")
    parser.add_argument(
        "--models", nargs="+", default=list(BACKBONES), choices=sorted(BACKBONES), metavar="MODEL",
        help=f"backbones to embed with (default: {' '.join(BACKBONES)})",
    )
    parser.add_argument("--cache", type=Path, default=Path("features/embeddings.h5"), help="the HDF5 store (default: features/embeddings.h5)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default: 16 on the CPU, 128 on CUDA)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when usable, else CPU (default: auto)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: the number of available cores)")
    parser.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default="auto",
        help="model variant: fp32; int8 (static quantization calibrated on a sample of DATA, the fast choice on a "
        "CPU); fp16 (for GPUs); auto: fp16 on CUDA, fp32 on the CPU (default: auto). Each precision is its own "
        "feature set in the store (resnet50, resnet50-int8)",
    )
    parser.add_argument(
        "--calibration-images", type=int, default=CALIBRATION_IMAGES,
        help=f"images of DATA drawn to calibrate an int8 variant when it is first made (default: {CALIBRATION_IMAGES})",
    )
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="exported models (default: models/)")
    parser.add_argument(
        "--weights", default="imagenet",
        help="weights the models must have: a model missing from --models-dir, or exported with other weights, is "
        "exported first as by pipeline.export (default: imagenet)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace features of another model file or dataset in the store")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any image of DATA could not be decoded")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the extraction and print one summary line per feature set."""
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1.")
    started = time.perf_counter()
    specs = run_extract(
        args.data, args.models, args.cache, args.batch_size, args.device, args.workers, args.models_dir,
        args.weights, args.overwrite, precision=args.precision, calibration_images=args.calibration_images,
    )
    wall = time.perf_counter() - started
    store = EmbeddingStore(args.cache)
    if not any(spec.embedded or spec.skipped for spec in specs):
        print("nothing to do: every image is already in the store.")
    failed_sets = []
    for spec in specs:
        rows, failures = store.counts(spec.name)
        if failures:
            failed_sets.append((spec.name, failures))
        rate = spec.embedded / wall if spec.embedded else 0.0
        where = f" on {spec.attrs['provider']}, {spec.seconds:.1f} s of it inference" if spec.session else ""
        untrained = " [UNTRAINED random weights]" if spec.attrs.get("untrained") else ""
        print(
            f"{spec.name}{untrained}: embedded {spec.embedded}, skipped {spec.skipped} in {wall:.1f} s "
            f"({rate:.1f} images/s{where}); the store holds {_count(rows, 'embedding')}, {failures} failed"
        )
    print(f"store: {args.cache}")
    if failed_sets:
        name, failures = failed_sets[0]
        print(
            f"{_count(failures, 'image')} of the dataset could not be decoded; paths and reasons: "
            f"h5dump -d /{name}/failures/reason {args.cache} (or /{name}/failures/paths).",
            file=sys.stderr,
        )
    return EXIT_SKIPPED if args.strict and failed_sets else 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")

if __name__ == "__main__":
    run_cli(main)
