"""The loop, the module API, callbacks, precision and checkpoint contents."""

from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from scale_ssl.trainer.data_distribution import UnequalBatchesError
from scale_ssl.trainer.module import SSLModule
from scale_ssl.trainer.trainer import Trainer

__all__ = [
    "Trainer",
    "SSLModule",
    "Callback",
    "EarlyStopping",
    "EMAWeightAveraging",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "StochasticWeightAveraging",
    "UnequalBatchesError",
]
