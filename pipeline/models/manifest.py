"""The JSON manifest beside each ONNX model (a backbone, or a classifier deployed behind one): what it computes, how."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError, command
from pipeline.files import write_json_atomic
from pipeline.models.preprocessing import SHORTER, Preprocessing
from pipeline.models.registry import ModelName, parse_model_name

MANIFEST_VERSION = 1
OPSET = 18  # the ONNX opset exports are written at (torch.onnx.export, dynamo)
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
UNRECORDED_LICENSE = "not recorded (exported before licences were)"


@dataclass(frozen=True)
class ModelManifest:
    """Everything known about one exported backbone; written last, so its presence means the export finished.

    Attributes
    ----------
    model : str
        The model's name: ``vgg16``, ``resnet50``, ``timm/<name>[.<tag>]`` or ``torchvision/<name>``.
    onnx_file : str
        File name of the ONNX model, beside the manifest.
    onnx_sha256 : str
        sha256 of the ONNX file: the fingerprint that stores and classifiers refer to.
    weights : dict
        Provenance: ``source`` (pretrained, imagenet, random or file) and, as they apply, ``name``, ``url``,
        ``hub_id``, ``file``, ``seed``, ``sha256`` (of the weights file, or of the generated tensors for random
        weights) and ``license``.
    input : dict
        ``name``, ``layout`` (NHWC), ``dtype`` (uint8), ``size`` (crop), ``resize_size``, ``resize_mode``
        (``shorter`` or ``squash``; absent before other families came: ``shorter``), ``interpolation``, ``mean``
        and ``std`` (applied inside the graph), and ``recipe``: the library's own description of its eval transform.
    output : dict
        ``name``, ``dim`` and the ``layer`` it is taken from, in the library's terms.
    opset : int
        ONNX opset of the default domain.
    versions : dict
        Versions of the libraries that produced the file.
    created : str
        ISO 8601 UTC time of the export.
    verification : dict
        The export's own check against PyTorch (``images``, ``min_cosine``, ``max_relative_error``), or for a
        variant its fidelity to fp32 (``images``, ``min_cosine``, ``mean_cosine``, and ``on`` which images).
    precision : str
        ``fp32`` for an export; ``fp16`` or ``int8`` for a variant derived from one by pipeline.quantize.
    derived_from : dict
        A variant's fp32 source: ``onnx_file``, ``onnx_sha256``, ``precision``; empty for an export.
    calibration : dict
        int8 only: ``method``, ``images``, ``seed`` and the ``sha256`` of every calibration image.
    """

    model: str
    onnx_file: str
    onnx_sha256: str
    weights: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    opset: int
    versions: dict[str, str]
    created: str
    verification: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    derived_from: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    @property
    def model_name(self) -> ModelName:
        """The model's parsed name."""
        return parse_model_name(self.model)

    @property
    def name(self) -> str:
        """The file stem and the store's feature-set name: ``resnet50``, ``resnet50-int8``,
        ``timm-convnext_atto-d2_in1k``."""
        return self.model_name.feature_set(self.precision)

    @property
    def license(self) -> str:
        """The weights' licence, as their library states it."""
        return str(self.weights.get("license", UNRECORDED_LICENSE))

    @property
    def weights_id(self) -> str:
        """A short identity of the weights: ``imagenet:IMAGENET1K_V1``, ``random:seed=0`` or ``file:<sha256>``."""
        return weights_id(self.weights)

    @property
    def source_sha256(self) -> str:
        """sha256 of the fp32 export this model is (or was derived from): the same for all its precisions."""
        return self.derived_from.get("onnx_sha256", self.onnx_sha256)

    @property
    def untrained(self) -> bool:
        """True when the embeddings come from random weights and so carry no ImageNet knowledge."""
        return self.weights.get("source") == "random"

    @property
    def preprocessing(self) -> Preprocessing:
        """How to make this model's input crops from an image."""
        spec = self.input
        return Preprocessing(
            spec["resize_size"], spec["size"], tuple(spec["mean"]), tuple(spec["std"]), spec["interpolation"],
            spec.get("resize_mode", SHORTER),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the manifest as JSON, atomically."""
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelManifest:
        """Read a manifest written by :meth:`save`.

        Raises
        ------
        UserError
            If the file is missing, is not JSON, or lacks fields.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "classes" in data:
                raise UserError(f"{path} describes a deployed classifier, not a backbone; export the backbone into "
                                "a folder of its own (make models).")
            return cls(**data)
        except FileNotFoundError:
            raise UserError(f"no model manifest at {path}; export the model first (make models).") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise UserError(f"{path} is not a model manifest ({error}); delete it and export again.") from None


@dataclass(frozen=True)
class DeployedManifest(ModelManifest):
    """The manifest beside a deployed classifier: a backbone manifest whose output is class probabilities.

    The inherited fields describe the merged file (``onnx_file``, ``onnx_sha256``, ``verification`` against
    the bundle), its input (the backbone's: uint8 NHWC crops and how to make them) and the backbone's
    weights, precision and derivation; ``output`` is ``probabilities``, one column per class.

    Attributes
    ----------
    classes : list of str
        Class names, in the order of the output's columns.
    classifier : dict
        ``name`` (logreg or svm), ``features``, ``params``, ``metrics``, ``seed``, the bundle it was made from
        (``bundle_file``, ``bundle_sha256``, ``fitted_with`` library versions) and the backbone merged in
        (``backbone_onnx_file``, ``backbone_onnx_sha256``).
    """

    classes: list[str] = field(default_factory=list)
    classifier: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeployedManifest:
        """Read the manifest of a deployed classifier.

        Raises
        ------
        UserError
            If the file is missing, is not JSON, or describes something else (a backbone, say).
        """
        path = Path(path)
        again = f"deploy the classifier again ({command('deploy')} BUNDLE)"
        try:
            manifest = cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError(f"no manifest at {path} beside the deployed classifier; {again}.") from None
        except (ValueError, UnicodeDecodeError, TypeError):
            raise UserError(f"{path} is not the manifest of a deployed classifier; {again}.") from None
        if not manifest.classes:
            raise UserError(f"{path} describes a backbone, not a classifier; pass a bundle (.skops) or a classifier "
                            f"made by {command('deploy')} (.onnx).")
        return manifest


def weights_id(weights: dict[str, Any]) -> str:
    """Return the identity of a weights provenance record (see :attr:`ModelManifest.weights_id`)."""
    source = weights["source"]
    if source in ("imagenet", "pretrained"):
        return f"{source}:{weights['name']}"
    if source == "random":
        return f"random:seed={weights['seed']}"
    return f"file:{weights['sha256']}"


def remake_command(manifest: ModelManifest, onnx_path: Path) -> str:
    """What to do to make ``onnx_path`` (described by ``manifest``) again: the command, in a phrase."""
    if isinstance(manifest, DeployedManifest):
        bundle = onnx_path.parent / manifest.classifier.get("bundle_file", "BUNDLE")
        return f"deploy it again: {command('deploy')} {bundle} --out {onnx_path}"
    if manifest.precision != "fp32":
        return (f"make it again: {command('quantize')} --model {manifest.model} "
                f"--precision {manifest.precision} --force"
                + (" --calibration DATA" if manifest.precision == "int8" else ""))
    weights = manifest.weights
    option = {
        "imagenet": f"--weights {weights.get('name')}", "pretrained": "--weights pretrained",
        "random": f"--weights random --seed {weights.get('seed')}",
    }.get(weights["source"], f"--weights {weights.get('file')}")
    return (f"make it again: {command('export')} --model {manifest.model} {option} "
            f"--image-size {manifest.input['size']} --force")
