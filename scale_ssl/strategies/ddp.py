"""DistributedDataParallel over a ``torch.distributed`` process group.

Processes are started by a real launcher (``torchrun``, SLURM's ``srun``, ``accelerate launch``);
this strategy only reads the environment they set. nccl on GPUs, gloo on CPU.

**A process group the strategy creates, it destroys** (design contract 8), at the latest when the
interpreter exits, while the interpreter is still whole (``atexit``). Not doing so made gloo
ranks abort at exit now and then ("terminate called without an active exception", SIGABRT after
a completed run, so torchrun reported a failure). Root cause, from core dumps: a gloo worker
thread (``ProcessGroupGloo::runLoop``) destroys each finished collective's ``Work`` itself,
after the caller's ``wait()`` has returned; when that ``Work`` holds the last reference to a
tensor created in Python, freeing it needs the GIL. If the worker gets there only after the main
thread has begun finalising the interpreter, Python 3.11 ends any thread asking for the GIL with
``pthread_exit``, whose unwinding crosses the ``noexcept`` ``Work`` destructor: ``std::terminate``.
``destroy_process_group()`` alone does not prevent it: it only unregisters the group, whose
worker threads live on as long as anything still references it. What does is dropping every
reference while the interpreter is intact: ``~ProcessGroupGloo`` then joins its worker threads
(torch releases the GIL around it), so every pending ``Work`` is freed first. One reference no
teardown can drop: ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` default
arguments, evaluated when it is first imported, and DDP's constructor imports it (through
``torch._dynamo``); imported after ``init_process_group``, it pins the group for the life of the
process. ``setup_environment`` therefore imports those modules before it creates the group.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scale_ssl.collectives import Collective, TorchDistributedCollective
from scale_ssl.collectives.global_batchnorm import convert_to_global_batchnorm
from scale_ssl.runtime import ClusterEnvironment
from scale_ssl.strategies.base import Strategy


def _restart_scoped_store(env: ClusterEnvironment, timeout: datetime.timedelta):
    """Under torchrun the workers meet in the elastic agent's key-value store, which outlives a
    restart; the process group of a restarted worker group would then read the dead group's
    addresses (gloo: "connection refused", then a hang until the timeout). Keys are therefore
    scoped by ``TORCHELASTIC_RESTART_COUNT``. ``None`` (the default env:// rendezvous) elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"scale_ssl/restart_{restart}", agent_store)


class DDPStrategy(Strategy):
    """``torch.nn.parallel.DistributedDataParallel`` with an optional SyncBatchNorm conversion.

    Args:
        sync_batchnorm: normalise with global-batch statistics (SimCLR's "global BN"), on by
            default: ``nn.SyncBatchNorm`` on GPUs, our ``GlobalBatchNorm`` elsewhere, so N ranks
            x b train as one process on N x b (design contract 2). False keeps per-rank BN: each
            rank normalises with its own b samples' statistics, which a contrastive model can use
            to tell ranks apart and cheat (google-research/simclr #114). Costs one small
            collective per BN layer per step (docs/BENCHMARKS.md "Global BatchNorm").
        timeout_s: collective timeout; a rank that died leaves the others failing after this long
            instead of hanging forever.
        find_unused_parameters, static_graph, gradient_as_bucket_view: passed to DDP.
            ``static_graph=True`` (config ``trainer.static_graph``, off by default) is valid when
            every step uses the same parameters in the same order: no unused or conditionally
            used parameters, no parameters frozen or unfrozen mid-run. DDP then records the
            graph in the first step and skips the per-step search for ready/unused gradients.
    """

    name = "ddp"

    def __init__(
        self,
        accelerator: str = "auto",
        sync_batchnorm: bool = True,
        timeout_s: float = 1800.0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = True,
        backend: str | None = None,
    ):
        super().__init__(accelerator)
        self.sync_batchnorm = sync_batchnorm
        self.timeout_s = timeout_s
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.backend = backend
        self._collective: Collective | None = None
        self._owns_group = False
        self.env: ClusterEnvironment | None = None

    def setup_environment(self) -> None:
        if self._collective is not None:  # idempotent: the CLI sets up before building data
            return
        if dist.is_initialized():  # a caller (test, notebook) already made the group
            self._collective = TorchDistributedCollective()
            return
        self.env = ClusterEnvironment.detect()
        os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.env.master_port))
        backend = self.backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        # What DDP's constructor would import anyway, imported before the group exists: some of
        # it captures the default group in default arguments (see the module docstring).
        import torch._dynamo  # noqa: F401

        dist.init_process_group(
            backend=backend,
            rank=self.env.rank,
            world_size=self.env.world_size,
            timeout=timeout,
            store=_restart_scoped_store(self.env, timeout),
        )
        self._owns_group = True
        self._collective = TorchDistributedCollective()
        _remember_created_group()

    @property
    def local_rank(self) -> int:
        return self.env.local_rank if self.env is not None else int(os.environ.get("LOCAL_RANK", 0))

    @property
    def collective(self) -> Collective:
        if self._collective is None:
            raise RuntimeError("DDPStrategy.setup_environment() has not run yet")
        return self._collective

    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.sync_batchnorm:
            # torch's SyncBatchNorm runs only on GPUs; elsewhere (gloo on CPU) use ours.
            if self.root_device.type == "cuda":
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            else:
                module = convert_to_global_batchnorm(module, self.collective)
        module = module.to(self.root_device)
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(
            module,
            device_ids=device_ids,
            find_unused_parameters=self.find_unused_parameters,
            static_graph=self.static_graph,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
        )

    def no_backward_sync(self, wrapped: nn.Module, enabled: bool):
        if enabled and isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def teardown(self) -> None:
        """Destroy the process group this strategy created (a group made by the caller is left
        to the caller): unregistered, its last reference dropped, its worker threads joined.
        Call it once nothing needs the group any more and no DDP wrapper is alive (the trainer
        drops its own when ``fit`` ends). Not needed before exiting: the ``atexit`` hook below
        does the same, also after an uncaught exception (call ``teardown`` only on success:
        while an exception propagates, its traceback may still hold DDP's frames)."""
        if self._owns_group:
            self._owns_group = False
            if strategy_created_the_group():
                destroy_process_group_and_threads()


def destroy_process_group_and_threads() -> None:
    """``destroy_process_group()``, then make sure the group object itself is freed, so that its
    gloo worker threads are joined now, while the interpreter can still run what they free.

    The trainer drops its DDP wrapper (which holds the group) when ``fit`` ends. What can still
    hold one: reference cycles not yet collected, and at exit the frames of the uncaught
    exception's traceback (``sys.last_traceback``: a failed step leaves DDP's ``forward`` frame
    there). Those frames are cleared here only at exit, where the traceback has been printed.
    This function keeps its own handle on the group until last, so the final release happens in
    torch's GIL-releasing holder (a worker thread finishing a collective may need the GIL).
    """
    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    dist.destroy_process_group()
    gc.collect()  # DDP wrappers and modules left in reference cycles release the group
    del group  # the last reference: ~ProcessGroup joins the worker threads


# ``id`` of the default group a strategy created (the strategy object itself may be long gone
# when the interpreter exits); a group the user made after destroying ours is not touched.
_created_group_id: int | None = None


def _remember_created_group() -> None:
    global _created_group_id
    _created_group_id = id(dist.group.WORLD)


def strategy_created_the_group() -> bool:
    """Whether the current default group is one a ``DDPStrategy`` created (and will destroy)."""
    return dist.is_initialized() and _created_group_id is not None and id(dist.group.WORLD) == _created_group_id


def _release_at_exit() -> None:
    """``atexit`` hook (runs before the interpreter starts finalising): destroy the group a
    strategy created if nobody did, e.g. when a user's ``Trainer(strategy="ddp").fit()`` script
    ends, normally or with an uncaught exception."""
    if not strategy_created_the_group():
        return
    # The uncaught exception's traceback (already printed) holds the frames of the failed step,
    # DDP's forward among them; cleared here so DDP is freed while the group is still held.
    for name in ("last_exc", "last_traceback"):
        tb = getattr(sys, name, None)
        tb = getattr(tb, "__traceback__", tb)
        if tb is not None:
            traceback.clear_frames(tb)
    destroy_process_group_and_threads()


atexit.register(_release_at_exit)
