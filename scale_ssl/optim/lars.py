"""LARS: SGD with momentum and a layer-wise trust ratio, for very large batches.

You, Gitman, Ginsburg. "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888),
in the form SimCLR (arXiv:2002.05709) and BYOL (arXiv:2006.07733) train with at batch 4096.

For every parameter tensor p with gradient g, in a group with learning rate lr, momentum m,
weight decay wd and trust coefficient eta:

    g     <- g + wd * p                                  (skipped when wd == 0)
    trust  = eta * ||p|| / ||g||   if p is adapted and ||p|| > 0 and ||g|| > 0,   else 1
    u      = trust * g
    buf   <- m * buf + u                                 (buf starts at 0)
    p     <- p - lr * buf                                (nesterov: p <- p - lr * (u + m * buf))

The trust ratio gives every layer a step proportional to its own weight norm, so no layer's
update dominates when lr is scaled up with the batch. Biases and normalisation weights are
usually *excluded*: they get neither the trust ratio nor weight decay, i.e. plain SGD with
momentum. Exclude them either with parameter groups carrying ``lars_adaptation=False`` and
``weight_decay=0.0`` (``scale_ssl.optim.exclude_bn_bias_groups`` builds these), or with
``exclude_from_adaptation=callable(param) -> bool``, which removes a parameter from both.

Sharded (DeepSpeed ZeRO): there the optimizer steps flat fp32 partitions, each holding pieces of
several parameters, and a parameter may straddle two ranks' partitions. Told the layout of each
partition (``use_flat_shards``; the DeepSpeed strategy does it), LARS sums the squared norms of
p and of g + wd * p per *original* parameter over its pieces, all-reduces those sums over the
ranks, and scales each piece by its parameter's trust ratio: the same update as one process with
unsharded parameters (up to float summation order), not one trust ratio per partition.

Sharded (FSDP2): there every parameter is a ``DTensor`` whose rank-local shard is a slice of
its rows. Told how to sum over the ranks (``use_sharded_tensors``; the FSDP strategy does it),
LARS sums the squared norms of every local shard of a parameter group, all-reduces them once
per group, and scales each shard by its parameter's trust ratio: the same full-layer norms as
above, and the momentum buffer stays a ``DTensor`` sharded like its parameter (so sharded
checkpoints re-shard it on load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


@dataclass(frozen=True)
class FlatShardLayout:
    """How one flat tensor that LARS steps is cut into pieces of original parameters.

    ``params`` lists the original parameters of the flat tensor's group, in an order every rank
    shares (norms are all-reduced by index); ``pieces`` holds ``(index in params, start in the flat
    tensor, length)`` for each piece this rank holds. Elements outside every piece are padding."""

    params: tuple
    pieces: tuple


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling on top of SGD with momentum (see the module docstring).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer. A group may
            override ``lr``, ``momentum``, ``weight_decay``, ``eta``, ``nesterov`` and
            ``lars_adaptation`` (bool, default True).
        lr: base learning rate (SimCLR: 0.3 x batch / 256, under a warmup-cosine schedule).
        momentum: momentum factor in [0, 1).
        weight_decay: L2 coefficient added to the gradient before the trust ratio (SimCLR: 1e-6).
        eta: trust coefficient, > 0 (SimCLR and BYOL: 0.001).
        nesterov: use Nesterov momentum; needs momentum > 0.
        exclude_from_adaptation: optional ``callable(param) -> bool``; a parameter for which it
            returns True gets neither the trust ratio nor weight decay, whatever its group says.
            It is not saved in ``state_dict()``: pass the same callable when you rebuild the
            optimizer to resume.

    Weight decay and adaptation are separate group settings: a group with
    ``lars_adaptation=False`` but ``weight_decay > 0`` gets decayed plain SGD. That is why the
    exclusion groups set ``weight_decay=0.0`` explicitly.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        exclude_from_adaptation: Callable[[torch.Tensor], bool] | None = None,
    ):
        if exclude_from_adaptation is not None and not callable(exclude_from_adaptation):
            raise TypeError(
                "LARS: exclude_from_adaptation must be None or a callable(param) -> bool, got "
                f"{type(exclude_from_adaptation).__name__}; to exclude by name, build parameter groups "
                "with scale_ssl.optim.exclude_bn_bias_groups instead"
            )
        # Set before super().__init__, which calls add_param_group (and so our validation).
        self.exclude_from_adaptation = exclude_from_adaptation
        self._flat_layouts: dict[int, FlatShardLayout] | None = None
        self._all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._tensor_shards_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov, lars_adaptation=True
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1], index=len(self.param_groups) - 1)

    def use_flat_shards(self, layouts: dict[int, FlatShardLayout],
                        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Step flat (ZeRO) partitions: ``layouts`` maps ``id(flat tensor)`` to its layout;
        ``all_reduce_sum`` sums a tensor over the ranks holding the other partitions (None when
        every rank holds whole flat copies). From now on every tensor stepped must have a layout."""
        self._flat_layouts = dict(layouts)
        self._all_reduce_sum = all_reduce_sum

    def use_sharded_tensors(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Step ``DTensor`` parameters sharded over ranks (FSDP2): trust ratios from the norms of
        whole parameters, the squared norms of local shards summed by ``all_reduce_sum``."""
        self._tensor_shards_sum = all_reduce_sum

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_tensor_shards_sum", None)
        self.__dict__.setdefault("exclude_from_adaptation", None)
        self.__dict__.setdefault("_flat_layouts", None)
        self.__dict__.setdefault("_all_reduce_sum", None)
        for group in self.param_groups:
            group.setdefault("lars_adaptation", True)
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Take one LARS step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            if self._tensor_shards_sum is not None:
                self._step_sharded_tensors(group)
                continue
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS: sparse gradients are not supported; use dense embeddings")
                if self._flat_layouts is not None:
                    update = self._sharded_update(p, group)
                else:
                    update = self._update(p, group)

                if momentum != 0:
                    state = self.state[p]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = update.clone()
                    else:
                        buffer.mul_(momentum).add_(update)
                    update = update.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.add_(update, alpha=-lr)
        return loss

    def _step_sharded_tensors(self, group: dict) -> None:
        """One group's step on DTensor shards (see the module docstring): one all-reduce of the
        [2, parameters] squared norms, then the update of each local shard."""
        lr, momentum, weight_decay, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LARS: sparse gradients are not supported; use dense embeddings")
        local = [_local(p) for p in params]
        excluded = [self._excluded(p) for p in params]
        updates = [(_local(p.grad).add(w, alpha=weight_decay) if weight_decay != 0 and not ex else _local(p.grad).clone())
                   for p, w, ex in zip(params, local, excluded)]
        if group["lars_adaptation"]:
            squares = torch.stack([torch.stack([w.float().square().sum(), u.float().square().sum()])
                                   for w, u in zip(local, updates)], dim=1)
            sharded = torch.tensor([_is_sharded(p) for p in params], device=squares.device)
            # Whole (unsharded) parameters are the same on every rank: counted once, not world times.
            summed = self._tensor_shards_sum(torch.where(sharded, squares, torch.zeros_like(squares)))
            param_norm, update_norm = torch.where(sharded, summed, squares).sqrt()
            trust = torch.where((param_norm > 0) & (update_norm > 0), eta * param_norm / update_norm,
                                torch.ones_like(param_norm))
            trust[torch.tensor(excluded, device=trust.device, dtype=torch.bool)] = 1.0
            for i, update in enumerate(updates):
                update.mul_(trust[i].to(update.dtype))
        for p, w, update in zip(params, local, updates):
            if momentum != 0:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(p)  # sharded like p
                    _local(buffer).copy_(update)
                else:
                    _local(buffer).mul_(momentum).add_(update)
                update = update.add(_local(buffer), alpha=momentum) if group["nesterov"] else _local(buffer)
            w.add_(update, alpha=-lr)

    def _excluded(self, p) -> bool:
        return self.exclude_from_adaptation is not None and bool(self.exclude_from_adaptation(p))

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """trust * (g + wd * p) for one whole parameter."""
        weight_decay, eta = group["weight_decay"], group["eta"]
        excluded = self._excluded(p)
        adapt = group["lars_adaptation"] and not excluded
        update = p.grad
        if weight_decay != 0 and not excluded:
            update = update.add(p, alpha=weight_decay)
        if adapt:
            param_norm = torch.linalg.vector_norm(p)
            update_norm = torch.linalg.vector_norm(update)
            # torch.where instead of a Python `if` keeps the step free of device-to-host
            # syncs; a zero norm (fresh zero-init layer, no gradient) means "no scaling".
            trust = torch.where(
                (param_norm > 0) & (update_norm > 0),
                eta * param_norm / update_norm,
                torch.ones_like(param_norm),
            )
            update = update.mul(trust)
        return update

    def _sharded_update(self, flat: torch.Tensor, group: dict) -> torch.Tensor:
        """trust * (g + wd * p) on a flat partition: per original parameter, over its pieces."""
        layout = self._flat_layouts.get(id(flat))
        if layout is None:
            raise RuntimeError(
                f"LARS: told that it steps flattened ZeRO partitions, but got a tensor of shape {tuple(flat.shape)} "
                "with no layout; the engine re-created its partitions (rebuild the layouts after loading a checkpoint)"
            )
        weight_decay, eta = group["weight_decay"], group["eta"]
        excluded = [self._excluded(param) for param in layout.params]
        update = flat.grad.clone()
        if weight_decay != 0:
            for owner, start, length in layout.pieces:
                if not excluded[owner]:
                    update.narrow(0, start, length).add_(flat.narrow(0, start, length), alpha=weight_decay)
        if not group["lars_adaptation"] or not layout.params:
            return update
        # Squared norms of p and of the update, per original parameter, summed over every rank.
        sums = flat.new_zeros(2, len(layout.params), dtype=torch.float32)
        if layout.pieces:
            owners = torch.tensor([owner for owner, _, _ in layout.pieces], device=flat.device)
            pieces = [(flat.narrow(0, s, n), update.narrow(0, s, n)) for _, s, n in layout.pieces]
            squares = torch.stack([torch.stack([w.float().square().sum(), u.float().square().sum()]) for w, u in pieces], dim=1)
            sums.index_add_(1, owners, squares)
        if self._all_reduce_sum is not None:
            sums = self._all_reduce_sum(sums)
        param_norm, update_norm = sums.sqrt()
        trust = torch.where((param_norm > 0) & (update_norm > 0), eta * param_norm / update_norm,
                            torch.ones_like(param_norm))
        trust[torch.tensor(excluded, device=trust.device, dtype=torch.bool)] = 1.0
        for owner, start, length in layout.pieces:
            update.narrow(0, start, length).mul_(trust[owner].to(update.dtype))
        return update


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's rank-local shard (shares its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_sharded(t: torch.Tensor) -> bool:
    return any(placement.is_shard() for placement in getattr(t, "placements", ()))


def _validate_group(group: dict, index: int) -> None:
    where = "LARS" if index == 0 else f"LARS param group {index}"

    def number(name: str) -> float:
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {group[name]!r}")
        return value

    if number("lr") < 0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']!r}")
    if not 0 <= number("momentum") < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {group['momentum']!r}")
    if number("weight_decay") < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']!r}")
    if number("eta") <= 0:
        raise ValueError(
            f"{where}: eta must be > 0 (SimCLR uses 0.001), got {group['eta']!r}; to turn the trust "
            "ratio off for a group set lars_adaptation=False instead"
        )
    for name in ("nesterov", "lars_adaptation"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{where}: {name} must be True or False, got {group[name]!r}")
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError(f"{where}: nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False")
