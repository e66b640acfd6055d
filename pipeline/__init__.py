"""Transfer learning for image classification: ONNX backbone embeddings, an HDF5 cache, scikit-learn heads."""

__version__ = "0.1.0"

__all__ = ["EmbeddingStore", "ImageEmbedder", "__version__"]
_PUBLIC = {"EmbeddingStore": "pipeline.store", "ImageEmbedder": "pipeline.serve.embedder"}


def __getattr__(name: str):
    """The public Python API, imported on first use so that ``python -m pipeline.<stage>`` stays light."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
