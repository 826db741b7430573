"""torch_xla PJRT: TPU pods (``PJRT_DEVICE=TPU``), and XLA's CPU devices in tests (``PJRT_DEVICE=CPU``).

How a step runs on XLA. Every tensor operation is traced lazily into a graph; nothing executes
until ``torch_xla.sync()``, which compiles the graph (once per distinct graph, then cached) and
dispatches it to the device. This strategy syncs **once per optimizer step**, after
``optimizer.step()``, so a step (forward, backward, gradient all-reduce, update) is one compiled
program. Training batches arrive through ``MpDeviceLoader`` (``device_batches``), already on the
device. Nothing in the step reads a value back to the host: the trainer fetches metrics only at
``log_every_n_steps``, after the step's sync, when they already live on the device as data.

Replicas. ``torch_xla.launch`` (see ``launch_xla``) starts one process per TPU chip -- or one thread
per device for XLA:CPU -- and every replica builds its own Trainer and strategy. Gradients are
averaged over replicas after the backward of the last micro-batch (like DDP's hooks, so gradient
clipping sees the global gradient), parameters are broadcast from replica 0 at set-up (like DDP),
and every rank-dependent value enters the graphs as data (``XlaCollective``), so all replicas run
the same compiled program.

Launch traps this strategy stops with a clear error:

* ``torchrun`` with ``PJRT_DEVICE=CPU`` gives each process an XLA world of 1: its all-reduces
  would silently return local values.
* Several local XLA devices but no ``torch_xla.launch``: the process would use only device 0.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from scale_ssl.collectives import Collective
from scale_ssl.collectives.global_batchnorm import convert_to_global_batchnorm
from scale_ssl.strategies.base import Strategy
from scale_ssl.checkpoint.files import save_checkpoint_file
from scale_ssl.runtime import LaunchError

ACCELERATORS = ("auto", "tpu", "cpu")


def _sync() -> None:
    # Looked up at call time (not ``from torch_xla import sync``) so one place decides what a sync
    # is; the multi-device CPU tests substitute a thread-safe sync here (tests/xla/sync_shim.py).
    import torch_xla

    torch_xla.sync()


class XLAStrategy(Strategy):
    """One replica of a torch_xla PJRT job.

    Args:
        accelerator: ``"auto"`` (whatever ``PJRT_DEVICE`` says; torch_xla picks TPU when one is
            attached, else CPU), ``"tpu"`` or ``"cpu"`` (sets ``PJRT_DEVICE`` if it is unset).
        sync_batchnorm: normalise with global-batch statistics (``GlobalBatchNorm`` over the
            replicas): SimCLR's global BN.
    """

    name = "xla"
    host_reads_split_the_step = True

    def __init__(self, accelerator: str = "auto", sync_batchnorm: bool = True):
        if accelerator not in ACCELERATORS:
            raise ValueError(
                f"trainer.accelerator={accelerator!r} is not supported with trainer.strategy=xla; use one of {ACCELERATORS}"
            )
        super().__init__("auto")
        self.accelerator = accelerator
        self.sync_batchnorm = sync_batchnorm
        self._collective = None
        self._module: nn.Module | None = None
        self._sync_gradients = True

    # -- world -----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        if self._collective is not None:  # idempotent: the CLI sets up before building data
            return
        if self.accelerator != "auto":
            wanted = self.accelerator.upper()
            current = os.environ.setdefault("PJRT_DEVICE", wanted)
            if current != wanted:
                raise LaunchError(
                    f"trainer.accelerator={self.accelerator!r} but PJRT_DEVICE={current}; make them agree "
                    "or use trainer.accelerator=auto"
                )
        try:
            import torch_xla  # noqa: F401
            import torch_xla.runtime as xr
        except ImportError as err:
            raise LaunchError(
                f"trainer.strategy=xla needs torch_xla ({err}); install torch-xla (it needs its matching torch, "
                "see requirements-xla.txt) or choose another trainer.strategy"
            ) from err
        xla_world = xr.world_size()
        launcher_world = int(os.environ.get("WORLD_SIZE", "1"))
        if launcher_world > 1 and xla_world != launcher_world:
            raise LaunchError(
                f"trainer.strategy=xla: the launcher set WORLD_SIZE={launcher_world} (torchrun?) but the XLA runtime "
                f"sees a world of {xla_world} (PJRT_DEVICE={os.environ.get('PJRT_DEVICE', 'unset')}); its all-reduces "
                "would silently stay local. Do not use torchrun for XLA devices: run `scale-ssl fit ... "
                "trainer.strategy=xla` (it starts the replicas with torch_xla.launch)"
            )
        if xla_world == 1 and xr.addressable_device_count() > 1:
            raise LaunchError(
                f"trainer.strategy=xla: this process sees {xr.addressable_device_count()} XLA devices but was not "
                "started by torch_xla.launch, so it would train on device 0 alone; run `scale-ssl fit ... "
                "trainer.strategy=xla` or scale_ssl.strategies.xla.launch_xla(fn, ...)"
            )
        from scale_ssl.collectives.xla import XlaCollective

        self._collective = XlaCollective()

    @property
    def collective(self) -> Collective:
        if self._collective is None:
            raise RuntimeError("XLAStrategy.setup_environment() has not run yet")
        return self._collective

    @property
    def local_rank(self) -> int:
        import torch_xla.runtime as xr

        return xr.local_ordinal()

    @property
    def root_device(self) -> torch.device:
        return self.collective.device

    # -- input -----------------------------------------------------------------------------
    def device_batches(self, loader: Any) -> Any:
        """Training batches through torch_xla's ``MpDeviceLoader``: a background thread draws the
        next batches from ``loader`` and copies them to this replica's device while the device
        runs the current step, so host-to-device transfers overlap compute (on a TPU host the
        difference between feeding the chips and waiting on them).

        Not in the one-process emulation of several XLA:CPU devices (``PJRT_DEVICE=CPU`` with
        device threads, used only by tests): there a transfer thread that waits on a device busy
        in a collective holds the GIL the other device threads need to join that collective (torch_xla
        2.9 runs such devices as threads of one process; ``tests/xla/sync_shim.py``), so batches are
        moved in the step instead, as by every strategy.
        """
        if not self.device_loader_enabled:
            return loader
        import torch_xla.distributed.parallel_loader as pl

        return pl.MpDeviceLoader(loader, self.root_device)

    @property
    def device_loader_enabled(self) -> bool:
        import torch_xla.runtime as xr

        return not (xr.device_type() == "CPU" and xr.addressable_device_count() > 1)

    # -- model -----------------------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.sync_batchnorm and self.world_size > 1:
            module = convert_to_global_batchnorm(module, self.collective)
        module = module.to(self.root_device)
        if self.world_size > 1:
            # Start every replica from replica 0's weights, as DDP does: with XLA:CPU's device
            # threads sharing one host RNG, replicas that each build their model may not agree.
            state = [t for t in list(module.parameters()) + list(module.buffers())]
            self.collective.broadcast_many([t.data for t in state], src=0)
            _sync()
        self._module = module
        return module

    def no_backward_sync(self, wrapped: nn.Module, enabled: bool):
        return _GradientSyncToggle(self, enabled)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self._sync_gradients and self.world_size > 1:
            # Average gradients over replicas now (one coalesced all-reduce, traced into this
            # step's graph), so that clipping and the optimizer see the global gradient; with the
            # summed backward of the loss's gather this equals one process on the global batch.
            grads = [p.grad for p in self._module.parameters() if p.grad is not None]
            self.collective.all_reduce_many(grads, scale=1.0 / self.world_size)

    def write_master_parameters(self, params, values) -> None:
        """Set ``params`` to ``values`` (SwAV's prototype normalisation, EMA targets). Always a copy:
        XLA tensors have no storage and ``data_ptr()`` is 0 for every one of them, so the base
        class's test for "the view ``master_parameters`` returned" would take every value for the
        parameter itself and write nothing (SwAV's prototypes were never normalised). Copying a
        view onto its own parameter is a no-op in the traced step."""
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value.to(p.dtype))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure=None) -> Any:
        out = optimizer.step(closure) if closure is not None else optimizer.step()
        _sync()  # the one sync per optimizer step: compile (first time) and run the whole step
        return out

    # -- communication for the trainer -----------------------------------------------------
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        out = self.collective.all_reduce(tensor, op=op)
        if self.world_size > 1:
            _sync()  # run the all-reduce here, on every replica at the same point
        return out

    def all_gather_object(self, obj: Any) -> list:
        if self.world_size == 1:
            return [obj]
        payload = pickle.dumps(obj)
        device, collective = self.root_device, self.collective
        sizes = collective.all_gather(torch.tensor([len(payload)], dtype=torch.long).to(device), grad=False)
        _sync()
        sizes = sizes.cpu().tolist()
        padded = torch.zeros(1, max(sizes), dtype=torch.uint8)
        padded[0, : len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = collective.all_gather(padded.to(device), grad=False)
        _sync()
        rows = rows.cpu()
        return [pickle.loads(rows[i, :n].numpy().tobytes()) for i, n in enumerate(sizes)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj if self.world_size == 1 else self.all_gather_object(obj)[src]

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, path: str) -> None:
        """Replica 0 writes a plain CPU checkpoint (loadable by every other strategy); all wait."""
        _sync()
        cpu_checkpoint = _to_cpu(checkpoint)
        if self.is_global_zero:
            save_checkpoint_file(cpu_checkpoint, path)
        self.barrier()

    def teardown(self) -> None:
        if self._collective is not None:
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()


class _GradientSyncToggle:
    """``no_backward_sync``: skip the gradient all-reduce on non-final micro-batches."""

    def __init__(self, strategy: XLAStrategy, enabled: bool):
        self.strategy, self.enabled = strategy, enabled

    def __enter__(self):
        self.previous = self.strategy._sync_gradients
        if self.enabled:
            self.strategy._sync_gradients = False
        return self

    def __exit__(self, *exc):
        self.strategy._sync_gradients = self.previous
        return False


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type == "xla" else obj
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class _CallWithoutIndex:
    """torch_xla.launch calls ``fn(index, *args)``; ours take only ``*args`` (the strategy asks the
    runtime for its ordinal). A class, not a lambda, so ``spawn`` can pickle it."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, _index: int, *args):
        return self.fn(*args)


def launch_xla(fn, *args) -> None:
    """Run ``fn(*args)`` on every XLA replica: one process per TPU chip, or one thread per
    XLA:CPU device (``CPU_NUM_DEVICES``). ``fn`` must be picklable (a module-level function) and
    must not touch an XLA device in the launching process beforehand (torch_xla refuses to spawn
    once its runtime is initialised)."""
    import torch_xla

    torch_xla.launch(_CallWithoutIndex(fn), args=args)
