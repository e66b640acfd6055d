"""Fit: split the stored embeddings, fit and score the classifiers against the pixel baseline, find leaks and label
errors, and save each classifier as a bundle."""

from pipeline.fit.run import FitOptions, PageOptions, run_fit

__all__ = ["FitOptions", "PageOptions", "run_fit"]
