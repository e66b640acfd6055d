"""Extract on Ray: Ray Data reads and decodes in CPU tasks, an actor pool embeds and writes the shards.

Also joining a Ray cluster (or starting a local instance), which fit's joblib backend uses too. The driver
lists the images and plans the work exactly as with the local backend; each actor writes the rows it embeds
as pending shards of the store and sends the driver only their metadata, and the driver commits the index,
so embeddings never pass through it and a killed driver resumes the same way. Ray retries a batch whose
worker died (decoding and inference are deterministic, so a retried batch gives the same rows; a shard it
wrote twice is listed once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import UserError
from pipeline.extract.decode import MAX_PIXELS, PIXELS_SIZE, DecodedImage, decode_file
from pipeline.extract.discover import ImageRecord
from pipeline.extract.features import BatchOutcome, embed_batch, feature_specs, record_outcomes
from pipeline.extract.plan import ExtractRun, Workers
from pipeline.models import ExportedModel, Preprocessing
from pipeline.store import FileState, Segment, ShardEntry, ShardTarget, StoreWriter

RAY_MISSING = "the ray backend needs Ray: pip install -e '.[ray]' (Ray Data and its dependencies)."
CONNECT_SECONDS = 5.0


@dataclass(frozen=True)
class ShardOutput:
    """Where the actors write their rows: pending shards of the writer's run, which it registers and commits."""

    writer: StoreWriter
    dataset_root: str
    rows: int  # rows per actor call, so per shard at most


def connect() -> bool:
    """Join the Ray cluster at ``RAY_ADDRESS``, or start a local Ray instance when it is unset.

    Returns
    -------
    bool
        True when this call started Ray (the caller then shuts it down), False when it was running.

    Raises
    ------
    UserError
        Ray is not installed, or the cluster at ``RAY_ADDRESS`` cannot be reached.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its data extra cannot run extract)
    except ImportError:
        raise UserError(RAY_MISSING) from None
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    _quiet_ray()
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a new instance on this machine, never one a stale `ray start` left behind
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as error:
        if address:
            raise UserError(
                f"cannot join the Ray cluster at RAY_ADDRESS={address} ({error}); start it (ray start --head), "
                "fix the address (host:port), or unset RAY_ADDRESS to run on a local Ray instance."
            ) from None
        raise UserError(
            f"cannot start a local Ray instance ({error}); see `ray status`, or use --backend local."
        ) from None
    return True


def _quiet_ray() -> None:
    """Ray's own messages down to what a user of the run needs; each is the user's to turn back on.

    Ray's notice that a local instance enables token authentication is dropped (its warning that one runs
    without it is kept), and the workers' lines are not wrapped in colour codes where stderr is not a terminal
    (``RAY_COLOR_PREFIX``). One line stays: Ray's native code writes ``core_worker.cc ... E ... has
    constructor arguments in the object store`` for every Ray Data actor pool (ray-project/ray#57733); the
    run does not suffer it, and only a log level that also hides Ray's real errors would remove it.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _token_notice not in token_setup.filters:
        token_setup.addFilter(_token_notice)


def _token_notice(record: logging.LogRecord) -> bool:
    """False for Ray's notice that token authentication is enabled (a filter of its logger)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at a ``host:port`` address (Ray itself retries for minutes)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray's own parser will judge
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise UserError(
            f"nothing answers at RAY_ADDRESS={address} ({error.strerror or error}); start the cluster there "
            "(ray start --head), fix the address, or unset RAY_ADDRESS to run on a local Ray instance."
        ) from None


def shutdown() -> None:
    """Stop the Ray instance :func:`connect` started (or leave the cluster it joined)."""
    import ray

    ray.shutdown()


@contextlib.contextmanager
def actor_pool(device: str, requested: int | None) -> Iterator[Workers]:
    """Join (or start) Ray for a run and plan its actor pool; a Ray instance started here stops at the end.

    Yields
    ------
    Workers
        The pool :func:`plan_workers` plans for ``device`` and ``requested`` actors.
    """
    started = connect()
    try:
        yield plan_workers(device, requested)
    finally:
        if started:
            shutdown()


def plan_workers(device: str, requested: int | None) -> Workers:
    """One actor per GPU of the cluster (or ``requested``, sharing the GPUs), or on CPUs one per CPU
    (or ``requested``, with the CPUs shared out as onnxruntime threads).

    Raises
    ------
    UserError
        ``--device cuda`` on a cluster without GPUs.
    """
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device != "cpu" and gpus:
        actors = requested or gpus
        return Workers(actors, 1, min(1.0, gpus / actors))
    if device == "cuda":
        raise UserError("--device cuda was asked for but the Ray cluster has no GPUs; use --device cpu or auto.")
    actors = requested or cpus
    return Workers(actors, max(1, cpus // actors), 0.0)


def embed_on_ray(run: ExtractRun, paths: Sequence[str], workers: Workers, output: ShardOutput, device: str,
                 max_pixels: int) -> Iterator[BatchOutcome]:
    """Decode, embed and store the run's work items on the cluster; yield each batch's outcome, in work order.

    Parameters
    ----------
    run : ExtractRun
        The work items (their records, listed file states and needed feature sets go to the workers), the
        feature sets (from sessions the driver opened: actors open the same exported models, at the same path
        on every node, and refuse to run when a node's file is not the driver's), their crops and the batch size.
    paths : sequence of str
        Each item's absolute file path, as every worker sees it (a shared filesystem on a multi-node cluster).
    workers : Workers
        The actor pool (see :func:`plan_workers`).
    output : ShardOutput
        Where the actors write pending shards (``output.rows`` images per actor call), on a filesystem the driver
        sees too; each shard they report is registered with the writer for the commit.
    device : {"auto", "cuda", "cpu"}
    max_pixels : int
        Images above it are failures (see :func:`pipeline.extract.decode.decode_file`).

    Yields
    ------
    tuple
        ``(items, sha256s, errors, None)`` as :func:`pipeline.extract.run.record_batch` takes them: the rows are
        in shards already.
    """
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards are named in work order, so rows keep it
    context.enable_progress_bars = False  # extract draws its own bar...
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ...so Ray's notice that its are off is noise
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # A shard's rows per block (few blocks: less scheduling on the driver), but two blocks per actor at least.
    block = max(run.batch_size, min(output.rows, len(run.work) // (2 * workers.actors)))
    backbones = [spec for spec in run.specs if spec.session is not None]
    dataset = ray.data.from_arrow(_work_blocks(run, paths, block)).map_batches(
        decode_batch, batch_size=run.batch_size,
        fn_kwargs={"preprocessings": list(run.preprocessings), "max_pixels": max_pixels},
        num_cpus=1,
    ).map_batches(
        EmbedActor, batch_size=max(output.rows, 1), compute=ray.data.ActorPoolStrategy(size=workers.actors),
        fn_constructor_kwargs={
            "models": [spec.session.model for spec in backbones], "device": device, "threads": workers.threads,
            "batch_size": run.batch_size, "target": output.writer.target(output.dataset_root),
            "storages": {spec.name: spec.attrs["storage"] for spec in run.specs if "storage" in spec.attrs},
        },
        **workers.remote_args,
    )
    providers: set[str] = set()
    first = True
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        if batch["fatal"][0]:
            raise UserError(f"on a Ray worker: {batch['fatal'][0]}")
        rows = [run.work[i] for i in batch["index"]]
        hashes, errors = [str(s) for s in batch["sha256"]], [str(e) for e in batch["error"]]
        if first:
            _check_workers_see_the_files([paths[i] for i in batch["index"]], errors)
            first = False
        for reported in batch["shards"]:
            for entry in json.loads(str(reported) or "[]"):
                shard = ShardEntry(**entry)
                _check_driver_sees_the_shard(output.writer, shard)
                output.writer.register(shard)
        providers.add(str(batch["providers"][0]))
        for number, spec in enumerate(backbones):
            spec.attrs["provider"] = ",".join(sorted({p.split(",")[number] for p in providers}))
        yield rows, hashes, errors, None


def _work_blocks(run: ExtractRun, paths: Sequence[str], block: int) -> list:
    """The work items as Arrow tables of ``block`` rows: index, path, record, listed size and mtime, and a bit mask
    of the feature sets each needs."""
    import pyarrow

    items = run.work
    needed = [sum(1 << bit for bit, spec in enumerate(run.specs) if spec.name in item.needed) for item in items]
    return [
        pyarrow.table({
            "index": np.arange(start, min(start + block, len(items)), dtype=np.int64),
            "path": list(paths[start : start + block]),
            "record": [item.record.path for item in items[start : start + block]],
            "size": np.array([item.state.size for item in items[start : start + block]], np.int64),
            "mtime": np.array([item.state.mtime_ns for item in items[start : start + block]], np.int64),
            "needed": np.array(needed[start : start + block], dtype=np.int64),
        })
        for start in range(0, len(items), block)
    ]


def map_on_ray(function: Callable, jobs: Iterable) -> list:
    """``function`` over ``jobs`` as Ray tasks of one CPU each, results in order: the store's compaction jobs
    run where the shards were written, so their embeddings never pass through the driver."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(function)
    return ray.get([task.remote(job) for job in jobs])


def _check_workers_see_the_files(paths: Sequence[str], errors: Sequence[str]) -> None:
    """Stop when the workers could read none of a batch's files that this machine can read."""
    if errors and all(e.startswith(("unreadable", "missing")) for e in errors) and os.access(paths[0], os.R_OK):
        raise UserError(
            f"the Ray workers cannot read {paths[0]}, which this machine can: put the images on a filesystem "
            "every node mounts at the same path."
        )


def _check_driver_sees_the_shard(writer: StoreWriter, entry: ShardEntry) -> None:
    """Stop when a shard a worker wrote is not where this machine looks for it (no shared filesystem)."""
    path = writer.location.shards / entry.file
    if not path.exists() or path.stat().st_size != entry.bytes:
        raise UserError(
            f"a Ray worker wrote {path}, which this machine cannot see: put --cache on a filesystem every node "
            "mounts at the same path."
        )


def decode_batch(
    batch: dict[str, np.ndarray], preprocessings: Sequence[Preprocessing], max_pixels: int = MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Ray Data task: read, hash and decode a batch of files with the local backend's code; never raises.

    Returns the batch's ``index``, ``record``, ``size``, ``mtime`` and ``needed`` columns with ``sha256``,
    ``error`` (``""`` when decoded), ``pixels`` and one uint8 ``crop<n>`` column per preprocessing (zeros
    where decoding failed).
    """
    decoded = [decode_file(str(path), preprocessings, max_pixels=max_pixels) for path in batch["path"]]
    columns = {key: batch[key] for key in ("index", "record", "size", "mtime", "needed")}
    columns.update({
        "sha256": np.array([d.sha256 for d in decoded], dtype=object),
        "error": np.array([d.error for d in decoded], dtype=object),
        "pixels": np.stack([
            d.pixels if not d.error else np.zeros(PIXELS_SIZE * PIXELS_SIZE * 3, np.float32) for d in decoded
        ]),
    })
    for number, preprocessing in enumerate(preprocessings):
        blank = np.zeros((preprocessing.crop_size, preprocessing.crop_size, 3), np.uint8)
        columns[f"crop{number}"] = np.stack([d.crops[number] if not d.error else blank for d in decoded])
    return columns


class EmbedActor:
    """Ray Data actor: the backbone sessions of one worker, embedding decoded batches and writing their shards."""

    def __init__(self, models: list[ExportedModel], device: str, threads: int, batch_size: int,
                 target: ShardTarget, storages: dict[str, str] | None = None) -> None:
        self.fatal = ""  # a problem the user must fix, sent to the driver instead of crashing the actor in a loop
        self.batch_size, self.target = batch_size, target
        # Shards a retried batch writes again get another writer name; the commit lists one of each row.
        self.name = uuid.uuid4().hex[:12]
        for model in models:  # this node's copy of each file must be the driver's
            try:
                model.verify()
            except UserError:
                self.fatal = (f"{model.onnx_path} on this node (missing, or another file) is not the model the driver "
                              f"embeds with (sha256 {model.fingerprint[:12]}); give every node the same --models-dir.")
                return
        try:
            sessions = [model.open(device, threads) for model in models]
        except UserError as error:
            self.fatal = str(error)
            return
        self.specs, _ = feature_specs(sessions)
        for spec in self.specs:  # each set as the driver keeps it
            if spec.name in (storages or {}):
                spec.attrs["storage"] = storages[spec.name]
        self.providers = ",".join(session.provider for session in sessions)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed a decoded batch (in inference batches of ``batch_size``) and write one pending shard per feature
        set; return the batch's index, needed mask, hashes and errors, and the shards written (JSON, first row)."""
        if self.fatal:
            return {"index": batch["index"], "fatal": np.array([self.fatal] * len(batch["index"]), dtype=object)}
        crops = [f"crop{number}" for number in range(sum(key.startswith("crop") for key in batch))]
        decoded = [
            DecodedImage(str(sha256), tuple(batch[key][row] for key in crops), batch["pixels"][row], str(error))
            for row, (sha256, error) in enumerate(zip(batch["sha256"], batch["error"]))
        ]
        needed = [{spec.name for bit, spec in enumerate(self.specs) if mask >> bit & 1} for mask in batch["needed"]]
        features: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(decoded), self.batch_size):
            part = slice(start, start + self.batch_size)
            for name, rows in embed_batch(decoded[part], needed[part], self.specs).items():
                features.setdefault(name, []).append(rows)
        root = self.target.dataset_root
        segments = {spec.name: Segment(spec.name, spec.fingerprint, spec.attrs, root) for spec in self.specs}
        record_outcomes(
            [ImageRecord(str(path)) for path in batch["record"]],
            [FileState("", int(size), int(mtime)) for size, mtime in zip(batch["size"], batch["mtime"])],
            needed, [str(s) for s in batch["sha256"]], [str(e) for e in batch["error"]],
            {name: np.concatenate(rows) for name, rows in features.items()}, self.specs, segments,
        )
        order = int(batch["index"][0])
        written = [asdict(self.target.write(part, order, self.name)) for part in segments.values() if len(part)]
        columns = {key: batch[key] for key in ("index", "needed", "sha256", "error")}
        columns["shards"] = np.array([json.dumps(written)] + [""] * (len(decoded) - 1), dtype=object)
        columns["providers"] = np.array([self.providers] * len(decoded), dtype=object)
        columns["fatal"] = np.array([""] * len(decoded), dtype=object)
        return columns
