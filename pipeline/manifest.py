"""The JSON manifest beside each exported ONNX model: what it computes, from which weights, and how to feed it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backbones import Preprocessing
from pipeline.errors import UserError
from pipeline.files import write_json_atomic

MANIFEST_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


@dataclass(frozen=True)
class ModelManifest:
    """Everything known about one exported backbone; written last, so its presence means the export finished.

    Attributes
    ----------
    model : str
        Backbone registry name.
    onnx_file : str
        File name of the ONNX model, beside the manifest.
    onnx_sha256 : str
        sha256 of the ONNX file: the fingerprint that stores and classifiers refer to.
    weights : dict
        Provenance: ``source`` (imagenet, random or file) and, as they apply, ``name``, ``url``, ``file``,
        ``seed`` and ``sha256`` (of the weights file, or of the generated tensors for random weights).
    input : dict
        ``name``, ``layout`` (NHWC), ``dtype`` (uint8), ``size`` (crop), ``resize_size``, ``interpolation``,
        ``mean`` and ``std`` (applied inside the graph).
    output : dict
        ``name``, ``dim`` and the torchvision ``layer`` it is taken from.
    opset : int
        ONNX opset of the default domain.
    versions : dict
        Versions of the libraries that produced the file.
    created : str
        ISO 8601 UTC time of the export.
    verification : dict
        The export's own check against PyTorch: ``images``, ``min_cosine``, ``max_relative_error``.
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
    verification: dict[str, float] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    @property
    def weights_id(self) -> str:
        """A short identity of the weights: ``imagenet:IMAGENET1K_V1``, ``random:seed=0`` or ``file:<sha256>``."""
        return weights_id(self.weights)

    @property
    def untrained(self) -> bool:
        """True when the embeddings come from random weights and so carry no ImageNet knowledge."""
        return self.weights.get("source") == "random"

    @property
    def preprocessing(self) -> Preprocessing:
        """How to make this model's input crops from an image."""
        spec = self.input
        return Preprocessing(
            spec["resize_size"], spec["size"], tuple(spec["mean"]), tuple(spec["std"]), spec["interpolation"]
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
            return cls(**data)
        except FileNotFoundError:
            raise UserError(f"no model manifest at {path}; export the model first (make models).") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise UserError(f"{path} is not a model manifest ({error}); delete it and export again.") from None


def weights_id(weights: dict[str, Any]) -> str:
    """Return the identity of a weights provenance record (see :attr:`ModelManifest.weights_id`)."""
    source = weights["source"]
    if source == "imagenet":
        return f"imagenet:{weights['name']}"
    if source == "random":
        return f"random:seed={weights['seed']}"
    return f"file:{weights['sha256']}"


def model_paths(out_dir: str | os.PathLike, model: str) -> tuple[Path, Path]:
    """Return ``(onnx_path, manifest_path)`` of ``model`` in ``out_dir``."""
    out = Path(out_dir)
    return out / f"{model}.onnx", out / f"{model}.json"
