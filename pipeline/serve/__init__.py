"""Serve: fitted classifiers put to use: classify a folder, deploy one ONNX file, ImageEmbedder for scikit-learn."""

from pipeline.serve.classify import ClassifyOptions, run_classify

__all__ = ["ClassifyOptions", "run_classify"]
