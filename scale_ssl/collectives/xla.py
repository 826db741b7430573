"""``Collective`` over torch_xla PJRT replicas (TPU cores; XLA CPU devices in tests).

Two rules shape everything here:

* **One graph for every replica.** XLA compiles the traced step once per replica and the
  replicas' collectives only meet if every replica runs the same program. Anything that depends on
  the replica (its ordinal, a label offset, "am I the broadcast source") therefore enters the graph
  as *data* -- a device tensor holding the value -- never as a Python number baked into the trace.
  For the same reason gathers use ``pin_layout=False`` (the pinned-layout gather is built from a
  rank-dependent padding and so differs per replica).
* **Our own gather backward.** torch_xla's differentiable all_gather only slices the incoming
  gradient (pytorch/xla#5784). Every replica's loss reads every replica's rows, so the gradient
  of the summed objective with respect to this replica's rows is the *sum over replicas* of the
  incoming gradients, restricted to those rows: exactly one reduce-scatter.

torch_xla is imported lazily, so ``scale_ssl`` imports (and runs its non-XLA parts) without it.
"""

from __future__ import annotations

import torch

from scale_ssl.collectives.base import Collective, ReduceOp, check_reduce_op


def _xm():
    import torch_xla.core.xla_model as xm

    return xm


def _as_device_data(value: int, device: torch.device) -> torch.Tensor:
    """A ``torch.long`` scalar on ``device`` that the graph reads as *data* whatever its value.

    Transferred as a one-element vector and reshaped on the device: torch_xla turns a 0-dim tensor
    holding 0 or 1 ("special scalars") into a compile-time constant, so replica 0's offset 0
    would be baked into its graph while replica 1's was data -- two programs, and the
    collectives between them never meet.
    """
    return torch.tensor([value], dtype=torch.long).to(device).reshape(())


class _XlaAllGatherWithGrad(torch.autograd.Function):
    """y = cat(x_0, ..., x_{N-1});  dL/dx_r = reduce_scatter_sum(dL_k/dy)[r] = (sum_k dL_k/dy)[rows of r]."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int):
        ctx.world_size = world_size
        return _xm().all_gather(tensor, dim=0, pin_layout=False)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        xm = _xm()
        grad = xm.reduce_scatter(
            xm.REDUCE_SUM, grad_output.contiguous(), scale=1.0, scatter_dim=0,
            shard_count=ctx.world_size, pin_layout=False,
        )
        return grad, None


class XlaCollective(Collective):
    """Collective over all PJRT replicas of the job (``torch_xla.runtime`` world and ordinal).

    Build it inside the replica (a process per chip on TPU, a thread per device on XLA:CPU): the
    world size and ordinal are read from the runtime at construction.
    """

    def __init__(self) -> None:
        import torch_xla
        import torch_xla.runtime as xr

        self._world_size = xr.world_size()
        self._rank = xr.global_ordinal()
        self.device = torch_xla.device()
        self._ordinal_tensor: torch.Tensor | None = None
        self._offsets: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def ordinal_tensor(self) -> torch.Tensor:
        """This replica's ordinal as device data (a ``torch.long`` scalar): the same graph node,
        an input parameter, on every replica; only its value differs."""
        if self._ordinal_tensor is None:
            self._ordinal_tensor = _as_device_data(self._rank, self.device)
        return self._ordinal_tensor

    def rank_offset(self, rows_per_rank: int, device: torch.device | None = None) -> torch.Tensor:
        # Cached per (rows, device): the host-to-device transfer happens once, not every step, and
        # the offset stays a device-data input of the graph rather than a baked-in constant.
        device = torch.device(device) if device is not None else self.device
        key = (rows_per_rank, str(device))
        if key not in self._offsets:
            self._offsets[key] = _as_device_data(self._rank * rows_per_rank, device)
        return self._offsets[key]

    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        if self._world_size == 1:
            return tensor if grad else tensor.detach()
        if grad and tensor.requires_grad:
            return _XlaAllGatherWithGrad.apply(tensor, self._world_size)
        with torch.no_grad():
            return _xm().all_gather(tensor.detach(), dim=0, pin_layout=False)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        check_reduce_op(op)
        if self._world_size == 1:
            return tensor.detach().clone()
        xm = _xm()
        kind = {"sum": xm.REDUCE_SUM, "mean": xm.REDUCE_SUM, "max": xm.REDUCE_MAX, "min": xm.REDUCE_MIN}[op]
        scale = 1.0 / self._world_size if op == "mean" else 1.0
        return xm.all_reduce(kind, tensor.detach(), scale=scale, pin_layout=False)

    def all_reduce_many(self, tensors: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        """Sum a list of tensors over replicas in place (one coalesced all-reduce), times ``scale``."""
        if self._world_size > 1 and tensors:
            _xm().all_reduce(_xm().REDUCE_SUM, tensors, scale=scale, pin_layout=False)
        return tensors

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not 0 <= src < self._world_size:
            raise ValueError(f"broadcast: src={src} is not a replica ordinal in [0, {self._world_size})")
        if self._world_size == 1:
            return tensor
        # A host tensor (set-up state a method builds before the trainer moves the module, such as
        # MoCo's initial queue) is moved to this replica's device first: XLA collectives run there,
        # and the result stays there.
        return self.broadcast_many([tensor.detach().to(self.device, copy=True)], src)[0]

    def broadcast_many(self, tensors: list[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
        """Overwrite ``tensors`` in place with replica ``src``'s values (one coalesced all-reduce).

        Every replica but ``src`` contributes zeros and the sum is taken; "am I ``src``" is a
        comparison of the ordinal tensor, so the graph is the same on every replica (torch_xla's
        ``collective_broadcast`` bakes the ordinal into the trace instead). ``torch.where``, not a
        multiplication by 0/1, so non-finite values on other replicas cannot leak in as NaN.
        """
        if self._world_size == 1 or not tensors:
            return tensors
        is_src = self.ordinal_tensor() == src
        with torch.no_grad():
            for t in tensors:
                t.copy_(torch.where(is_src, t, torch.zeros_like(t)))
        return self.all_reduce_many(tensors)

    def barrier(self) -> None:
        """Every replica waits until all have arrived: a one-element all-reduce, executed and read
        back. (``xm.rendezvous`` would do on TPU but hangs with XLA:CPU device threads.)"""
        if self._world_size == 1:
            return
        import torch_xla

        token = self.all_reduce(torch.ones((), device=self.device))
        torch_xla.sync()
        token.cpu()
