"""Exponential moving average of weights: MoCo's momentum encoder and BYOL's target network.

    theta_target <- tau * theta_target + (1 - tau) * theta_online          (every optimizer step)

MoCo (He et al. 2020, arXiv:1911.05722) keeps tau fixed (0.999). BYOL (Grill et al. 2020,
arXiv:2006.07733, sec. 3.2) raises it from tau_0 to 1 over training with a cosine:

    tau_k = 1 - (1 - tau_0) * (cos(pi * k / K) + 1) / 2,     k = optimizer step index, K = total steps

Only parameters move; the target's BatchNorm statistics follow its own forward passes, as in
both papers' code. Methods call this from ``on_train_batch_end``, which the trainer runs after the
optimizer step on every rank, so the targets stay identical across ranks under any strategy. The
target is kept and updated in fp32 on full values whatever the engine's precision or sharding
: methods list it in ``ema_target_modules()`` and update it with ``ema_step``, which reads the
online network's optimizer (master) weights and the target's fp32 copy through the module.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

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
def ema_update_(target: nn.Module | Sequence[torch.Tensor], online: nn.Module | Sequence[torch.Tensor], tau: float) -> None:
    """theta_target <- tau * theta_target + (1 - tau) * theta_online, in place, tensor by tensor.

    Either argument is a module or its parameter values in ``parameters()`` order. The target
    must be fp32: at tau = 0.999 a bf16 target would round most updates away (bf16 keeps 8
    significant bits; (1 - tau) * difference falls below half an ulp of most entries)."""
    targets = list(target.parameters()) if isinstance(target, nn.Module) else list(target)
    values = [p.detach() for p in online.parameters()] if isinstance(online, nn.Module) else list(online)
    if len(targets) != len(values):
        raise ValueError("ema_update_: target and online networks must have the same parameters")
    low = sorted({str(t.dtype) for t in targets if t.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(
            f"ema_update_: the EMA target holds {', '.join(low)} values; it must stay fp32 whatever the run's "
            "precision (list it in the module's ema_target_modules() so the strategy keeps an fp32 copy)"
        )
    for t, value in zip(targets, values):
        if t.shape != value.shape:
            raise ValueError(
                f"ema_update_: target of shape {tuple(t.shape)} vs online value {tuple(value.shape)}: pass full "
                "(unsharded) values, e.g. module.master_weights(online.parameters())"
            )
    torch._foreach_lerp_(targets, [v.to(t.dtype) for t, v in zip(targets, values)], 1.0 - tau)


@torch.no_grad()
def ema_step(module, target: nn.Module, online: nn.Module, tau: float) -> None:
    """``module``'s EMA update of ``target`` toward ``online``, on the fp32 values the strategy
    keeps: the online network's optimizer (master) weights, the target's fp32 copy (under
    DeepSpeed held beside the engine, which only has a bf16 or sharded working copy); the new
    target is then written back where the forward pass reads it."""
    targets = module.master_weights(target.parameters())
    ema_update_(targets, module.master_weights(online.parameters()), tau)
    module.set_master_weights(target.parameters(), targets)


def cosine_tau(step: int, total_steps: int, initial_tau: float) -> float:
    """BYOL's schedule: tau_0 at step 0, rising to 1 at ``total_steps`` (and 1 after)."""
    if total_steps <= 0:
        return initial_tau
    progress = min(step, total_steps) / total_steps
    return 1.0 - (1.0 - initial_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
