"""The one interface through which losses and methods talk to the other ranks.

Losses never import ``torch.distributed`` or ``torch_xla``: they receive a ``Collective`` and the
same code then runs on one process, under DDP, DeepSpeed, XLA, and inside DP's
``training_step_end``.

Conventions every implementation keeps:

* ``all_gather(t)`` concatenates the ranks' tensors along dim 0 in rank order; all ranks must
  pass tensors of the same shape.
* ``all_gather(t, grad=True)`` is differentiable. Every rank's loss depends on every rank's
  tensor, so the gradient of the summed objective with respect to this rank's slice is the sum,
  over ranks, of the incoming gradient's rows for that slice. The backward therefore sums the
  incoming gradient over ranks and returns this rank's slice (a reduce-scatter). Together with
  the strategy's gradient *averaging*, this makes the gradient on N ranks equal to the gradient
  of the mean local loss, i.e. of one process on the concatenated batch.
* ``all_reduce(t, op)`` returns a new tensor and is not differentiable; use it for statistics
  (Sinkhorn marginals, metrics), not for anything a gradient must flow through.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

ReduceOp = Literal["sum", "mean", "max", "min"]
REDUCE_OPS = ("sum", "mean", "max", "min")


def check_reduce_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce: op={op!r} is not supported; use one of {REDUCE_OPS}")


class Collective(ABC):
    """World-aware communication with autograd where a loss needs it."""

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank along dim 0 (rank order)."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks; returns a new tensor, no gradient."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Return rank ``src``'s ``tensor`` on every rank."""

    @abstractmethod
    def barrier(self) -> None: ...

    def rank_offset(self, rows_per_rank: int, device: torch.device | None = None) -> torch.Tensor:
        """``rank * rows_per_rank`` as a tensor: the first global row index of this rank's slice.

        Returned as data rather than a Python int so that traced backends (XLA) compile one graph
        for every replica instead of baking the rank into each replica's graph.
        """
        return torch.tensor(self.rank * rows_per_rank, device=device, dtype=torch.long)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class LocalCollective(Collective):
    """World of one: every collective is the identity. Used by the ``single`` strategy."""

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        return tensor if grad else tensor.detach()

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        check_reduce_op(op)
        return tensor.detach().clone()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if src != 0:
            raise ValueError(f"broadcast: src={src} but the world has a single rank 0")
        return tensor

    def barrier(self) -> None:
        return None
