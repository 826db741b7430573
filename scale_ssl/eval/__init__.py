"""Evaluation of learned representations: weighted kNN (bank sharded over ranks), the kNN and
online-classifier callbacks for pretraining, linear probe and fine-tuning through the Trainer,
encoder export for torchvision, and plots."""

from scale_ssl.eval.knn import (
    extract_features,
    knn_accuracy,
    knn_evaluate,
    knn_predict,
    raw_pixel_features,
)
from scale_ssl.eval.sharded_knn import gather_rank_rows, sharded_knn_accuracy, sharded_knn_predict
from scale_ssl.probes.eval_split import EvalSplit
from scale_ssl.eval.knn_callback import KNNEvaluatorCallback, knn_accuracy_on_splits
from scale_ssl.probes.online_evaluator import SSLOnlineEvaluator
from scale_ssl.eval.classifier import EncoderClassifier
from scale_ssl.eval.linear_probe import linear_probe
from scale_ssl.eval.finetune import finetune
from scale_ssl.eval.export import export_encoder, export_encoder_state, torchvision_resnet

__all__ = [
    "extract_features",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "raw_pixel_features",
    "gather_rank_rows",
    "sharded_knn_accuracy",
    "sharded_knn_predict",
    "EvalSplit",
    "KNNEvaluatorCallback",
    "knn_accuracy_on_splits",
    "SSLOnlineEvaluator",
    "EncoderClassifier",
    "linear_probe",
    "finetune",
    "export_encoder",
    "export_encoder_state",
    "torchvision_resnet",
]
