"""``Collective`` over a ``torch.distributed`` process group (gloo on CPU, nccl on GPU).

The differentiable gather is written here rather than taken from ``torch.distributed.nn``:
that one returned wrong gradients for non-contiguous inputs (pytorch#120386), and the peers who
wrote their own shipped backwards that did not sum over ranks (lightly #1528, VISSL #123).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scale_ssl.collectives.base import Collective, ReduceOp, check_reduce_op

_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


def _gather_rows(tensor: torch.Tensor, group, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """y = cat(x_0, ..., x_{N-1});  dL/dx_r = (sum over ranks of dL_k/dy)[rows of r]."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, world_size: int, rank: int):
        ctx.group, ctx.world_size, ctx.rank = group, world_size, rank
        ctx.rows = tensor.shape[0]
        return _gather_rows(tensor.contiguous(), group, world_size)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Each rank's loss saw every rank's rows; summing the incoming gradients over ranks gives
        # the gradient of the summed objective, of which this rank owns its own rows.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None, None


class TorchDistributedCollective(Collective):
    """Collective for an initialised ``torch.distributed`` process group."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributedCollective needs an initialised process group: call "
                "torch.distributed.init_process_group(...) first (the ddp strategy does this)"
            )
        self.group = group
        self._world_size = dist.get_world_size(group)
        self._rank = dist.get_rank(group)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        if grad and tensor.requires_grad:
            return _AllGatherWithGrad.apply(tensor, self.group, self._world_size, self._rank)
        with torch.no_grad():
            return _gather_rows(tensor.detach().contiguous(), self.group, self._world_size)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        check_reduce_op(op)
        out = tensor.detach().clone().contiguous()
        dist.all_reduce(out, op=_TORCH_OPS["sum" if op == "mean" else op], group=self.group)
        if op == "mean":
            out = out / self._world_size
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = tensor.detach().clone().contiguous()
        dist.broadcast(out, src=src, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
