"""Evaluation of learned representations without training a classifier (weighted kNN)."""

from scale_ssl.eval.knn import (
    extract_features,
    knn_accuracy,
    knn_evaluate,
    knn_predict,
    raw_pixel_features,
)

__all__ = ["extract_features", "knn_accuracy", "knn_evaluate", "knn_predict", "raw_pixel_features"]
