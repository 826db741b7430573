"""Callbacks shipped with the trainer."""

from scale_ssl.trainer.callbacks.early_stopping import EarlyStopping
from scale_ssl.trainer.callbacks.ema import EMAWeightAveraging
from scale_ssl.trainer.callbacks.freeze import FreezeParameters
from scale_ssl.trainer.callbacks.lr_monitor import LearningRateMonitor
from scale_ssl.trainer.callbacks.model_checkpoint import ModelCheckpoint
from scale_ssl.trainer.callbacks.swa import StochasticWeightAveraging

__all__ = ["EarlyStopping", "EMAWeightAveraging", "FreezeParameters", "LearningRateMonitor", "ModelCheckpoint", "StochasticWeightAveraging"]
