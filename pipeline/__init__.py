"""Transfer learning for image classification: ONNX backbone embeddings, an HDF5 cache, scikit-learn heads."""

__version__ = "0.1.0"
