"""ExtractOptions: what an extract run does, one field per option of ``python -m pipeline.extract``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pipeline.extract.decode import MAX_PIXELS
from pipeline.models import DEFAULT_BACKBONES, PRECISIONS
from pipeline.models.quantize import CALIBRATION_IMAGES
from pipeline.models.session import DEVICES
from pipeline.options import AtLeast, OneOf, Options
from pipeline.store.spec import STORAGES

BACKENDS = ("local", "ray")
JOURNAL_ROWS = 512  # results are written as pending shards at least every this many images (or 30 seconds)


@dataclass(frozen=True)
class ExtractOptions(Options):
    """How :func:`run_extract` embeds a dataset: ``python -m pipeline.extract``'s options, one field each.

    Attributes
    ----------
    models : sequence of str
        Backbones, named as :func:`pipeline.models.parse_model_name` reads them (``timm/<name>[.<tag>]``...);
        each is its own feature set, beside the pixel baseline.
    cache : path-like
        The store.
    batch_size : int, optional
        Images per inference batch (default: the device's).
    device : {"auto", "cuda", "cpu"}
    workers : int, optional
        ``local``: decoding threads (default: the available cores); ``ray``: embedding actors.
    models_dir : path-like
        The exported models.
    weights : str or sequence of str, optional
        See :func:`pipeline.models.weights.weights_per_model`; None uses each model as it is exported.
    overwrite : bool
        Replace features of another model file or dataset in the store.
    progress : bool, optional
        Draw a progress bar (default: when stderr is a terminal).
    journal_rows : int
        Results are written as pending shards every this many images or 30 seconds, whichever comes first
        (on Ray, by the workers, every this many images each).
    precision : {"auto", "fp32", "fp16", "int8"}
        The model variant; each precision is its own feature set (``resnet50``, ``resnet50-int8``).
    calibration_images : int
        Images drawn to calibrate an int8 variant when it is first made.
    backend : {"local", "ray"}
        ``ray`` decodes and embeds on a Ray cluster (``RAY_ADDRESS``, or a local Ray instance), whose actors
        write their rows' shards themselves (this process commits the index).
    max_pixels : int
        Images above it are recorded as too large, and tried again next run.
    root : path-like, optional
        A CSV manifest's dataset root (see :func:`pipeline.extract.discover.discover`).
    storage : {"float32", "float16"}, optional
        How the run's feature sets keep their embeddings (readers return float32 either way); None: as the
        store holds each set, float32 for a new one. A set keeps one storage; ``overwrite`` makes it again in
        another.
    """

    models: Sequence[str] = tuple(DEFAULT_BACKBONES)
    cache: str | os.PathLike = "features/embeddings.h5"
    batch_size: int | None = None
    device: str = "auto"
    workers: int | None = None
    models_dir: str | os.PathLike = "models"
    weights: str | Sequence[str] | None = None
    overwrite: bool = False
    progress: bool | None = None
    journal_rows: int = JOURNAL_ROWS
    precision: str = "auto"
    calibration_images: int = CALIBRATION_IMAGES
    backend: str = "local"
    max_pixels: int = MAX_PIXELS
    root: str | os.PathLike | None = None
    storage: str | None = None

    constraints: ClassVar = {
        "batch_size": [None, AtLeast(1)],
        "device": [OneOf(DEVICES)],
        "workers": [None, AtLeast(1)],
        "journal_rows": [AtLeast(1)],
        "precision": [OneOf(("auto", *PRECISIONS))],
        "calibration_images": [AtLeast(1)],
        "backend": [OneOf(BACKENDS)],
        "max_pixels": [AtLeast(1)],
        "storage": [None, OneOf(STORAGES)],
    }
