"""Serve: fitted classifiers put to use: classify a folder, deploy one ONNX file, ImageEmbedder for scikit-learn."""
