"""Memory per device and bytes per collective of one training step, measured on this machine.

How (stated by ``scale-ssl plan`` and docs/SCALING.md, so a reader can judge it):

1. The method is built from the config on the CPU and attached to a stand-in trainer whose collective (``RecordingCollective``) plays rank 0
   of the planned world: an all_gather returns N copies of this rank's tensor, an all_reduce the
   tensor itself, and every call's result size is recorded with the function that made it.
2. One real ``training_step`` (+ ``training_step_end``) runs on random images of the exact shapes
   the method's ``train_transform`` produces, under the config's autocast precision, at two small
   per-device batches b1 < b2. Autograd's saved-tensor hook adds up the bytes kept for backward
   (each storage once, parameters excluded): the activation memory. This pass uses plain
   BatchNorm, whose saved tensors are those of fused kernels (torch's ``SyncBatchNorm`` on GPUs,
   XLA's compiled graph); a second pair of passes with ``GlobalBatchNorm`` over the recorder, when
   the config asks for global BN, records the statistics' collectives. (Our ``GlobalBatchNorm`` is
   a composite of eager ops: on CPU it keeps ~3.5x the saved bytes of fused BN.)
3. Activation bytes and every collective's size are affine in the per-device batch b (gathers
   grow with b, Sinkhorn marginals and BN statistics do not), so the two measurements are
   extrapolated linearly to the planned b. The gradient all-reduce (or ZeRO's reduce-scatter +
   all-gather) is the trainable parameters' bytes, once per optimizer step.

What it leaves out: the backward's transient buffers, cuDNN/XLA workspaces, allocator
fragmentation, the data pipeline and the CUDA context (budget ~1-2 GB per GPU for these).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import PIL.Image
import torch
from omegaconf import DictConfig, OmegaConf

from scale_ssl.collectives import Collective
from scale_ssl.collectives.base import check_reduce_op
from scale_ssl.collectives.global_batchnorm import convert_to_global_batchnorm
from scale_ssl.methods import METHODS

ADAPTIVE_OPTIMIZERS = ("adam", "adamw")  # two fp32 moments per parameter; SGD/LARS keep one
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class CollectiveCall:
    site: str  # the function that called the collective, e.g. "nt_xent.forward"
    op: str  # all_gather / all_reduce / broadcast
    phase: str  # forward (once per micro-batch) or backward (the gather's summed gradient)
    bytes: float  # size of the result on each rank (the gathered tensor for an all_gather)


class RecordingCollective(Collective):
    """Rank 0 of a world of ``world_size`` identical ranks, recording what it is asked to move."""

    def __init__(self, world_size: int):
        self._world = world_size
        self.calls: list[CollectiveCall] = []

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return 0

    def _record(self, op: str, tensor: torch.Tensor, phase: str = "forward") -> None:
        caller = inspect.stack()[2]
        site = f"{os.path.splitext(os.path.basename(caller.filename))[0]}.{caller.function}"
        self.calls.append(CollectiveCall(site, op, phase, float(tensor.numel() * tensor.element_size())))

    def all_gather(self, tensor: torch.Tensor, grad: bool = True) -> torch.Tensor:
        out = torch.cat([tensor] * self._world)
        self._record("all_gather", out)
        if grad and tensor.requires_grad:
            # Our gather's backward all-reduces the whole gathered gradient (collectives/*).
            self._record("all_reduce", out, phase="backward")
            return out
        return out.detach()

    def all_reduce(self, tensor: torch.Tensor, op="sum") -> torch.Tensor:
        check_reduce_op(op)
        self._record("all_reduce", tensor)
        return tensor.detach().clone()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._record("broadcast", tensor)
        return tensor

    def barrier(self) -> None:
        return None


@dataclass
class StepCost:
    """Per device, at the planned per-device batch."""

    trainable_params: int
    frozen_params: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    queue_bytes: float
    collectives: dict[tuple[str, str, str], float]  # (site, op, phase) -> bytes per micro-batch
    gradient_sync: list[tuple[str, float]]  # (what, bytes) per optimizer step
    batches_measured: tuple[int, int]
    calls_per_micro_batch: int = 0

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.queue_bytes


def measure_step_cost(config: DictConfig, world_size: int, per_device_batch: int) -> StepCost:
    """Measure (see the module docstring) and extrapolate to ``per_device_batch``."""
    b1, b2 = (2, 4) if per_device_batch % 4 == 0 else (1, 2)
    # Memory with plain BatchNorm: what fused BN kernels keep (torch's SyncBatchNorm on GPUs, XLA's
    # compiled graph). Our GlobalBatchNorm, a composite of eager ops, keeps ~3.5x that on CPU.
    first, second = _measure(config, world_size, b1, False), _measure(config, world_size, b2, False)
    module = second["module"]
    global_bn = bool(config.trainer.sync_batchnorm) and world_size > 1
    if global_bn:  # the statistics' collectives
        calls1, calls2 = _measure(config, world_size, b1, True)["calls"], _measure(config, world_size, b2, True)["calls"]
    else:
        calls1, calls2 = first["calls"], second["calls"]

    def at_batch(v1: float, v2: float) -> float:
        return max(0.0, v1 + (v2 - v1) / (b2 - b1) * (per_device_batch - b1))

    if len(calls1) != len(calls2):
        raise RuntimeError("the method made a different number of collective calls at two batch sizes")
    collectives: dict[tuple[str, str, str], float] = {}
    for c1, c2 in zip(calls1, calls2):
        key = (c1.site, c1.op, c1.phase)
        collectives[key] = collectives.get(key, 0.0) + at_batch(c1.bytes, c2.bytes)

    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    t = config.trainer
    optimizer = str(OmegaConf.to_container(config.model, resolve=True).get("optimizer", "sgd")).lower()
    moments = 2 if optimizer in ADAPTIVE_OPTIMIZERS else 1
    if t.strategy == "fsdp":
        param_bytes, grad_bytes, opt_bytes, sync = _fsdp_state_bytes(t, module, moments, world_size)
    else:
        param_bytes, grad_bytes, opt_bytes, sync = _state_bytes(t, trainable, frozen, moments, world_size)
    return StepCost(
        trainable_params=trainable, frozen_params=frozen, param_bytes=param_bytes + buffers,
        grad_bytes=grad_bytes, optimizer_bytes=opt_bytes,
        activation_bytes=at_batch(first["saved"], second["saved"]),
        queue_bytes=_queue_bytes(module), collectives=collectives, gradient_sync=sync,
        batches_measured=(b1, b2), calls_per_micro_batch=len(calls2),
    )


def _state_bytes(t: DictConfig, trainable: int, frozen: int, moments: int, world: int):
    """Parameters, gradients and optimizer state per device, and the gradient traffic per step.

    Plain strategies (single/ddp/dp/xla) keep fp32 weights, fp32 gradients (autocast computes in
    bf16 but the leaves stay fp32; DDP's buckets are views of the gradients) and fp32 moments.
    DeepSpeed with bf16/fp16 keeps 16-bit weights and gradients plus an fp32 master copy and the
    moments (ZeRO paper, sec. 3); stage 1 shards the optimizer state over the ranks, stage 2 also
    the gradients, stage 3 also the weights; offloaded state lives in host memory."""
    fp32 = 4
    if t.strategy != "deepspeed":
        sync = [("gradient all_reduce (fp32)", float(trainable * fp32))]
        return float((trainable + frozen) * fp32), float(trainable * fp32), float(trainable * fp32 * moments), sync
    half = str(t.precision) in ("bf16-mixed", "16-mixed")
    weight = 2 if half else fp32
    stage = t.zero_stage
    params = (trainable + frozen) * weight / (world if stage >= 3 and not t.offload_parameters else 1)
    if t.offload_parameters:
        params = frozen * weight
    grads = trainable * weight / (world if stage >= 2 else 1)
    optimizer = trainable * fp32 * (moments + (1 if half else 0)) / (world if stage >= 1 else 1)
    if t.offload_optimizer:
        optimizer = 0.0
    grad_bytes = float(trainable * weight)
    if stage == 0:
        sync = [("gradient all_reduce", grad_bytes)]
    else:
        sync = [("gradient reduce_scatter", grad_bytes), ("updated weights all_gather", grad_bytes)]
    if stage >= 3:
        sync.append(("weights all_gather in forward + backward (ZeRO-3)", 2 * grad_bytes))
    return float(params), float(grads), float(optimizer), sync


def _fsdp_state_bytes(t: DictConfig, module, moments: int, world: int):
    """FSDP2 (``strategies/fsdp.py``): every parameter, gradient and optimizer moment is an fp32
    shard of 1/N (on the host under ``fsdp_cpu_offload``); on top, the units being computed
    hold their parameters gathered (bf16 under ``bf16-mixed``) and their unsharded gradients:
    counted here as the two largest units (the one computing and the next one prefetched) plus
    the root, which stays gathered from forward to backward. Traffic per optimizer step: one
    all-gather of every unit per micro-batch in forward, one more in backward for the units
    resharded after forward (trained units but the root, under ``fsdp_reshard_after_forward``), and one
    reduce-scatter of the fp32 gradients per optimizer step (accumulation skips it on the other
    micro-batches)."""
    from scale_ssl.strategies.fsdp_units import fsdp_units

    fp32 = 4
    gathered = 2 if str(t.precision) == "bf16-mixed" else fp32
    units = fsdp_units(module)
    counted: set[int] = set()
    sizes = []  # (parameters owned by the unit, trained ones), innermost units first
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in counted]
        counted |= {id(p) for p in own}
        sizes.append((sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad)))
    total = sum(n for n, _ in sizes)
    trained = sum(n for _, n in sizes)
    root_all, root_trained = sizes[-1]
    largest = sorted((n for n, _ in sizes[:-1]), reverse=True)[:2]
    largest_trained = sorted((n for _, n in sizes[:-1]), reverse=True)[:2]
    on_device = 0.0 if t.fsdp_cpu_offload else 1.0
    params = total * fp32 / world * on_device + (sum(largest) + root_all) * gathered
    grads = trained * fp32 / world * on_device + (sum(largest_trained) + root_trained) * gathered
    optimizer = trained * fp32 * moments / world * on_device
    accumulate = t.accumulate_grad_batches
    # Backward gathers only units with gradients (an EMA teacher runs forward only).
    regather = (trained - root_trained) if t.fsdp_reshard_after_forward else 0
    sync = [
        (f"parameters all_gather in forward ({'bf16' if gathered == 2 else 'fp32'}, x{accumulate} micro-batches)",
         float(total * gathered * accumulate)),
        ("gradient reduce_scatter (fp32, once per step)", float(trained * fp32)),
    ]
    if regather:
        sync.insert(1, (f"parameters all_gather in backward (x{accumulate})",
                        float(regather * gathered * accumulate)))
    return float(params), float(grads), float(optimizer), sync


def _queue_bytes(module) -> float:
    queue = getattr(module, "queue", None)
    if queue is None:
        return 0.0
    return float(sum(v.numel() * v.element_size() for v in vars(queue).values() if isinstance(v, torch.Tensor)))


def _sample_views(config: DictConfig) -> list[torch.Size]:
    """Shapes of the views one image becomes: run the method's own train transform once."""
    d = config.data
    transform = METHODS[config.method].train_transform(d)
    side = max(int(d.image_size), 8)
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side, 3) if d.channels == 3 else (side, side), dtype=np.uint8)
    views = transform(PIL.Image.fromarray(pixels))
    return [v.shape for v in views]


class _StandInTrainer:
    """What a method reads from its trainer inside ``setup`` and ``training_step``. The epoch is
    large so that queues that start after some epochs are on, as in most of a run."""

    def __init__(self, collective: Collective):
        self.strategy = SimpleNamespace(collective=collective, global_rank=0, world_size=collective.world_size)
        self.global_step = 0
        self.current_epoch = 10**6
        self.estimated_stepping_batches = 1
        self.steps_per_epoch = 1


def _measure(config: DictConfig, world: int, batch: int, global_bn: bool) -> dict:
    torch.manual_seed(0)
    model_kwargs = OmegaConf.to_container(config.model, resolve=True)
    module = METHODS[config.method](**model_kwargs)
    recorder = RecordingCollective(world)
    if global_bn:
        module = convert_to_global_batchnorm(module, recorder)
    module.trainer = _StandInTrainer(recorder)
    module.setup("fit")
    module.train()
    recorder.calls.clear()  # set-up broadcasts are not per step

    generator = torch.Generator().manual_seed(0)
    views = [torch.randn((batch, *shape), generator=generator) for shape in _sample_views(config)]
    labels = torch.zeros(batch, dtype=torch.long)
    parameter_storages = {p.untyped_storage()._cdata for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    dtype = AUTOCAST_DTYPES.get(str(config.trainer.precision))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            module.training_step_end(module.training_step((tuple(views), labels), 0))
    return {"module": module, "calls": list(recorder.calls), "saved": float(sum(saved.values()))}
