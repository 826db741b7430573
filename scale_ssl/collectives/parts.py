"""``PartsCollective``: the parts of one ``strategy=dp`` step, run concurrently in one process, as
the ranks of a world — so ``GlobalBatchNorm`` can normalise every part with the statistics of the
whole batch, as one device would.

Under dp the batch is split into ``parts`` pieces and ``training_step`` runs once per piece, each
in its own thread (on CPU: over the one module; on GPUs: over ``replicate``'s replicas, which share
this object). Inside a part, ``rank`` is the part's index and ``world_size`` is ``parts``; anywhere
else (the main thread, ``training_step_end``, evaluation) the world has one rank, so a layer called
outside the parts never waits for peers that will not come.

    all_gather(t): every part puts its tensor in a slot, waits for the others (a barrier), and
                   returns the concatenation in part order; a second barrier keeps a fast part
                   from overwriting its slot before everyone has read it.

No custom backward is needed: the parts share one autograd graph (one process, one loss), so the
concatenation's own backward already hands each part the gradient that flows into its rows from
every part. ``replicas_share_buffers`` tells layers that the parts update one set of buffers (the
module itself on CPU, device 0's replica on GPUs): running statistics are updated by part 0 only.
"""

from __future__ import annotations

import threading

import torch

from scale_ssl.collectives.base import Collective, ReduceOp, check_reduce_op


class PartsCollective(Collective):
    replicas_share_buffers = True

    def __init__(self, parts: int, timeout_s: float = 600.0):
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"PartsCollective: parts must be an int >= 1, got {parts!r}")
        self.parts = parts
        self._barrier = threading.Barrier(parts, timeout=timeout_s)
        self._slots: list[torch.Tensor | None] = [None] * parts
        self._local = threading.local()

    # -- the part this thread runs ----------------------------------------------------------
    def enter_part(self, index: int) -> None:
        """Called by the strategy at the start of part ``index``'s thread."""
        self._local.index = index

    def leave_part(self) -> None:
        self._local.index = None

    def abort(self) -> None:
        """A part failed: release the others from the barrier (they raise) instead of hanging."""
        self._barrier.abort()

    def reset(self) -> None:
        """Before a new set of parts runs (after a failed one, the barrier is broken)."""
        self._barrier.reset()
        self._slots = [None] * self.parts

    @property
    def _index(self) -> int | None:
        return getattr(self._local, "index", None)

    # -- Collective ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.parts if self._index is not None else 1

    @property
    def rank(self) -> int:
        index = self._index
        return 0 if index is None else index

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        index = self._index
        if index is None:
            return [tensor]
        self._slots[index] = tensor
        self._barrier.wait()
        everyone = [t if t.device == tensor.device else t.to(tensor.device) for t in self._slots]
        self._barrier.wait()
        return everyone

    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        out = torch.cat(self._exchange(tensor), dim=0)
        return out if grad else out.detach()

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        check_reduce_op(op)
        stacked = torch.stack([t.detach() for t in self._exchange(tensor)])
        if op == "sum":
            return stacked.sum(dim=0)
        if op == "mean":
            return stacked.mean(dim=0)
        return stacked.amax(dim=0) if op == "max" else stacked.amin(dim=0)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._exchange(tensor)[src].clone()

    def barrier(self) -> None:
        if self._index is not None:
            self._barrier.wait()
