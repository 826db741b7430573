"""Exponential moving average of weights: MoCo's momentum encoder and BYOL's target network.

    theta_target <- tau * theta_target + (1 - tau) * theta_online          (every optimizer step)

MoCo (He et al. 2020, arXiv:1911.05722) keeps tau fixed (0.999). BYOL (Grill et al. 2020,
arXiv:2006.07733, sec. 3.2) raises it from tau_0 to 1 over training with a cosine:

    tau_k = 1 - (1 - tau_0) * (cos(pi * k / K) + 1) / 2,     k = optimizer step index, K = total steps

Only parameters move; the target's BatchNorm statistics follow its own forward passes, as in
both papers' code. Methods call this from ``on_train_batch_end``, which the trainer runs after the
optimizer step on every rank, so the targets stay identical across ranks under any strategy.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from scale_ssl.models.vit import disable_drop_path


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters take no gradient (the EMA target). Stochastic depth is off in
    the copy: a target/teacher runs its whole network (DINO builds its teacher without drop path)."""
    target = disable_drop_path(copy.deepcopy(module))
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta_target + (1 - tau) * theta_online, parameter by parameter."""
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("ema_update_: target and online networks must have the same parameters")
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - tau)


def cosine_tau(step: int, total_steps: int, initial_tau: float) -> float:
    """BYOL's schedule: tau_0 at step 0, rising to 1 at ``total_steps`` (and 1 after)."""
    if total_steps <= 0:
        return initial_tau
    progress = min(step, total_steps) / total_steps
    return 1.0 - (1.0 - initial_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
