"""Models: a name (``resnet50``, ``timm/<name>[.<tag>]``, ``torchvision/<name>``) resolved once into an exported,
verified ONNX backbone that every later stage receives; exporting, precision variants and onnxruntime sessions."""

from pipeline.models.manifest import DeployedManifest, ModelManifest
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.registry import (
    CURATED,
    DEFAULT_BACKBONES,
    PRECISIONS,
    ModelName,
    feature_set_name,
    parse_model_name,
)
from pipeline.models.repository import ExportResult, ModelRepository, open_deployed
from pipeline.models.session import BackboneSession, ExportedModel

__all__ = [
    "CURATED", "DEFAULT_BACKBONES", "PRECISIONS", "BackboneSession", "DeployedManifest", "ExportResult",
    "ExportedModel", "ModelManifest", "ModelName", "ModelRepository", "Preprocessing", "feature_set_name",
    "open_deployed", "parse_model_name",
]
