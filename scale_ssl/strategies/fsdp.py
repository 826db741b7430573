"""FSDP2: PyTorch's fully sharded data parallelism (``torch.distributed.fsdp.fully_shard``).

Every parameter is a ``DTensor`` sharded over the ranks along its first dimension; each FSDP
*unit* (``strategies/fsdp_units.py``: one residual or transformer block, each encoder, then the
method itself) all-gathers its parameters before its forward and frees them after it
(``reshard_after_forward``), and its gradients are reduce-scattered in backward, so each rank
keeps 1/N of the parameters, gradients and optimizer state. Processes come from the same
launchers as ``ddp`` (torchrun, SLURM), whose process-group handling this strategy inherits.

What N ranks must share with one process, and how it is kept here:

* Gradients: reduce-scatter with the mean over ranks (in fp32 under ``bf16-mixed``:
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; the sharded parameters the
  optimizer steps stay fp32, the forward reads bf16 copies gathered for it).
* Gradient accumulation: on the micro-batches before an optimizer step the units keep their
  unsharded gradients and skip the reduce-scatter (``set_requires_gradient_sync(False)``); the
  last micro-batch reduces the accumulated sum once.
* Global BatchNorm: every BatchNorm becomes our ``GlobalBatchNorm`` (statistics of the global
  batch, in fp32), as under ddp; its running statistics are buffers, replicated, not sharded.
* Clipping by global norm: squared norms of the local gradient shards, one all-reduce
  (``strategies/sharded_clip.py``): the norm of the whole gradients, as one process computes it.
* LARS: trust ratios from whole-layer norms: the squared norms of the shards all-reduced once
  per parameter group (``LARS.use_sharded_tensors``), as for DeepSpeed's ZeRO partitions.
* EMA targets (BYOL, MoCo, DINO's teacher) are cut into the same units as their online networks,
  so each target shard sits on the rank holding the same shard of the online parameter: the EMA
  update is element-wise on the fp32 shards (no communication, bitwise the update of the whole
  tensors), and the targets stay fp32 whatever the precision.
* SwAV's prototype normalisation is row-wise and the prototypes are sharded by rows: each rank
  normalises its rows. The freeze drops the (sharded) gradients before the step.
* Checkpoints: ``torch.distributed.checkpoint`` directories (``strategies/fsdp_checkpoint.py``),
  resumed bitwise on the same world size and re-sharded on another.

The method's ``training_step`` (and validation/test/predict steps) run as FSDP forwards of the
root (``register_fsdp_forward_method``): its parameters are gathered for the step and, as the
root's, stay gathered until backward, so ``training_step_end`` (losses, SwAV's queue scores) reads
them whole. An encoder's other entry points (AMDIM's ``feature_maps``, CPC's ``feature_grid``) are
registered the same way on its unit.
"""

from __future__ import annotations

import contextlib
import torch
from torch import nn

from scale_ssl.collectives.global_batchnorm import convert_to_global_batchnorm
from scale_ssl.strategies.ddp import DDPStrategy
from scale_ssl.strategies.fsdp_checkpoint import load_sharded_checkpoint, read_fsdp_checkpoint, save_sharded_checkpoint
from scale_ssl.strategies.fsdp_units import entry_methods, fsdp_units, is_block
from scale_ssl.strategies.sharded_clip import clip_sharded_grad_norm_, clip_sharded_grad_value_

# Methods of the module that run as FSDP forwards (gather before, hooks for backward).
FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
FSDP_PRECISIONS = ("32", "32-true", "bf16-mixed")


class FSDPStrategy(DDPStrategy):
    """Args:
        precision: the trainer's precision ("32" or "bf16-mixed"): under "bf16-mixed" FSDP
            gathers bf16 copies of the fp32 shards for compute and reduces gradients in fp32.
        reshard_after_forward: free each unit's gathered parameters after its forward and gather
            them again in backward (ZeRO-3-like memory, one more all-gather per step); False
            keeps them until backward (ZeRO-2-like: less communication, more memory). The root
            unit (heads, prototypes) is always kept until backward.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory
            (``CPUOffloadPolicy``); the optimizer steps on the CPU.
        sync_batchnorm: global-batch BatchNorm (``GlobalBatchNorm``), on by default as for ddp.
        timeout_s, backend: as for ddp.
    """

    name = "fsdp"

    def __init__(self, accelerator: str = "auto", precision: str | int = "32", reshard_after_forward: bool = True,
                 cpu_offload: bool = False, sync_batchnorm: bool = True, timeout_s: float = 1800.0,
                 backend: str | None = None):
        super().__init__(accelerator=accelerator, sync_batchnorm=sync_batchnorm, timeout_s=timeout_s, backend=backend)
        precision = str(precision)
        if precision not in FSDP_PRECISIONS:
            raise ValueError(
                f"trainer.precision={precision!r} with trainer.strategy=fsdp: FSDP's mixed precision here is "
                f"bf16 parameters with fp32 gradient reduction; use one of {FSDP_PRECISIONS}"
            )
        for name, value in (("trainer.fsdp_reshard_after_forward", reshard_after_forward),
                            ("trainer.fsdp_cpu_offload", cpu_offload)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        self.precision = precision
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.module: nn.Module | None = None  # the method, sharded
        self.module_class: str | None = None
        self.optimizers: list = []

    # -- set-up ----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        """``module`` is the trainer's step adapter; its child, the method, is sharded in place
        (``fully_shard`` changes the modules' classes and parameters; the objects stay)."""
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)

        method = getattr(module, "module", module)
        self.module_class = type(method).__name__  # fully_shard renames it FSDP<Class>
        # In place: GlobalBatchNorm takes over each BatchNorm's parameters and buffers. Without
        # sync_batchnorm it has no collective and normalises per rank; either way it is the layer
        # that runs with the bf16 parameters FSDP's mixed precision gathers next to fp32 running
        # statistics (plain nn.BatchNorm refuses that mix).
        converted = convert_to_global_batchnorm(method, self.collective if self.sync_batchnorm else None)
        if converted is not method:
            raise RuntimeError("strategy=fsdp: the method itself is a BatchNorm layer; wrap it in a module")
        method.to(self.root_device)
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16-mixed" else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        units = fsdp_units(method)
        entries = {id(unit): entry_methods(unit) for unit in units if unit is not method and not is_block(unit)}
        for unit in units:
            # The root (the method) stays gathered from its forward to its backward: its step's
            # results are used right after the forward (training_step_end: losses, SwAV's queue
            # scores against the prototypes) and backward would gather it again at once.
            reshard = self.reshard_after_forward and unit is not method
            fully_shard(unit, reshard_after_forward=reshard, mp_policy=mixed, offload_policy=offload)
        for name in FORWARD_METHODS:
            if callable(getattr(method, name, None)):
                register_fsdp_forward_method(method, name)
        for unit in units:
            if entries.get(id(unit)):
                _register_entries(unit, entries[id(unit)], register_fsdp_forward_method)
        self.module = method
        return module

    def connect_optimizers(self, wrapped: nn.Module, optimizers: list):
        from scale_ssl.optim.lars import LARS

        sharded = {id(p) for p in self.module.parameters()}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in sharded:
                        raise ValueError(
                            "strategy=fsdp: an optimizer steps a parameter that is not one of the module's sharded "
                            "parameters (built before the strategy sharded the module?); build optimizers in "
                            "configure_optimizers from self.parameters()"
                        )
            if isinstance(optimizer, LARS):
                optimizer.use_sharded_tensors(lambda t: self.collective.all_reduce(t, op="sum"))
        self.optimizers = list(optimizers)
        return wrapped, optimizers

    # -- the optimizer's copy of the weights: the sharded fp32 DTensors ------------------------
    # ``master_parameters`` (inherited) returns the sharded parameters themselves: an EMA or a
    # row-wise normalisation on them runs shard by shard. Writing compares and copies the local
    # shards: a DTensor is a wrapper whose own ``data_ptr()`` says nothing about its storage (the
    # base class's check would then skip every write, e.g. SwAV's prototype normalisation).
    def write_master_parameters(self, params, values) -> None:
        with torch.no_grad():
            for p, value in zip(params, values):
                target, source = _local(p), _local(value.to(p.dtype))
                if source.data_ptr() != target.data_ptr():
                    target.copy_(source)

    # -- training --------------------------------------------------------------------------
    def no_backward_sync(self, wrapped: nn.Module, enabled: bool):
        # Set on every micro-batch: off before the last one, on for it (FSDP keeps the unsharded
        # gradients meanwhile and reduce-scatters their sum once).
        self.module.set_requires_gradient_sync(not enabled)
        return contextlib.nullcontext()

    def clip_gradients(self, optimizer, value: float, algorithm: str) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            clip_sharded_grad_norm_(params, value, lambda t: self.collective.all_reduce(t, op="sum"))
        else:
            clip_sharded_grad_value_(params, value)

    # -- checkpoints -----------------------------------------------------------------------
    def optimizer_state_dicts(self, optimizers: list) -> list:
        """None in the plain part: the sharded optimizer state is written by DCP in
        ``save_checkpoint``."""
        return []

    def load_optimizer_states(self, optimizers: list, states: list) -> None:
        """Loaded with the shards in ``load_checkpoint``."""

    def save_checkpoint(self, checkpoint: dict, path: str) -> None:
        checkpoint = {**checkpoint, "module_class": self.module_class}  # the class users load, not FSDP's
        save_sharded_checkpoint(checkpoint, path, self.optimizers, self.is_global_zero, self.barrier)

    def load_checkpoint(self, path: str) -> dict:
        if self.module is None:  # not training (validate/test/predict from a checkpoint): full tensors
            return read_fsdp_checkpoint(path)
        return load_sharded_checkpoint(path, self.module, self.optimizers)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's rank-local shard (its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _register_entries(unit: nn.Module, names: list[str], register) -> None:
    """Make each method in ``names`` an FSDP forward of ``unit``, outermost call only: a call
    made from inside another (the ViT's ``forward`` calling ``forward_tokens``, CPC's
    ``feature_maps`` calling ``feature_grid``) runs the plain method, or the inner call's
    post-forward would free the gathered parameters while the outer one still computes."""
    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    unit.register_forward_pre_hook(enter, prepend=True)
    unit.register_forward_hook(leave, always_call=True)
    for name in names:
        plain = getattr(type(unit), name).__get__(unit)
        register(unit, name)
        hooked = getattr(unit, name)

        def entry(*args, _plain=plain, _hooked=hooked, **kwargs):
            if depth[0]:
                return _plain(*args, **kwargs)
            depth[0] += 1
            try:
                return _hooked(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(unit, name, entry)
