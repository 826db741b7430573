"""The optimizer + per-step warmup-cosine schedule every seed method trains with.

One place for what SimCLR, SwAV, BYOL, SimSiam, MoCo v2, DINO, AMDIM and CPC v2 share (their
``configure_optimizers`` is a call of :func:`warmup_cosine_optimizer`): parameter groups (optionally
biases and norm weights without weight decay or LARS adaptation), LARS / SGD / Adam / AdamW, and a
``WarmupCosineSchedule`` stepped per optimizer step over the trainer's total step count.
"""

from __future__ import annotations

import math

import torch

from scale_ssl.optim.lars import LARS
from scale_ssl.optim.param_groups import exclude_bn_bias_groups
from scale_ssl.optim.warmup_cosine import WarmupCosineSchedule

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")


def check_optimizer_name(owner: str, name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"{owner}: optimizer={name!r} is not supported; use one of {OPTIMIZERS}")


def check_non_negative(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")


def warmup_cosine_optimizer(
    module,
    named_params,
    *,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    momentum: float = 0.9,
    exclude_bn_bias: bool = False,
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
    start_lr: float = 0.0,
    final_lr: float = 0.0,
) -> dict:
    """Return ``configure_optimizers``' dict for ``module`` (which must be attached to a Trainer:
    the schedule spans ``trainer.estimated_stepping_batches`` and warmup epochs are converted with
    ``trainer.steps_per_epoch``)."""
    named_params = [(n, p) for n, p in named_params if p.requires_grad]
    if exclude_bn_bias:
        params = exclude_bn_bias_groups(named_params, weight_decay)
    else:
        params = [{"params": [p for _, p in named_params], "weight_decay": weight_decay}]
    if optimizer == "lars":
        opt = LARS(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)

    total = module.trainer.estimated_stepping_batches
    warmup = warmup_steps
    if warmup is None:
        per_epoch = module.trainer.steps_per_epoch or 0
        warmup = int(math.floor(warmup_epochs * per_epoch))
    warmup = min(warmup, total)
    scheduler = WarmupCosineSchedule(opt, warmup, total, start_lr=start_lr, final_lr=final_lr)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
