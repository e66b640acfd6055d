"""A fitted classifier saved with its features' provenance: what fit makes and serve reads."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.pipeline import Pipeline

import pipeline
from pipeline.errors import UserError
from pipeline.files import atomic_path, sha256_file

BUNDLE_FORMAT = "pipeline.classifier-bundle"
BUNDLE_VERSION = 1
PROVENANCE_ATTRS = (
    "kind", "model", "onnx_file", "onnx_sha256", "fingerprint", "weights_id", "weights", "weights_license", "untrained",
    "image_size", "resize_size", "resize_mode", "interpolation", "precision", "source_onnx_sha256", "calibration_images",
    "calibration_sha256", "embedding_dim", "embedding_layer",
)


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

