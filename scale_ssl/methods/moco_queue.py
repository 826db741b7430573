"""``MoCoQueue``: MoCo's dictionary of negative keys, one global FIFO identical on every rank.

He et al., arXiv:1911.05722, sec. 3.2: the queue holds the keys of the last K images; every step
the newest keys are enqueued and the oldest dropped. Distributed, every rank enqueues the keys of
the *global* batch (gathered from all ranks, in rank order), so every rank holds the same queue
and the queue does not depend on the world size: a checkpoint stores it once, and a run resumes
on any number of ranks with the same queue and pointer (docs/ARCHITECTURE.md, contract 4).

The write position wraps modulo K, so a batch whose size does not divide K (a short last batch)
enqueues fine: pl_bolts and the original code asserted ``K % batch == 0`` and crashed there
(facebookresearch/moco PRs #99/#100).

Under gradient accumulation the queue changes once per optimizer step, as it does for one process
on the whole batch: each micro-batch's keys are *held* (``hold``) while every micro-batch of the
step scores its queries against the same queue, and the step enqueues all of them at once, in
micro-batch order (``enqueue_held``). Keys of a step that was skipped (non-finite loss) are
dropped (``drop_held``), so a NaN key never enters the queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MoCoQueue:
    """K normalised keys of size ``dim`` and a write pointer. A plain object, not an ``nn.Module``:
    DDP would otherwise broadcast the whole queue from rank 0 as a buffer on every forward.

    The initial queue is random unit vectors from ``generator`` (or the global RNG); ``MoCoV2``
    broadcasts rank 0's copy at set-up so every rank starts from the same queue."""

    def __init__(self, length: int, dim: int, generator: torch.Generator | None = None):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"MoCoQueue: length (num_negatives) must be a positive int, got {length!r}")
        self.length, self.dim = length, dim
        self.keys = F.normalize(torch.randn(length, dim, generator=generator), dim=1)
        self.ptr = 0
        self._held: list[torch.Tensor] = []

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim), the global batch's keys, over the oldest n entries."""
        n = keys.shape[0]
        if n > self.length:
            raise ValueError(
                f"MoCo: a global batch of {n} keys is larger than the queue (num_negatives={self.length}); "
                "raise model.num_negatives"
            )
        if self.keys.device != keys.device:
            self.keys = self.keys.to(keys.device)
        index = (self.ptr + torch.arange(n, device=keys.device)) % self.length
        self.keys[index] = keys.detach().to(self.keys.dtype)
        self.ptr = (self.ptr + n) % self.length

    @torch.no_grad()
    def hold(self, keys: torch.Tensor) -> None:
        """Keep one micro-batch's global keys (n, dim) until the optimizer step."""
        self._held.append(keys.detach())

    @property
    def held(self) -> int:
        """Keys held for the coming optimizer step."""
        return sum(k.shape[0] for k in self._held)

    def enqueue_held(self) -> None:
        """Enqueue every held micro-batch's keys, in the order they were held (the step's global batch)."""
        if self._held:
            keys = torch.cat(self._held) if len(self._held) > 1 else self._held[0]
            self._held = []
            self.enqueue(keys)

    def drop_held(self) -> None:
        self._held = []

    def state_dict(self) -> dict:
        return {"keys": self.keys.detach().cpu().clone(), "ptr": int(self.ptr)}

    def load_state_dict(self, state: dict) -> None:
        keys = state["keys"]
        if tuple(keys.shape) != (self.length, self.dim):
            raise ValueError(
                f"MoCo: the checkpoint's queue has shape {tuple(keys.shape)}, but this model expects "
                f"(num_negatives, emb_dim) = ({self.length}, {self.dim}); resume with the run's num_negatives and emb_dim"
            )
        self.keys = keys.to(self.keys.device, self.keys.dtype).clone()
        self.ptr = int(state["ptr"]) % self.length
