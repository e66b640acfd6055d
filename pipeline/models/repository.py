"""The repository of exported models (``--models-dir``): a name becomes one resolved, verified exported model.

An :class:`ExportedModel` is what every later stage receives: its manifest (input recipe, output dimension,
provenance, licence), its ONNX file and its fingerprint, checked against each other once, here. Exporting
(torch, and timm for timm models) happens only when a model is missing or other weights are asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, command
from pipeline.files import atomic_path
from pipeline.models.manifest import MANIFEST_VERSION, OPSET, DeployedManifest, ModelManifest
from pipeline.models.registry import EXPORT_EXTRA, ModelName, parse_feature_set, parse_model_name
from pipeline.models.session import ExportedModel
from pipeline.models.weights import PRETRAINED, WeightsRequest, parse_weights

logger = logging.getLogger(__name__)
UNTRAINED_BANNER = (
    "!" * 78
    + "\n!! {model}: UNTRAINED RANDOM WEIGHTS. These embeddings carry nothing learnt;\n"
    "!! classifiers fitted on them measure the pipeline, not transfer learning.\n" + "!" * 78
)


@dataclass(frozen=True)
class ExportResult:
    """The outcome of :meth:`ModelRepository.export`: the model, and whether anything was written."""

    model: ExportedModel
    exported: bool

    @property
    def manifest(self) -> ModelManifest:
        return self.model.manifest

    @property
    def onnx_path(self) -> Path:
        return self.model.onnx_path


class ModelRepository:
    """The exported models in a folder: ``<stem>.onnx`` beside its manifest ``<stem>.json``.

    Parameters
    ----------
    folder : path-like
        The models folder (``--models-dir``).
    """

    def __init__(self, folder: str | os.PathLike = "models") -> None:
        self.folder = Path(folder)

    def paths(self, name: str) -> tuple[Path, Path]:
        """``(onnx_path, manifest_path)`` of a feature-set name (a stem)."""
        return self.folder / f"{name}.onnx", self.folder / f"{name}.json"

    def load(self, name: str, precision: str | None = None) -> ExportedModel:
        """The exported model ``name`` (a model or feature-set name: ``resnet50``, ``resnet50-int8``,
        ``timm/convnext_atto.d2_in1k``) at ``precision`` (default: the name's own, fp32 without a suffix).

        Raises
        ------
        UserError
            An unknown name, a missing export or variant (saying how to make it), or a file that does not
            match its manifest.
        """
        model, named_precision = parse_feature_set(name)
        precision = precision or named_precision
        onnx_path, manifest_path = self.paths(model.feature_set(precision))
        if precision != "fp32" and not manifest_path.exists():
            raise UserError(
                f"no {precision} variant of {model.name} in {self.folder} ({manifest_path} is missing); make it with "
                f"{command('extract')} DATA --models {model.name} --precision {precision}, or {command('quantize')} "
                f"--model {model.name} --precision {precision}"
                + (" --calibration DATA." if precision == "int8" else ".")
            )
        if not manifest_path.exists():
            raise UserError(f"{model.name} is not exported in {self.folder} (no {manifest_path.name}); export it with "
                            f"{command('export')} --model {model.name} --out {self.folder}.")
        return ExportedModel(ModelManifest.load(manifest_path), onnx_path).verify()

    def current(self, name: str) -> ExportedModel | None:
        """The intact export or variant with feature-set name ``name``, else None (missing, unreadable, changed)."""
        onnx_path, manifest_path = self.paths(name)
        if not (onnx_path.exists() and manifest_path.exists()):
            return None
        try:
            return ExportedModel(ModelManifest.load(manifest_path), onnx_path).verify()
        except UserError:
            return None

    def get(self, name: str, weights: str | None = None, image_size: int | None = None) -> ExportedModel:
        """The fp32 export of ``name`` with ``weights``: as it is exported when ``weights`` is None, else one with
        those weights, exporting it first when it is missing or has other weights (the replaced one is kept as
        ``<stem>.previous.onnx`` / ``.json``). A missing model with ``weights`` None gets its pretrained weights.

        Raises
        ------
        UserError
            As :meth:`export`, and when exporting needs torch or timm that are not installed.
        """
        model = parse_model_name(name)
        current = self.current(model.stem)
        if current is not None and weights is None:
            return current
        if current is not None:
            request = parse_weights(model, weights)
            if request.matches(current.manifest.weights):
                return current
            image_size = image_size or current.manifest.input["size"]
            logger.info("%s: %s has weights %s, not %s.", model.name, current.onnx_path,
                        current.manifest.weights_id, weights)
        logger.info("%s: exporting it into %s with --weights %s first.", model.name, self.folder,
                    weights or PRETRAINED)
        result = self.export(model, weights or PRETRAINED, image_size)
        if result.manifest.untrained:
            logger.warning(UNTRAINED_BANNER.format(model=model.name))
        logger.info("%s", describe_export(result))
        return result.model

    def export(self, model: ModelName | str, weights: str = PRETRAINED, image_size: int | None = None, seed: int = 0,
               force: bool = False) -> ExportResult:
        """Export ``model`` with ``weights`` into this folder, unless an identical export is there.

        Parameters
        ----------
        model : ModelName or str
            The model.
        weights : str
            ``pretrained`` (for vgg16 and resnet50 also ``imagenet`` or a torchvision weights name such as
            ``IMAGENET1K_V2``; for torchvision models any name of their weights enum), ``random``, or a state-dict path.
        image_size : int, optional
            Side of the square crop; default: the model's own (an existing export of another size is kept).
        seed : int
            Seed of ``random`` weights.
        force : bool
            Export even when an identical export exists.

        Raises
        ------
        UserError
            An unknown model, weights that cannot be had or do not fit, a model that cannot be exported or whose
            ONNX graph disagrees with the library's forward.
        """
        model = parse_model_name(model) if isinstance(model, str) else model
        request = parse_weights(model, weights, seed)
        current = self.current(model.stem)
        if current and not force and _same_export(current.manifest, model, request, image_size):
            return ExportResult(current, exported=False)
        try:
            from pipeline.models.export import export_onnx
        except ImportError:
            raise UserError(f"exporting {model.name} needs torch; install the export extra ({EXPORT_EXTRA}) or copy "
                            f"its export into {self.folder}.") from None
        onnx_path, manifest_path = self.paths(model.stem)
        with atomic_path(onnx_path) as tmp:
            manifest = export_onnx(model, request, image_size, tmp, onnx_path.name)
            if current and not request.matches(current.manifest.weights):  # only now that the new one is good
                self._keep_previous(onnx_path, manifest_path)
            # The new file replaces the old one as this block ends; from then until the new manifest lands,
            # no manifest claims it, so a kill in between leaves an unfinished export, never a wrong one.
            manifest_path.unlink(missing_ok=True)
        manifest.save(manifest_path)
        return ExportResult(ExportedModel(manifest, onnx_path), exported=True)

    def current_variant(self, source: ExportedModel, precision: str) -> ExportedModel | None:
        """The intact ``precision`` variant derived from ``source``, else None (missing, damaged, or made from an
        earlier export). An existing one is kept whatever calibration is asked for now (its own is in its
        manifest), so that the embeddings made with it stay comparable."""
        current = self.current(source.feature_set(precision))
        if current is not None and current.manifest.derived_from.get("onnx_sha256") == source.fingerprint:
            return current
        return None

    def variant(self, source: ExportedModel, precision: str, calibration: Iterable[tuple[np.ndarray, str]] = (),
                calibration_images: int | None = None, seed: int = 0, force: bool = False) -> ExportedModel:
        """The ``precision`` variant of ``source``: the current one (unless ``force``), else made anew (see
        :func:`pipeline.models.quantize.make_variant`) from ``calibration``, ``(crop, sha256)`` pairs of the
        user's images in a seeded random order."""
        if precision == "fp32":
            return source
        current = None if force else self.current_variant(source, precision)
        if current is not None:
            return current
        from pipeline.models.quantize import CALIBRATION_IMAGES, make_variant

        onnx_path, manifest_path = self.paths(source.feature_set(precision))
        manifest = make_variant(source, precision, calibration, onnx_path, manifest_path,
                                calibration_images or CALIBRATION_IMAGES, seed)
        return ExportedModel(manifest, onnx_path)

    def _keep_previous(self, onnx_path: Path, manifest_path: Path) -> None:
        """Keep an export that is about to be replaced by one with other weights as ``<stem>.previous.onnx`` and
        ``.json`` (one generation: an older ``.previous`` pair goes), with a notice saying how to go back."""
        previous_onnx = onnx_path.with_name(onnx_path.stem + ".previous.onnx")
        previous_manifest = manifest_path.with_name(manifest_path.stem + ".previous.json")
        previous_manifest.unlink(missing_ok=True)  # never a manifest beside an ONNX file it does not describe
        shutil.copy2(onnx_path, previous_onnx)
        shutil.copy2(manifest_path, previous_manifest)
        logger.info("notice: kept the export being replaced as %s and %s; to go back, rename them to %s and %s.",
                    previous_onnx, previous_manifest.name, onnx_path.name, manifest_path.name)


def open_deployed(path: str | os.PathLike) -> ExportedModel:
    """The deployed classifier ``path`` (``pipeline.deploy``'s ``.onnx``) with its manifest, checked against the
    file; nothing is unpickled. Its session's ``embed`` gives class probabilities ``[N, C]``.

    Raises
    ------
    UserError
        When the manifest is missing or is not a deployed classifier's, or the ONNX file changed.
    """
    path = Path(path)
    manifest = DeployedManifest.load(path.with_suffix(".json"))
    return ExportedModel(manifest, path).verify()


def describe_export(result: ExportResult) -> str:
    """One line saying what an export did."""
    manifest = result.manifest
    what = f"{manifest.output['dim']}-d embedding, {manifest.input['size']} px, weights {manifest.weights_id}"
    if not result.exported:
        return f"{manifest.model}: {result.onnx_path} is up to date ({what}); nothing to do."
    size_mb = result.onnx_path.stat().st_size / 1e6
    return f"{manifest.model}: exported {result.onnx_path} ({what}, {size_mb:.1f} MB)."


def _same_export(manifest: ModelManifest, model: ModelName, request: WeightsRequest, image_size: int | None) -> bool:
    return (
        manifest.format_version == MANIFEST_VERSION
        and manifest.model == model.name
        and manifest.opset == OPSET
        and image_size in (None, manifest.input.get("size"))
        and request.matches(manifest.weights)
    )
