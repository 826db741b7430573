"""Gradient clipping by global norm when gradients are sharded over ranks (FSDP2 DTensors).

    total = sqrt( sum over parameters p of ||g_p||^2 )
    g    <- g * min(1, max_norm / (total + 1e-6))                 (torch.nn.utils.clip_grad_norm_)

Each rank holds a shard of every sharded gradient: the squares of its local shards are summed,
one all-reduce (sum) over the ranks completes the sum of squares of the *full* gradients, and
gradients every rank holds whole (parameters outside FSDP) are counted once, not once per rank.
The scale is then the one one process would compute on the unsharded gradients, and applying it
to each shard is exact (a product, element by element). ``clip_by_value`` is element-wise and
needs no communication.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sharded_grad_norm(params: Iterable[torch.Tensor], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients of ``params`` taken whole (a collective: call on every rank)."""
    params = [p for p in params if p.grad is not None]
    device = _local(params[0].grad).device if params else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    whole = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        square = _local(p.grad).float().square().sum().to(device)
        if isinstance(p.grad, DTensor):
            sharded += square
        else:
            whole += square
    return (all_reduce_sum(sharded.reshape(1)).reshape(()) + whole).sqrt()


@torch.no_grad()
def clip_sharded_grad_norm_(params: Iterable[torch.Tensor], max_norm: float,
                            all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global norm is at most ``max_norm``;
    returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    total = sharded_grad_norm(params, all_reduce_sum)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        local = _local(p.grad)
        local.mul_(scale.to(device=local.device, dtype=local.dtype))
    return total


@torch.no_grad()
def clip_sharded_grad_value_(params: Iterable[torch.Tensor], clip_value: float) -> None:
    for p in params:
        if p.grad is not None:
            _local(p.grad).clamp_(min=-clip_value, max=clip_value)
