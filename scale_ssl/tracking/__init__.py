"""Experiment tracking: every run is recorded in MLflow (params, metrics, artifacts, plots)."""

from scale_ssl.tracking.flatten import flatten_dict
from scale_ssl.tracking.mlflow_logger import MLflowLogger, NullLogger

__all__ = ["MLflowLogger", "NullLogger", "flatten_dict"]
