"""Transfer learning for image classification: ONNX backbone embeddings, an HDF5 cache, scikit-learn heads."""

__version__ = "0.1.0"

# The public Python API: stored embeddings, and a scikit-learn transformer from image paths to embeddings.
from pipeline.embedder import ImageEmbedder  # noqa: E402
from pipeline.store import EmbeddingStore  # noqa: E402

__all__ = ["EmbeddingStore", "ImageEmbedder", "__version__"]
