"""``python -m pipeline.extract DATA``: discover, decode in threads, embed on onnxruntime, store."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import Interrupted, UserError, command, counted
from pipeline.extract import cluster
from pipeline.extract.decode import (
    EARLIER_PIXELS_FINGERPRINTS,
    MAX_PIXELS,
    batches,
    calibration_crops,
    decode_file,
    map_ordered,
)
from pipeline.extract.discover import Dataset, ImageRecord, discover
from pipeline.extract.features import (
    BatchOutcome,
    FeatureSpec,
    count_outcomes,
    describe_features,
    embed_batch,
    feature_specs,
    record_outcomes,
)
from pipeline.files import available_cores
from pipeline.models import (
    DEFAULT_BACKBONES,
    PRECISIONS,
    BackboneSession,
    ExportedModel,
    ModelRepository,
    Preprocessing,
    parse_model_name,
)
from pipeline.models.quantize import CALIBRATION_IMAGES, check_calibration_images, describe
from pipeline.models.session import CUDA, DEVICES
from pipeline.models.weights import weights_per_model
from pipeline.store import PIXELS, EmbeddingStore, FileState, Segment

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
EXIT_SKIPPED = 1  # with --strict: the run finished but some files could not be decoded
UNREADABLE = FileState("", -1, -1)
JOURNAL_ROWS = 512  # results are written as pending shards at least every this many images...
JOURNAL_SECONDS = 30.0  # ...or this many seconds, so a kill loses at most that much work


@dataclass
class WorkItem:
    """An image that at least one feature set still needs, with the file state it had when listed."""

    record: ImageRecord
    state: FileState  # UNREADABLE when the file vanished or cannot be stat'ed
    needed: list[str] = field(default_factory=list)


def open_sessions(
    repository: ModelRepository, exports: Sequence[ExportedModel], device: str, precision: str, dataset: Dataset,
    calibration_images: int, stored: Collection[str] = (), workers_on_cuda: bool | None = None,
) -> list[BackboneSession]:
    """Open a session per model at ``precision``, making fp16 / int8 variants first where missing or stale.

    Parameters
    ----------
    repository : ModelRepository
        The models folder; variants are written there.
    exports : sequence of ExportedModel
        The models' fp32 exports.
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
    workers_on_cuda : bool, optional
        Whether the models will run on CUDA elsewhere (Ray actors); ``auto`` then follows it instead of
        probing this machine.

    Returns
    -------
    list of BackboneSession
    """
    sessions = []
    for export in exports:
        wanted = precision
        if precision == "auto":
            held = [p for p in PRECISIONS if export.feature_set(p) in stored]
            if len(held) == 1:
                wanted = held[0]
                if wanted != "fp32":
                    logger.info(f"notice: {export.manifest.model}: the store holds its {wanted} embeddings, so "
                                f"--precision auto embeds at {wanted} (--precision fp32 makes the fp32 set beside it).")
            elif workers_on_cuda is not None:
                wanted = "fp16" if workers_on_cuda else "fp32"
            else:
                session = export.open(device)
                if session.provider != CUDA:
                    sessions.append(session)
                    continue
                wanted = "fp16"
        model = repository.current_variant(export, wanted) if wanted != "fp32" else export
        if model is None:
            logger.info(f"{export.manifest.model}: making its {wanted} variant first.")
            crops = calibration_crops(dataset, export.preprocessing)
            model = repository.variant(export, wanted, crops, calibration_images)
            logger.info(describe(model.manifest))
        sessions.append(model.open(device))
    return sessions


def check_store(store: EmbeddingStore, dataset: Dataset, specs: Sequence[FeatureSpec], overwrite: bool) -> None:
    """Refuse to mix another dataset or other models' embeddings into the store, unless ``overwrite``."""
    root = store.root_attrs().get("dataset_root")
    if root and root != str(dataset.root):
        if not overwrite:
            raise UserError(
                f"{store.path} holds images of {root}, not {dataset.root}; use another --cache, "
                "or --overwrite to replace it."
            )
        store.remove()
    others = store.pending_roots() - {str(dataset.root)}
    if others:
        if not overwrite:
            raise UserError(
                f"{store.shards} holds results of an interrupted run on {sorted(others)[0]}; run extract on that "
                "folder again to finish it, or pass --overwrite to discard them."
            )
        store.discard_pending()
    for spec in specs:
        if spec.name not in store.feature_sets():
            continue
        attrs = store.load_attrs(spec.name)
        if spec.name == PIXELS and attrs.get("fingerprint") in EARLIER_PIXELS_FINGERPRINTS:
            # The baseline is ours, not the user's model: a new recipe replaces an earlier one without asking.
            logger.info(f"notice: {store.path} holds pixel-baseline features of an earlier recipe "
                        f"({attrs.get('fingerprint')}); this run makes them again ({spec.fingerprint}), "
                        "once for the store.")
        elif attrs.get("fingerprint") != spec.fingerprint and not overwrite:
            raise UserError(
                f"{store.path} holds {spec.name} features from another "
                f"{'recipe' if spec.name == PIXELS else 'model file'} "
                f"({describe_features(attrs)}; now {describe_features(spec.attrs)}); pass --overwrite to replace them, "
                "or use another --cache."
            )


def plan(dataset: Dataset, store: EmbeddingStore, specs: Sequence[FeatureSpec]) -> list[WorkItem]:
    """The images some feature set still lacks: new files, changed files (size or mtime) and unseen ones."""
    sizes, mtimes = np.full(len(dataset.records), -1, np.int64), np.full(len(dataset.records), -1, np.int64)
    for number, record in enumerate(dataset.records):
        try:
            stat = os.stat(dataset.absolute(record))
        except OSError:
            continue  # unreadable: tried on every run, recorded as such
        sizes[number], mtimes[number] = stat.st_size, stat.st_mtime_ns
    return needed_work(dataset.records, sizes, mtimes, store, specs)


def needed_work(records: Sequence[ImageRecord], sizes: np.ndarray, mtimes: np.ndarray, store: EmbeddingStore,
                specs: Sequence[FeatureSpec]) -> list[WorkItem]:
    """The work items of ``records`` (with their files' ``sizes`` and ``mtimes``, -1 when unreadable).

    What the store holds is matched by path key in sorted arrays (:class:`pipeline.store.Known`), so the
    bookkeeping costs a few dozen bytes per image, whatever the store's size (``make bench-store``).
    """
    listing = store.listing(records)  # sorted by path key; the commit reuses it
    sizes, mtimes = sizes[listing.order], mtimes[listing.order]
    needed = np.stack([store.known(s.name, s.fingerprint).needed(listing.keys, sizes, mtimes) for s in specs])
    wanted = np.flatnonzero(needed.any(axis=0))
    work = []
    for position in wanted[np.argsort(listing.order[wanted])]:  # in the records' order
        size, mtime = int(sizes[position]), int(mtimes[position])
        state = FileState("", size, mtime) if size >= 0 else UNREADABLE
        names = [s.name for s, n in zip(specs, needed[:, position]) if n]
        work.append(WorkItem(records[int(listing.order[position])], state, names))
    return work


def embed_locally(
    items: Sequence[WorkItem], dataset: Dataset, specs: Sequence[FeatureSpec], preprocessings: Sequence[Preprocessing],
    workers: int, batch_size: int, max_pixels: int = MAX_PIXELS,
) -> Iterator[BatchOutcome]:
    """Decode ``items`` in ``workers`` threads (in order, at most two batches ahead, so memory stays flat) and
    embed them batch by batch; yield each batch's outcome as :func:`record_batch` takes it."""
    decode = lambda item: decode_file(dataset.absolute(item.record), preprocessings, max_pixels=max_pixels)  # noqa: E731
    stream = zip(items, map_ordered(decode, items, workers, window=2 * batch_size))
    for batch in batches(stream, batch_size):
        batch_items = [item for item, _ in batch]
        decoded = [decoded for _, decoded in batch]
        features = embed_batch(decoded, [item.needed for item in batch_items], specs)
        yield batch_items, [d.sha256 for d in decoded], [d.error for d in decoded], features


def record_batch(
    items: Sequence[WorkItem], hashes: Sequence[str], errors: Sequence[str], features: dict[str, np.ndarray] | None,
    specs: Sequence[FeatureSpec], segments: dict[str, Segment],
) -> None:
    """Add a batch's outcomes to the segments (see :func:`pipeline.features.record_outcomes`); with ``features``
    None, the batch's shards were written where it was embedded (on Ray), and its outcomes are only counted."""
    needed = [item.needed for item in items]
    if features is None:
        count_outcomes(needed, errors, specs)
        return
    record_outcomes([i.record for i in items], [i.state for i in items], needed, hashes, errors, features, specs,
                    segments)


def run_extract(
    data: str | os.PathLike,
    models: Sequence[str] = tuple(DEFAULT_BACKBONES),
    cache: str | os.PathLike = "features/embeddings.h5",
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    models_dir: str | os.PathLike = "models",
    weights: str | Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    journal_rows: int = JOURNAL_ROWS,
    precision: str = "auto",
    calibration_images: int = CALIBRATION_IMAGES,
    backend: str = "local",
    max_pixels: int = MAX_PIXELS,
    root: str | os.PathLike | None = None,
) -> list[FeatureSpec]:
    """Embed every image of ``data`` with each model (and the pixel baseline) into the store at ``cache``.

    Already stored images are not computed again; new and changed ones are; a killed run resumes.
    ``models`` are named as :func:`pipeline.models.parse_model_name` reads them (``timm/<name>[.<tag>]``...).
    ``weights`` (see :func:`pipeline.models.weights.weights_per_model`): None uses each model as it is exported.
    Results are written as pending shards every ``journal_rows`` images or 30 seconds, whichever comes first
    (on Ray, by the workers, every ``journal_rows`` images each).
    ``precision`` (auto, fp32, fp16, int8) picks the model variant; each precision is its own feature set
    (``resnet50``, ``resnet50-int8``) with its own fingerprint, so precisions never mix.
    ``backend`` ``ray`` decodes and embeds on a Ray cluster (``RAY_ADDRESS``, or a local Ray instance) with
    ``workers`` actors, which write their rows' shards themselves (this process commits the index); ``local``
    uses ``workers`` decoding threads here. Images above ``max_pixels`` are recorded as too large, and tried
    again next run. ``root`` is a CSV manifest's dataset root (see :func:`pipeline.discover.discover`).

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
    if max_pixels < 1:
        raise UserError(f"--max-pixels {max_pixels} must be at least 1.")
    if device not in DEVICES:
        raise UserError(f"--device {device} is not one of {', '.join(DEVICES)}.")
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend} is not one of {', '.join(BACKENDS)}.")
    if precision not in ("auto", *PRECISIONS):
        raise UserError(f"--precision {precision} is not one of auto, {', '.join(PRECISIONS)}.")
    check_calibration_images(calibration_images)
    models = list(dict.fromkeys(parse_model_name(model).name for model in models))
    chosen = weights_per_model(weights, models)
    dataset = discover(data, root)
    repository = ModelRepository(models_dir)
    store = EmbeddingStore(cache)
    ray_pool = contextlib.nullcontext() if backend == "local" else cluster.actor_pool(device, workers)
    with store.lock(), ray_pool as pool:
        setup_started = time.perf_counter()
        exports = [repository.get(model, chosen[model]) for model in models]  # exported first when they must be
        # With Ray the driver's sessions only describe the models (the actors run them): on the CPU here.
        sessions = open_sessions(
            repository, exports, "cpu" if pool else device, precision, dataset, calibration_images,
            store.feature_sets(), workers_on_cuda=bool(pool.gpus) if pool else None,
        )
        specs, preprocessings = feature_specs(sessions)
        for spec in specs:
            spec.setup_seconds = time.perf_counter() - setup_started
        batch_size = batch_size or (pool.batch_size if pool else min(s.default_batch_size for s in sessions))
        check_store(store, dataset, specs, overwrite)
        fingerprints = {spec.name: spec.fingerprint for spec in specs}
        work = plan(dataset, store, specs)
        root = str(dataset.root)
        segments = {spec.name: Segment(spec.name, spec.fingerprint, spec.attrs, root) for spec in specs}
        if pool and work:
            logger.info(f"ray: {pool.describe()} for {counted(len(work), 'image')}.")
            paths = [str(dataset.absolute(item.record)) for item in work]
            outcomes = cluster.embed_on_ray(
                work, paths, specs, preprocessings, device, batch_size, pool, max_pixels,
                cluster.ShardOutput(store, root, journal_rows),
            )
        else:
            outcomes = embed_locally(
                work, dataset, specs, preprocessings, workers or available_cores(), batch_size, max_pixels
            )
        last_journal = time.monotonic()
        bar = tqdm(total=len(work), unit="img", desc="extract", disable=None if progress is None else not progress)
        with bar, contextlib.closing(outcomes):  # closed before Ray stops, whatever ends the loop
            try:
                for items, hashes, errors, features in outcomes:
                    record_batch(items, hashes, errors, features, specs, segments)
                    bar.update(len(items))
                    if (max(map(len, segments.values())) >= journal_rows
                            or time.monotonic() - last_journal > JOURNAL_SECONDS):
                        for segment in segments.values():
                            store.append(segment)
                        last_journal = time.monotonic()
            except KeyboardInterrupt:
                done = max(spec.embedded + spec.skipped for spec in specs)
                if not done:
                    raise
                raise Interrupted(f"the {counted(done, 'image')} done so far are kept in {store.shards}") from None
            finally:
                for segment in segments.values():  # on Ctrl-C or an error too: the next run commits it
                    store.append(segment)
        dropped = store.commit(dataset.root, dataset.records, fingerprints, cluster.map_on_ray if pool else map)
        for name, count in dropped.items():
            if count:
                logger.info(f"notice: {name}: dropped {counted(count, 'image')} no longer in {dataset.root}.")
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
        "--root", type=Path, default=None,
        help="for a CSV: the folder its relative paths are relative to, and the store's paths too (default: relative "
        "paths are relative to the CSV's folder, and the root is the deepest folder holding every listed file)",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_BACKBONES), metavar="MODEL",
        help=f"backbones to embed with: {', '.join(DEFAULT_BACKBONES)}, timm/NAME[.TAG] or torchvision/NAME, each its "
        f"own feature set (default: {' '.join(DEFAULT_BACKBONES)}; transfer models lists the curated ones)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("features/embeddings.h5"),
        help="the HDF5 store (default: features/embeddings.h5)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="images per inference batch (default: 16 on the CPU, 128 on CUDA)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto: CUDA when usable, else CPU (default: auto)",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="local",
        help="local: decode in threads and embed in this process; ray: Ray Data decodes and an actor pool embeds on "
        "the Ray cluster at RAY_ADDRESS (a local Ray instance when unset); needs pip install -e '.[ray]' "
        "(default: local)",
    )
    parser.add_argument(
        "--workers", type=int, default=None,
        help="local: decoding threads (default: the available cores); ray: embedding actors (default: one per GPU "
        "of the cluster, else one per CPU)",
    )
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
        "--weights", nargs="+", default=None, metavar="[MODEL=]WEIGHTS",
        help="weights the models must have: pretrained (imagenet for vgg16 and resnet50), random or PATH for every "
        "model, or MODEL=... for one (--weights resnet50=PATH vgg16=imagenet). Default: each model as it is exported "
        "in --models-dir (pretrained weights for a model not exported yet). A model exported with other weights than "
        "asked is exported again, the replaced export kept as STEM.previous.onnx/.json",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS,
        help=f"skip (and record as too large) images that would decode to more pixels, e.g. decompression bombs; "
        f"they are tried again on the next run (default: {MAX_PIXELS:,}, Pillow's warning threshold)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace features of another model file or dataset in the store",
    )
    parser.add_argument(
        "--strict", action="store_true",
        help="exit with status 1 when any image of DATA could not be decoded",
    )
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
        backend=args.backend, max_pixels=args.max_pixels, root=args.root,
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
        how = f" (weights {spec.attrs['weights_id']}, {spec.attrs['precision']})" if spec.session else ""
        how += " [UNTRAINED random weights]" if spec.attrs.get("untrained") else ""
        where = f"; inference {spec.seconds:.1f} s on {spec.attrs['provider']}" if spec.seconds else ""  # not on Ray
        print(f"{spec.name}{how}: embedded {spec.embedded}, failed {spec.skipped}{where}; the store holds "
              f"{counted(rows, 'embedding')}, {failures} failed")
    images = max(spec.embedded + spec.skipped for spec in specs)
    setup = max(spec.setup_seconds for spec in specs)
    once = f", after {setup:.1f} s of one-time work (exports, precision variants)" if setup >= 1.0 else ""
    embedding = max(wall - setup, 1e-9)
    print(f"extract: {counted(images, 'image')} in {embedding:.1f} s ({images / embedding:.1f} images/s){once}; "
          f"store: {args.cache}")
    if failed_sets:
        name, failures = failed_sets[0]
        missing = sum(reason.startswith("missing") for reason in store.failures(name).reasons)
        listed = f"paths and reasons: {command('store')} failures {name} --cache {args.cache}"
        if missing:
            print(f"{counted(missing, 'image')} of the dataset {'is' if missing == 1 else 'are'} missing "
                  f"(listed, but no such file); {listed}", file=sys.stderr)
        if failures > missing:
            bad = failures - missing
            print(f"{counted(bad, 'image')} of the dataset could not be decoded or {'was' if bad == 1 else 'were'} too "
                  f"large; {listed}", file=sys.stderr)
    return EXIT_SKIPPED if args.strict and failed_sets else 0

