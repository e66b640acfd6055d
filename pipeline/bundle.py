"""Stage 5d: a fitted classifier saved with its features' provenance, checked before loading, matched to its backbone."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.pipeline import Pipeline

import pipeline
from pipeline.decode import PIXELS_FINGERPRINT
from pipeline.errors import UserError, command
from pipeline.files import atomic_path, sha256_file
from pipeline.models import BackboneSession, ModelRepository
from pipeline.store import PIXELS

BUNDLE_FORMAT = "pipeline.classifier-bundle"
BUNDLE_VERSION = 1
PROVENANCE_ATTRS = (
    "kind", "model", "onnx_file", "onnx_sha256", "fingerprint", "weights_id", "weights", "weights_license", "untrained",
    "image_size", "resize_size", "resize_mode", "interpolation", "precision", "source_onnx_sha256", "calibration_images",
    "calibration_sha256", "embedding_dim", "embedding_layer",
)


CLASSIFIERS_ROOT = Path("models/classifiers")


def classifiers_dir(cache: str | os.PathLike) -> Path:
    """Where fit writes, and classify looks for, the classifiers fitted on the store ``cache``:
    ``models/classifiers/<store name>/``, so that fitting one store never replaces another's classifiers."""
    return CLASSIFIERS_ROOT / Path(cache).stem


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle's pickle depends on."""
    return {
        "pipeline": pipeline.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
        "joblib": joblib.__version__, "python": platform.python_version(),
    }


@dataclass
class ClassifierBundle:
    """A fitted classifier and the provenance of the features it was fitted on.

    Attributes
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Maps ``[N, D]`` features to class indices; has ``predict_proba``.
    classes : list of str
        Class names; ``pipeline`` predicts indices into this list.
    features : str
        The feature set: a backbone name (``resnet50``), a precision variant (``resnet50-int8``) or ``pixels``.
    classifier : str
        ``logreg`` or ``svm``.
    provenance : dict
        How the features were computed: the store group's attributes (ONNX sha256, weights, image size...).
    params : dict
        The chosen hyper-parameters.
    metrics : dict
        Its scores: ``validation_score`` and the test metrics.
    seed : int
        The seed it was fitted with.
    versions : dict
        Library versions at fitting time.
    """

    pipeline: Pipeline
    classes: list[str]
    features: str
    classifier: str
    provenance: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]
    seed: int
    versions: dict[str, str] = field(default_factory=library_versions)

    @property
    def onnx_sha256(self) -> str:
        """The sha256 of the ONNX backbone the features came from (``""`` for the pixel baseline)."""
        return str(self.provenance.get("onnx_sha256", ""))

    def save(self, path: str | os.PathLike) -> str:
        """Write the bundle atomically with joblib; returns the file's sha256."""
        payload = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **_fields(self)}
        with atomic_path(path) as tmp:
            joblib.dump(payload, tmp, compress=3)
        return sha256_file(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassifierBundle:
        """Read a bundle written by :meth:`save`.

        Loading unpickles the file, which can run code: load only bundles you or your team made.

        Raises
        ------
        UserError
            When the file is missing or is not a classifier bundle of this format.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no classifier bundle at {path}; run fit first (make fit) or check the path.")
        try:
            payload = joblib.load(path)
        except Exception as error:  # a truncated or foreign file fails in many ways inside pickle
            raise UserError(f"{path} is not a readable classifier bundle ({type(error).__name__}); fit again.") from None
        if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{path} is not a classifier bundle written by pipeline.fit; fit again.")
        if payload.get("format_version") != BUNDLE_VERSION:
            raise UserError(
                f"{path} is bundle format {payload.get('format_version')}, this version reads {BUNDLE_VERSION}; fit again."
            )
        missing = [name for name in cls.__dataclass_fields__ if name not in payload]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: not a complete classifier bundle; fit again.")
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__})


def check_listed(path: str | os.PathLike) -> None:
    """Refuse a bundle that the ``report.json`` beside it does not list with the sha256 it has now.

    Loading a bundle unpickles it, which can run any code; a bundle fit wrote, unchanged since, is listed.

    Raises
    ------
    UserError
        When the bundle exists but is not listed, or its bytes changed since fit listed them.
    """
    path = Path(path)
    if not path.is_file():
        return  # ClassifierBundle.load says it is missing
    report = path.parent / "report.json"
    try:
        listed = {entry["path"]: entry["sha256"] for entry in json.loads(report.read_text(encoding="utf-8"))["bundles"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    if path.name not in listed:
        where = f"listed in {report}" if report.exists() else f"beside a report.json (none at {report})"
        raise UserError(
            f"{path} is not {where}, and loading a classifier bundle runs the code inside it; use a bundle fit "
            "wrote, or pass --trust if you know where this one comes from."
        )
    if sha256_file(path) != listed[path.name]:
        raise UserError(
            f"{path} is not the file {report} lists (its sha256 changed); fit again, or pass --trust if you know why "
            "it changed."
        )


def open_fitted_backbone(
    bundle: ClassifierBundle, bundle_path: Path, repository: ModelRepository, device: str,
    precision: str = "auto", allow_precision_change: bool = False,
) -> BackboneSession | None:
    """The backbone the bundle was fitted on, matched by its fingerprint (None for the pixel baseline).

    ``precision`` ``auto`` is the bundle's own. Another precision of the same fp32 export is refused
    unless ``allow_precision_change``: its embeddings differ slightly from those the classifier learnt.
    """
    if bundle.features == PIXELS:
        if bundle.provenance.get("fingerprint", PIXELS_FINGERPRINT) != PIXELS_FINGERPRINT:
            print(f"notice: {bundle_path} was fitted on pixel-baseline features of an earlier recipe "
                  f"({bundle.provenance['fingerprint']}, now {PIXELS_FINGERPRINT}); its predictions may shift "
                  "slightly: extract and fit again to refresh it.", file=sys.stderr)
        if precision != "auto":
            print(f"notice: --precision {precision} does not apply to {bundle_path}: it classifies raw pixels.", file=sys.stderr)
        return None
    fitted = bundle.provenance.get("precision", "fp32")
    model = bundle.provenance.get("model") or bundle.features
    wanted = fitted if precision == "auto" else precision
    if wanted != fitted and not allow_precision_change:
        raise UserError(
            f"{bundle_path} was fitted on {fitted} embeddings ({bundle.features}), not {wanted}; classify with "
            f"--precision {fitted}, fit a classifier on {model} {wanted} features, or pass "
            "--allow-precision-change to use it anyway (predictions may shift slightly)."
        )
    backbone = repository.load(model, wanted)
    if wanted == fitted and backbone.fingerprint != bundle.onnx_sha256:
        remedy = ("export that model again" if fitted == "fp32" else
                  f"fit again on {backbone.name} features extracted with it (the variant was made again)")
        raise UserError(
            f"{bundle_path} was fitted on {bundle.features} embeddings of ONNX sha256 {bundle.onnx_sha256[:12]} "
            f"({bundle.provenance.get('weights_id')}), but {backbone.onnx_path} has sha256 "
            f"{backbone.fingerprint[:12]} ({backbone.manifest.weights_id}); {remedy}, or use a classifier "
            "fitted on this one."
        )
    source = bundle.provenance.get("source_onnx_sha256", bundle.onnx_sha256)
    if wanted != fitted and backbone.manifest.source_sha256 != source:
        raise UserError(
            f"{backbone.onnx_path} derives from an fp32 export of sha256 {backbone.manifest.source_sha256[:12]}, but "
            f"{bundle_path} from one of sha256 {source[:12]}; make the variant again from the current export "
            f"({command('quantize')} --model {model} --precision {wanted} --force"
            + (" --calibration DATA" if wanted == "int8" else "") + ") or classify at --precision " + fitted + "."
        )
    return backbone.open(device)


def _fields(bundle: ClassifierBundle) -> dict[str, Any]:
    """The bundle's fields as a dict, without copying the fitted pipeline (``dataclasses.asdict`` deep-copies)."""
    return {name: getattr(bundle, name) for name in bundle.__dataclass_fields__}


def provenance_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """The provenance a bundle keeps from a store group's attributes, as plain JSON-ready values."""
    provenance = {key: _plain(attrs[key]) for key in PROVENANCE_ATTRS if key in attrs}
    if isinstance(provenance.get("weights"), str):  # the store keeps it as a JSON string attribute
        provenance["weights"] = json.loads(provenance["weights"])
    return provenance


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value

