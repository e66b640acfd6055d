"""Planning an extract run: the models opened at the precision asked, the store checked against them, and the
images some feature set still lacks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError
from pipeline.extract.decode import EARLIER_PIXELS_FINGERPRINTS, calibration_crops
from pipeline.extract.discover import Dataset, ImageRecord
from pipeline.extract.features import FeatureSpec, describe_features, feature_specs
from pipeline.extract.options import ExtractOptions
from pipeline.models import PRECISIONS, BackboneSession, ExportedModel, ModelRepository, Preprocessing, parse_model_name
from pipeline.models.quantize import describe
from pipeline.models.session import CPU_BATCH, CUDA, CUDA_BATCH
from pipeline.models.weights import weights_per_model
from pipeline.store import PIXELS, EmbeddingStore, FileState, StoreWriter

logger = logging.getLogger(__name__)

UNREADABLE = FileState("", -1, -1)


@dataclass(frozen=True)
class Workers:
    """The actor pool: how many embedding actors, and what each one reserves of the cluster."""

    actors: int
    threads: int  # onnxruntime threads per actor on CPUs
    gpus: float  # GPUs per actor (a share when there are more actors than GPUs)

    @property
    def batch_size(self) -> int:
        """The default images per batch on these actors' device."""
        return CUDA_BATCH if self.gpus else CPU_BATCH

    @property
    def remote_args(self) -> dict[str, float]:
        """What each actor reserves. GPU actors reserve no CPU, so that every CPU is left to the decoding
        tasks; CPU actors reserve one, the same as a decoding task, so that Ray fuses decoding into them
        (no crops through the object store) and nothing waits for a CPU an actor holds."""
        return {"num_cpus": 0.0, "num_gpus": self.gpus} if self.gpus else {"num_cpus": 1.0}

    def describe(self) -> str:
        """The pool in words, e.g. ``2 embedding actors (1 thread each)``."""
        each = f"{self.gpus:g} GPU" if self.gpus else f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{self.actors} embedding actor{'s' if self.actors != 1 else ''} ({each} each)"


@dataclass
class WorkItem:
    """An image that at least one feature set still needs, with the file state it had when listed."""

    record: ImageRecord
    state: FileState  # UNREADABLE when the file vanished or cannot be stat'ed
    needed: list[str] = field(default_factory=list)


@dataclass
class ExtractRun:
    """One run's plan: the feature sets, the crops they need, the batch size, and the images still to embed."""

    specs: list[FeatureSpec]
    preprocessings: list[Preprocessing]
    batch_size: int
    work: list[WorkItem]


def plan_run(options: ExtractOptions, dataset: Dataset, store: EmbeddingStore, writer: StoreWriter,
             pool: Workers | None) -> ExtractRun:
    """Export and open the models (at the precision asked), check the store holds what they make, and list the
    images some feature set lacks."""
    started = time.perf_counter()
    models = list(dict.fromkeys(parse_model_name(model).name for model in options.models))
    chosen = weights_per_model(options.weights, models)
    repository = ModelRepository(options.models_dir)
    exports = [repository.get(model, chosen[model]) for model in models]  # exported first when they must be
    # With Ray the driver's sessions only describe the models (the actors run them): on the CPU here.
    sessions = open_sessions(
        repository, exports, "cpu" if pool else options.device, options.precision, dataset,
        options.calibration_images, store.feature_sets(), workers_on_cuda=bool(pool.gpus) if pool else None,
    )
    specs, preprocessings = feature_specs(sessions, options.storage)
    for spec in specs:
        spec.setup_seconds = time.perf_counter() - started
    batch_size = options.batch_size or (pool.batch_size if pool else min(s.default_batch_size for s in sessions))
    check_store(store, writer, dataset, specs, options.overwrite)
    return ExtractRun(specs, preprocessings, batch_size, plan(dataset, writer, specs))


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


def check_store(store: EmbeddingStore, writer: StoreWriter, dataset: Dataset, specs: Sequence[FeatureSpec],
                overwrite: bool) -> None:
    """Refuse to mix another dataset or other models' embeddings into the store, unless ``overwrite`` (then
    ``writer`` empties it, or discards another dataset's pending results)."""
    root = store.root_attrs().get("dataset_root")
    if root and root != str(dataset.root):
        if not overwrite:
            raise UserError(
                f"{store.path} holds images of {root}, not {dataset.root}; use another --cache, "
                "or --overwrite to replace it."
            )
        writer.remove()
    others = store.pending_roots() - {str(dataset.root)}
    if others:
        if not overwrite:
            raise UserError(
                f"{store.shards} holds results of an interrupted run on {sorted(others)[0]}; run extract on that "
                "folder again to finish it, or pass --overwrite to discard them."
            )
        writer.discard_pending()
    for spec in specs:
        if spec.name not in store.feature_sets():
            continue
        attrs = store.load_attrs(spec.name)
        held, wanted = attrs.get("storage", "float32"), spec.attrs.get("storage")
        if wanted is None and held != "float32":
            spec.attrs["storage"] = held  # not asked for: as the store holds it
        elif wanted is not None and held != wanted and attrs.get("fingerprint") == spec.fingerprint:
            if not overwrite:
                raise UserError(
                    f"{store.path} holds {spec.name} as {held}, and a set keeps one storage; extract with --storage "
                    f"{held} to add to it, or --overwrite to make it again as {wanted}."
                )
            writer.drop(spec.name)  # made again whole, in the new storage
            continue
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


def plan(dataset: Dataset, writer: StoreWriter, specs: Sequence[FeatureSpec]) -> list[WorkItem]:
    """The images some feature set still lacks: new files, changed files (size or mtime) and unseen ones."""
    sizes, mtimes = np.full(len(dataset.records), -1, np.int64), np.full(len(dataset.records), -1, np.int64)
    for number, record in enumerate(dataset.records):
        try:
            stat = os.stat(dataset.absolute(record))
        except OSError:
            continue  # unreadable: tried on every run, recorded as such
        sizes[number], mtimes[number] = stat.st_size, stat.st_mtime_ns
    return needed_work(dataset.records, sizes, mtimes, writer, specs)


def needed_work(records: Sequence[ImageRecord], sizes: np.ndarray, mtimes: np.ndarray, writer: StoreWriter,
                specs: Sequence[FeatureSpec]) -> list[WorkItem]:
    """The work items of ``records`` (with their files' ``sizes`` and ``mtimes``, -1 when unreadable).

    What the store holds is matched by path key in sorted arrays (:class:`pipeline.store.Known`), so the
    bookkeeping costs a few dozen bytes per image, whatever the store's size (``make bench-store``).
    """
    listing = writer.listing(records)  # sorted by path key; the commit reuses it
    sizes, mtimes = sizes[listing.order], mtimes[listing.order]
    needed = np.stack([writer.known(s.name, s.fingerprint).needed(listing.keys, sizes, mtimes) for s in specs])
    wanted = np.flatnonzero(needed.any(axis=0))
    work = []
    for position in wanted[np.argsort(listing.order[wanted])]:  # in the records' order
        size, mtime = int(sizes[position]), int(mtimes[position])
        state = FileState("", size, mtime) if size >= 0 else UNREADABLE
        names = [s.name for s, n in zip(specs, needed[:, position]) if n]
        work.append(WorkItem(records[int(listing.order[position])], state, names))
    return work
