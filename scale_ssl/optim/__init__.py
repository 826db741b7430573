"""Optimizers, parameter grouping and learning-rate schedules for large-batch pretraining."""

from scale_ssl.optim.lars import LARS
from scale_ssl.optim.param_groups import exclude_bn_bias_groups
from scale_ssl.optim.recipe import OptimRecipe, RecipeError, effective_lr
from scale_ssl.optim.warmup_cosine import WarmupCosineFactor, WarmupCosineSchedule, warmup_cosine_lambda

__all__ = ["LARS", "OptimRecipe", "RecipeError", "effective_lr", "WarmupCosineFactor", "WarmupCosineSchedule", "exclude_bn_bias_groups", "warmup_cosine_lambda"]
