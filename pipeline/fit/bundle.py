"""A fitted classifier saved with its features' provenance: what fit makes and serve reads.

A bundle is a skops file (scikit-learn's secure persistence): loading it builds only the types on an allow-list
and runs no code. Bundles of earlier versions are joblib pickles, which run whatever code they hold when loaded:
they are read only when the user says so (``trust``), and ``transfer bundles`` rewrites them as skops files.
"""

from __future__ import annotations

import json
import os
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
import skops
import skops.io
from sklearn.pipeline import Pipeline

import pipeline
from pipeline.errors import UserError, command
from pipeline.files import atomic_path, plain, sha256_file

BUNDLE_FORMAT = "pipeline.classifier-bundle"
BUNDLE_VERSION = 1
BUNDLE_SUFFIX = ".skops"
LEGACY_SUFFIX = ".joblib"  # the joblib pickles of earlier versions
# Beyond the types skops trusts by itself (scikit-learn's public estimators, numpy, builtins): the private parts
# of the calibrated SVMs fit makes. A bundle holding any other type is refused before anything is built.
TRUSTED_TYPES = ("sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration")
PROVENANCE_ATTRS = (
    "kind", "model", "onnx_file", "onnx_sha256", "fingerprint", "weights_id", "weights", "weights_license", "untrained",
    "image_size", "resize_size", "resize_mode", "interpolation", "precision", "source_onnx_sha256",
    "calibration_images", "calibration_sha256", "embedding_dim", "embedding_layer",
)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle's pickle depends on."""
    return {
        "pipeline": pipeline.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
        "skops": skops.__version__, "python": platform.python_version(),
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
        """Write the bundle atomically as a skops file; returns the file's sha256."""
        payload = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **_fields(self)}
        with atomic_path(path) as tmp:
            skops.io.dump(payload, tmp)
            _canonical_zip(tmp)
        return sha256_file(path)

    @classmethod
    def load(cls, path: str | os.PathLike, trust: bool = False) -> ClassifierBundle:
        """Read a bundle written by :meth:`save`, building only allow-listed types; nothing in it runs.

        A joblib pickle of an earlier version is unpickled only with ``trust`` (unpickling runs the code it holds).

        Raises
        ------
        UserError
            When the file is missing, is not a classifier bundle of this format, holds a type that is not on the
            allow-list, or is a pickle and ``trust`` is not given.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no classifier bundle at {path}; run fit first (make fit) or check the path.")
        with open(path, "rb") as stream:
            is_zip = stream.read(2) == b"PK"  # a skops file is a zip archive, even a truncated one; a pickle is not
        payload = _read_skops(path) if is_zip else _unpickle(path, trust)
        if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{path} is not a classifier bundle written by pipeline.fit; fit again.")
        if payload.get("format_version") != BUNDLE_VERSION:
            raise UserError(
                f"{path} is bundle format {payload.get('format_version')}, this version reads {BUNDLE_VERSION}; "
                "fit again."
            )
        missing = [name for name in cls.__dataclass_fields__ if name not in payload]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: not a complete classifier bundle; fit again.")
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__})


def _canonical_zip(path: Path) -> None:
    """Make a skops file's bytes depend on its content alone: skops names objects and array files after their
    ``id()`` and stamps the time; here they are numbered in order of appearance and dated 1980-01-01, so that the
    same classifier saved twice gives the same file (and sha256)."""
    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
        arrays = {name: archive.read(name) for name in archive.namelist() if name != "schema.json"}
    numbers: dict[str, str] = {}

    def renumber(node: Any) -> Any:
        if isinstance(node, list):
            return [renumber(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "__id__" or (key == "file" and isinstance(value, str) and value in arrays):
                value = numbers.setdefault(f"{key}:{value}", str(len(numbers)))
                value = int(value) if key == "__id__" else f"{value}.npy"
            out[key] = renumber(value)
        return out

    schema = renumber(schema)
    files = {"schema.json": json.dumps(schema, sort_keys=True).encode()}
    files.update({f"{numbers[f'file:{name}']}.npy": data for name, data in arrays.items()})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), files[name], zipfile.ZIP_DEFLATED)


def _read_skops(path: Path) -> Any:
    try:
        refused = sorted(set(skops.io.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
        if not refused:
            return skops.io.load(path, trusted=list(TRUSTED_TYPES))
    except Exception as error:  # a truncated or foreign zip file fails in many ways
        raise UserError(f"{path} is not a readable classifier bundle ({type(error).__name__}); fit again.") from None
    raise UserError(f"{path} holds types a classifier bundle never holds ({', '.join(refused)}), so it is not loaded; "
                    "use a bundle pipeline.fit wrote.")


def _unpickle(path: Path, trust: bool) -> Any:
    if not trust:
        raise UserError(
            f"{path} is a joblib pickle (a bundle of an earlier version, or not a bundle), and unpickling runs the "
            f"code inside it; rewrite the bundles you made as safe skops files once ({command('bundles')} "
            f"{path.parent}), or pass --trust if you know where it comes from."
        )
    try:
        return joblib.load(path)
    except Exception as error:  # a truncated or foreign file fails in many ways inside pickle
        raise UserError(f"{path} is not a readable classifier bundle ({type(error).__name__}); fit again.") from None


def _fields(bundle: ClassifierBundle) -> dict[str, Any]:
    """The bundle's fields as a dict, without copying the fitted pipeline (``dataclasses.asdict`` deep-copies)."""
    return {name: getattr(bundle, name) for name in bundle.__dataclass_fields__}


def provenance_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """The provenance a bundle keeps from a store group's attributes, as plain JSON-ready values."""
    provenance = {key: plain(attrs[key]) for key in PROVENANCE_ATTRS if key in attrs}
    if isinstance(provenance.get("weights"), str):  # the store keeps it as a JSON string attribute
        provenance["weights"] = json.loads(provenance["weights"])
    return provenance


