"""Transfer learning for image classification: ONNX backbone embeddings, an HDF5 cache, scikit-learn heads."""

__version__ = "0.1.0"

from pipeline.store import EmbeddingStore  # noqa: E402  (the public Python API for stored embeddings)

__all__ = ["EmbeddingStore", "__version__"]
