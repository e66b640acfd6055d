"""``python -m pipeline.extract DATA``: discover, decode in threads, embed on onnxruntime, store."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import Interrupted, command, counted
from pipeline.extract import cluster
from pipeline.extract.decode import MAX_PIXELS, batches, decode_file, map_ordered
from pipeline.extract.discover import Dataset, discover
from pipeline.extract.features import BatchOutcome, FeatureSpec, count_outcomes, embed_batch, record_outcomes
from pipeline.extract.options import BACKENDS, ExtractOptions
from pipeline.extract.plan import ExtractRun, Workers, WorkItem, plan_run
from pipeline.files import available_cores
from pipeline.models import DEFAULT_BACKBONES, PRECISIONS, Preprocessing
from pipeline.models.quantize import CALIBRATION_IMAGES
from pipeline.models.session import DEVICES
from pipeline.store import EmbeddingStore, Segment, StoreWriter
from pipeline.store.spec import STORAGES

logger = logging.getLogger(__name__)

EXIT_SKIPPED = 1  # with --strict: the run finished but some files could not be decoded
JOURNAL_SECONDS = 30.0  # results are written as pending shards at least this often (or every journal_rows images)


def run_extract(data: str | os.PathLike, options: ExtractOptions | None = None, **settings: Any) -> list[FeatureSpec]:
    """Embed every image of ``data`` with each model (and the pixel baseline) into the store.

    Already stored images are not computed again; new and changed ones are; a killed run resumes.

    Parameters
    ----------
    data : path-like
        An image folder or a CSV manifest (see :func:`pipeline.extract.discover.discover`).
    options : ExtractOptions, optional
        What to embed, where and how.
    **settings
        Or some of :class:`ExtractOptions`' fields by name (``models=["resnet50"], cache=...``).

    Returns
    -------
    list of FeatureSpec
        Per feature set: images embedded and skipped in this run, and inference seconds.

    Raises
    ------
    UserError
        Bad options, no images, a store of another dataset or model, a model that cannot be exported.
    """
    options = ExtractOptions.of(options, settings)
    dataset = discover(data, options.root)
    store = EmbeddingStore(options.cache)
    ray = contextlib.nullcontext() if options.backend == "local" else cluster.actor_pool(options.device,
                                                                                       options.workers)
    with store.writer() as writer, ray as pool:
        run = plan_run(options, dataset, store, writer, pool)
        root = str(dataset.root)
        journal(embed(run, dataset, options, pool, cluster.ShardOutput(writer, root, options.journal_rows)), run,
                writer, root, options)
        fingerprints = {spec.name: spec.fingerprint for spec in run.specs}
        dropped = writer.commit(dataset.root, dataset.records, fingerprints, cluster.map_on_ray if pool else map)
    for name, count in dropped.items():
        if count:
            logger.info(f"notice: {name}: dropped {counted(count, 'image')} no longer in {dataset.root}.")
    return run.specs


def embed(run: ExtractRun, dataset: Dataset, options: ExtractOptions, pool: Workers | None,
          output: cluster.ShardOutput) -> Iterator[BatchOutcome]:
    """The run's batches embedded here in threads, or on the Ray ``pool`` (whose actors write to ``output``)."""
    if not pool or not run.work:
        return embed_locally(run.work, dataset, run.specs, run.preprocessings, options.workers or available_cores(),
                             run.batch_size, options.max_pixels)
    logger.info(f"ray: {pool.describe()} for {counted(len(run.work), 'image')}.")
    paths = [str(dataset.absolute(item.record)) for item in run.work]
    return cluster.embed_on_ray(run, paths, pool, output, options.device, options.max_pixels)


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


def journal(outcomes: Iterator[BatchOutcome], run: ExtractRun, writer: StoreWriter, dataset_root: str,
            options: ExtractOptions) -> None:
    """Record the batches' outcomes, writing them as pending shards every ``journal_rows`` images or
    ``JOURNAL_SECONDS``, and at the end whatever ends it (so a kill loses at most that much work)."""
    specs = run.specs
    segments = {spec.name: Segment(spec.name, spec.fingerprint, spec.attrs, dataset_root) for spec in specs}
    last_journal = time.monotonic()
    shown = None if options.progress is None else not options.progress
    bar = tqdm(total=len(run.work), unit="img", desc="extract", disable=shown)
    with bar, contextlib.closing(outcomes):  # closed before Ray stops, whatever ends the loop
        try:
            for items, hashes, errors, features in outcomes:
                record_batch(items, hashes, errors, features, specs, segments)
                bar.update(len(items))
                if (max(map(len, segments.values())) >= options.journal_rows
                        or time.monotonic() - last_journal > JOURNAL_SECONDS):
                    for segment in segments.values():
                        writer.append(segment)
                    last_journal = time.monotonic()
        except KeyboardInterrupt:
            done = max(spec.embedded + spec.skipped for spec in specs)
            if not done:
                raise
            kept = f"the {counted(done, 'image')} done so far are kept in {writer.location.shards}"
            raise Interrupted(kept) from None
        finally:
            for segment in segments.values():  # on Ctrl-C or an error too: the next run commits it
                writer.append(segment)


def record_batch(
    items: Sequence[WorkItem], hashes: Sequence[str], errors: Sequence[str], features: dict[str, np.ndarray] | None,
    specs: Sequence[FeatureSpec], segments: dict[str, Segment],
) -> None:
    """Add a batch's outcomes to the segments (see :func:`pipeline.extract.features.record_outcomes`); with ``features``
    None, the batch's shards were written where it was embedded (on Ray), and its outcomes are only counted."""
    needed = [item.needed for item in items]
    if features is None:
        count_outcomes(needed, errors, specs)
        return
    record_outcomes([i.record for i in items], [i.state for i in items], needed, hashes, errors, features, specs,
                    segments)


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
        "--storage", choices=STORAGES, default=None,
        help="how the store keeps the embeddings: float16 takes half the bytes (docs/store.md measures what it "
        "changes); readers return float32 either way. A feature set keeps one storage: --overwrite makes it again "
        "in another (default: as the store holds each set, float32 for a new one)",
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
    options = ExtractOptions(
        models=args.models, cache=args.cache, batch_size=args.batch_size, device=args.device, workers=args.workers,
        models_dir=args.models_dir, weights=args.weights, overwrite=args.overwrite, precision=args.precision,
        calibration_images=args.calibration_images, backend=args.backend, max_pixels=args.max_pixels, root=args.root,
        storage=args.storage,
    )
    started = time.perf_counter()
    specs = run_extract(args.data, options=options)
    store = EmbeddingStore(args.cache)
    failed_sets = print_summary(specs, store, time.perf_counter() - started)
    if failed_sets:
        print_failures(store, *failed_sets[0])
    return EXIT_SKIPPED if args.strict and failed_sets else 0


def print_summary(specs: Sequence[FeatureSpec], store: EmbeddingStore, wall: float) -> list[tuple[str, int]]:
    """Print a line per feature set and the run's closing line; return the sets with failures, and how many."""
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
          f"store: {store.path}")
    return failed_sets


def print_failures(store: EmbeddingStore, name: str, failures: int) -> None:
    """Say on stderr how many files of the dataset are missing or could not be decoded, and where they are listed."""
    missing = sum(reason.startswith("missing") for reason in store.failures(name).reasons)
    listed = f"paths and reasons: {command('store')} failures {name} --cache {store.path}"
    if missing:
        print(f"{counted(missing, 'image')} of the dataset {'is' if missing == 1 else 'are'} missing "
              f"(listed, but no such file); {listed}", file=sys.stderr)
    if failures > missing:
        bad = failures - missing
        print(f"{counted(bad, 'image')} of the dataset could not be decoded or {'was' if bad == 1 else 'were'} too "
              f"large; {listed}", file=sys.stderr)
