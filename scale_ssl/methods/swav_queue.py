"""``SwAVQueue``: the global queue of past embeddings that SwAV adds to Sinkhorn at small batches.

Caron et al., arXiv:2006.09882, sec. 4 ("Training with small batches"): with batches much
smaller than the number of prototypes, the codes of the current batch are computed together with
the embeddings of the last ``queue_length`` images, so the equipartition constraint is spread over
enough samples.

One logical queue, sharded: ``queue_length`` counts rows over all ranks; each rank holds
``queue_length / world_size`` rows, its own most recent embeddings, newest first. Sinkhorn sums
over every rank's rows, so the sharded queue acts exactly as one queue of ``queue_length`` rows.

The logical order (what checkpoints store) is by age in global batches: block t holds the global
batch of t steps ago in rank order, i.e. the rows a single process with the same global batch
would hold. Gathering (``logical_state``) interleaves the shards into that order; loading
(``load_logical_state``) slices each block by rank. So a queue saved at world size 2 resumes at
world size 4 (or 1, or with another per-device batch) with the same logical content, and at an
unchanged world size every rank gets back exactly its own rows. The design contract this keeps:
queues are checkpointed, logical, global state (docs/ARCHITECTURE.md, contract 4).
"""

from __future__ import annotations

import torch

from scale_ssl.collectives import Collective


class SwAVQueue:
    """Past embeddings of the crops used for assignment; not an ``nn.Module`` on purpose (its
    shape depends on the world size, so it must not be in the ``state_dict`` or be broadcast by
    DDP as a buffer).

    Args:
        length: ``queue_length``, global rows per assigned crop, > 0.
        num_assign: number of crops whose embeddings are queued (``len(crops_for_assign)``).
        dim: embedding size (``feat_dim``).
    """

    def __init__(self, length: int, num_assign: int, dim: int):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"SwAVQueue: length must be a positive int, got {length!r}")
        self.length, self.num_assign, self.dim = length, num_assign, dim
        self.embeddings: torch.Tensor | None = None  # (num_assign, length / world, dim), newest first
        self.filled = 0  # global rows written so far, capped at length
        self.local_batch = 0
        self.world_size = 0
        self._pending: dict | None = None  # a loaded logical queue waiting for the batch size

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return self.embeddings is not None

    @property
    def is_full(self) -> bool:
        return self.allocated and self.filled >= self.length

    def allocate(self, local_batch: int, collective: Collective, device, dtype=torch.float32) -> None:
        """Create the (empty) shard, or place a loaded logical queue, for this world and batch."""
        world = collective.world_size
        global_batch = local_batch * world
        if self.length % global_batch != 0:
            raise ValueError(
                f"SwAV: queue_length={self.length} is not divisible by the global batch {global_batch} "
                f"({local_batch} per device x {world} ranks); set model.queue_length to a multiple of {global_batch}"
            )
        self.local_batch, self.world_size = local_batch, world
        if self._pending is not None:
            self._place(self._pending, collective, device, dtype)
            self._pending = None
            return
        self.embeddings = torch.zeros(self.num_assign, self.length // world, self.dim, device=device, dtype=dtype)
        self.filled = 0

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """Put this rank's newest (num_assign, b, dim) embeddings in front and drop the oldest b."""
        if not self.allocated:
            raise RuntimeError("SwAVQueue.push before allocate()")
        b = embeddings.shape[1]
        if b != self.local_batch:
            raise ValueError(
                f"SwAVQueue: a batch of {b} rows per device, but the queue was laid out for {self.local_batch}; "
                "the per-device batch must not change while the queue runs"
            )
        self.embeddings = torch.cat([embeddings.detach().to(self.embeddings.dtype), self.embeddings[:, :-b]], dim=1)
        self.filled = min(self.length, self.filled + b * self.world_size)

    # -- checkpoint ---------------------------------------------------------------------------
    @torch.no_grad()
    def logical_state(self, collective: Collective) -> dict:
        """The whole queue in logical order, identical on every rank (a collective: call on all)."""
        if self._pending is not None or not self.allocated:
            return dict(self._pending) if self._pending is not None else {}
        world, b = collective.world_size, self.local_batch
        shard = self.embeddings.transpose(0, 1).contiguous()  # (rows, num_assign, dim): gather along rows
        gathered = collective.all_gather(shard, grad=False)  # (world * rows, num_assign, dim), rank-major
        blocks = self.length // (world * b)
        logical = (
            gathered.view(world, blocks, b, self.num_assign, self.dim)
            .transpose(0, 1)  # (block, rank, row): each block is one global batch in rank order
            .reshape(self.length, self.num_assign, self.dim)
            .transpose(0, 1)
        )
        return {"embeddings": logical.float().cpu().contiguous(), "filled": int(self.filled), "length": self.length}

    def load_logical_state(self, state: dict) -> None:
        """Keep a logical queue from a checkpoint; it is sharded at the next ``allocate`` (the first
        training step), when this run's per-device batch is known."""
        if not state:
            self._pending, self.embeddings = None, None
            return
        embeddings = state["embeddings"]
        if tuple(embeddings.shape) != (self.num_assign, self.length, self.dim):
            raise ValueError(
                f"SwAV: the checkpoint's queue has shape {tuple(embeddings.shape)}, but this model expects "
                f"(len(crops_for_assign), queue_length, feat_dim) = ({self.num_assign}, {self.length}, {self.dim}); "
                "resume with the queue settings of the run that wrote the checkpoint"
            )
        self._pending = {"embeddings": embeddings, "filled": int(state["filled"]), "length": self.length}
        self.embeddings = None

    def _place(self, state: dict, collective: Collective, device, dtype) -> None:
        world, rank, b = collective.world_size, collective.rank, self.local_batch
        global_batch = world * b
        logical = state["embeddings"].to(device=device, dtype=dtype)
        blocks = logical.view(self.num_assign, self.length // global_batch, global_batch, self.dim)
        self.embeddings = blocks[:, :, rank * b : (rank + 1) * b].reshape(self.num_assign, -1, self.dim).contiguous()
        self.filled = int(state["filled"])
