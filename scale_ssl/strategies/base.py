"""The narrow interface between the one training loop and a distribution engine.

A strategy owns: the process group (or its absence), where tensors live, how the module is
wrapped for training, how backward and the optimizer step run, gradient-sync suppression for
accumulation, and how checkpoints are written and read. The trainer calls only what is below;
methods and losses see only ``strategy.collective``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import nn

from scale_ssl.collectives import Collective
from scale_ssl.checkpoint.files import load_checkpoint_file, save_checkpoint_file
from scale_ssl.strategies.step_settings import StepSettings


class Strategy(ABC):
    """One base class, flat subclasses: ``SingleDeviceStrategy``, ``DDPStrategy``, ..."""

    name: str = "base"
    # True where reading a device value on the host in the middle of a step splits the compiled
    # step program (XLA): the trainer then defers its per-step checks to the log interval.
    host_reads_split_the_step: bool = False

    def __init__(self, accelerator: str = "auto"):
        if accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.accelerator={accelerator!r} is not supported; use 'auto', 'cpu' or 'cuda'")
        self.accelerator = accelerator
        self.step_settings = StepSettings()

    def configure_step(self, settings: StepSettings) -> None:
        """The loop's precision, accumulation and clipping, given before ``setup_module`` (an
        engine that steps the optimizer itself is built from them; others ignore them)."""
        self.step_settings = settings

    # -- world -----------------------------------------------------------------------------
    @abstractmethod
    def setup_environment(self) -> None:
        """Create the process group / pick the device. Called once, before anything else."""

    @property
    @abstractmethod
    def collective(self) -> Collective: ...

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def global_rank(self) -> int:
        return self.collective.rank

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def root_device(self) -> torch.device:
        if self.accelerator == "cuda" or (self.accelerator == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- model -----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device and return what the loop should call for training.

        ``module`` is the trainer's training-step adapter (its ``forward`` runs
        ``training_step``), so wrapping it in DDP puts the step under DDP's gradient hooks.
        """
        return module.to(self.root_device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure=None) -> Any:
        return optimizer.step(closure) if closure is not None else optimizer.step()

    def no_backward_sync(self, wrapped: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation (non-final micro-batches of gradient accumulation)."""
        return contextlib.nullcontext()

    def connect_optimizers(self, wrapped: nn.Module, optimizers: list) -> tuple[nn.Module, list]:
        """Called once ``configure_optimizers`` has run (DeepSpeed builds its engine here)."""
        return wrapped, optimizers

    # -- the optimizer's copy of the weights ------------------------------------------------
    # Where an engine keeps the weights the optimizer updates apart from the module's (DeepSpeed:
    # fp32 master copies, flattened and partitioned over ranks), code that reads or writes
    # weights outside the forward pass must go through these, or it reads a bf16 copy / an empty
    # ZeRO-3 shard and writes something the next step overwrites. Here the module's parameters
    # are that copy: fp32 (autocast keeps them so) and whole on every rank.
    def master_parameters(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 values of ``params`` as the optimizer holds them (read-only views)."""
        return [p.detach() for p in params]

    def write_master_parameters(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        """Set ``params`` (full values, identical on every rank) wherever the optimizer and the
        forward pass read them."""
        with torch.no_grad():
            for p, value in zip(params, values):
                if value.data_ptr() != p.data_ptr():  # not the view master_parameters returned
                    p.copy_(value.to(p.dtype))

    def skip_update(self, params: Sequence[nn.Parameter]) -> None:
        """No change to ``params`` at the coming optimizer step: no gradient step, no weight
        decay, no momentum, their optimizer state untouched. Call between backward and the step
        (``on_before_optimizer_step``)."""
        for p in params:
            p.grad = None

    def clip_gradients(self, optimizer, value: float, algorithm: str) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, value)
        else:
            torch.nn.utils.clip_grad_value_(params, value)

    @property
    def autocast_enabled(self) -> bool:
        """False where the engine runs mixed precision itself (DeepSpeed)."""
        return True

    def optimizer_state_dicts(self, optimizers: list) -> list:
        """What a checkpoint stores of the optimizers (DeepSpeed saves its partitioned state itself)."""
        return [opt.state_dict() for opt in optimizers]

    def load_optimizer_states(self, optimizers: list, states: list) -> None:
        if len(states) != len(optimizers):
            raise ValueError(
                f"checkpoint has {len(states)} optimizer states but configure_optimizers returned "
                f"{len(optimizers)}; resume with the same optimizer configuration"
            )
        for optimizer, state in zip(optimizers, states):
            optimizer.load_state_dict(state)

    def eval_step(self, module: nn.Module, step_name: str, args: tuple) -> Any:
        """Run ``validation_step``/``test_step`` (dp splits the batch over its devices)."""
        return getattr(module, step_name)(*args)

    def device_batches(self, loader: Any) -> Any:
        """The training batches of ``loader`` in the form the step receives them (each then goes
        through ``batch_to_device``). A strategy whose runtime has its own input pipeline (XLA's
        ``MpDeviceLoader``) wraps the loader here."""
        return loader

    def batch_to_device(self, batch: Any) -> Any:
        device = self.root_device
        if device.type == "cpu":
            return batch
        return _move(batch, device)

    # -- communication for the trainer -----------------------------------------------------
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.collective.all_reduce(tensor, op=op)

    def barrier(self) -> None:
        self.collective.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, path: str) -> None:
        """Rank zero writes the file atomically; every rank waits until it exists."""
        if self.is_global_zero:
            save_checkpoint_file(checkpoint, path)
        self.barrier()

    def load_checkpoint(self, path: str) -> dict:
        return load_checkpoint_file(path)

    def teardown(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, rank={self.global_rank})"


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_move(b, device) for b in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch
