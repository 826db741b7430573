"""The real-recipe equivalence matrix: every method x backend x precision against one process.

A *cell* trains one method for ``STEPS`` optimizer steps (two epochs of three batches) on one
backend (dp x 2 parts, ddp x 2 / x 4 ranks, deepspeed ZeRO-1/2/3 on 2 ranks) and is compared after
every step with one process training on the whole global batch: the loss, the parameters, the
per-parameter optimizer state, the queue (SwAV, MoCo), the EMA target (BYOL, MoCo), BatchNorm
buffers (and CPC's online head with the parameters).

The module is the method class built with the optimizer recipe of its
``configs/<method>/fmnist_cpu.yaml`` (LARS / SGD / Adam, weight decay, momentum, excluded biases and
norms, warmup-cosine, EMA rate, temperatures, ...), only its sizes shrunk (ResNet-10 on 16 px
images with narrow heads; the small AMDIM/CPC encoders at their configs' 28 px) and the parts the
matrix must exercise switched on: SwAV's queue (2 global batches, in Sinkhorn from step 3) and its
prototype freeze (epoch 0 = steps 1-3), MoCo's queue and shuffle-BN, global BatchNorm
(``sync_batchnorm``) on every backend.

fp32 cells, *teacher-forced*: after every step k the N-rank state (full fp32 parameters as the
optimizer holds them, optimizer state, queue, EMA target, buffers, online head) is saved; then one
process (``single``) replays the run and, after each of its steps, is compared with the N-rank
state of that step and then set to it, so every comparison is one step from the same state. A
free-running comparison over six steps measures chaos, not correctness: a ReLU whose input sits
within rounding of zero switches in one run and not in the other, and two one-process runs that
differ only in summation order were seen to part by 1e-2 on single tensors (SwAV, one batch
permutation in three). The free-running figure is reported beside it.

bf16 cells, free-running: compared with one process of the same precision scheme (``single`` with
``bf16-mixed`` autocast for dp/ddp; DeepSpeed itself on one rank at the same ZeRO stage for
deepspeed, whose bf16 keeps bf16 weights and fp32 masters). The N-rank run must be as close to it
as one-process runs that differ from each other only in reduction order are: the same run on the
global batch with its rows permuted, ``REORDERINGS`` permutations, each the same every step; the
floor is the largest distance between any two of these runs and the plain one (every objective is invariant under
a consistent permutation of the batch, once AMDIM's 5x5 anchor locations, drawn per batch row,
move with their rows: only the order of every batch-dimension sum changes: BatchNorm statistics,
weight gradients, loss means, Sinkhorn's marginals). Its queue rows are permuted back to compare.

Figures: loss |dL| / max(|L|, 1) (SimSiam's loss, a negative cosine, starts near 0); parameters, EMA target, buffers and each optimizer-state kind as
||x_N - x_ref||_2 / ||x_ref||_2 over all tensors of that kind; the queue as the largest absolute
difference of its (unit-norm) rows. Whole-model norms, because per-tensor ratios are dominated by
tensors whose true value is zero: a bias right before a BatchNorm gets no gradient, its rounding
noise is all there is, and Adam turns that noise into steps of up to ``lr``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from scale_ssl.config import load_config
from scale_ssl.methods import METHODS
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_NAMES = ("simclr", "swav", "moco", "byol", "simsiam", "amdim", "cpc_v2")
BACKENDS = ("dp2", "ddp2", "ddp4", "zero1", "zero2", "zero3", "fsdp2")
# DINO (ViT, issue 24) joined with the FSDP column; the older columns predate it.
FSDP_METHOD_NAMES = (*METHOD_NAMES, "dino")
PRECISIONS = ("32", "bf16-mixed")
WORLD = {"dp2": 1, "ddp2": 2, "ddp4": 4, "zero1": 2, "zero2": 2, "zero3": 2, "fsdp2": 2}
GLOBAL_BATCH = 16
BATCHES_PER_EPOCH = 3
EPOCHS = 2
STEPS = BATCHES_PER_EPOCH * EPOCHS
SEED = 7
FIGURES = ("loss", "params", "state", "queue", "ema", "buffers")

# fp32, one step from the same state: parameters within 1e-5 of one process, relative. A step
# adds ~1 ulp (6e-8) of rounding wherever N ranks sum in another order (the gradient all-reduce,
# GlobalBatchNorm's combined moments, LARS norms summed over ZeRO pieces, Sinkhorn's all-reduced
# marginals); measured ~1e-7..3e-6. 1e-5 leaves that a margin and stays far below what the bugs
# this matrix is for do to one step: a missing 1/N doubles the update, per-device BatchNorm
# changes every activation, a per-partition LARS trust ratio changed updates by 17 %, a bf16 EMA
# target rounds at 4e-3.
TOLERANCE_FP32 = {"loss": 1e-5, "params": 1e-5, "ema": 1e-5, "buffers": 1e-5, "queue": 1e-5,
                  # optimizer state holds this step's update alone after the first step (momentum
                  # buffers) or its square (Adam's second moment): the gradient's own ~1e-6 noise.
                  "state": 1e-4}
# ...on every step but one. Now and then a ReLU whose input lies within rounding of zero switches
# in one run and not in the other (the N-rank sums differ from one process's in their last bit);
# that step's gradient then differs in the units fed through it: measured 1e-3..6e-3 on the
# optimizer state and up to 1.2e-5 on the parameters, on one step of a cell, in about one cell of
# three with BatchNorm (MoCo's shuffled key batch, SwAV at ZeRO-3). Each bug this matrix is for
# is systematic: it shows on every step (or every step from the first that uses the part it
# breaks), so the strict bound applies to all steps but the worst, and the worst step stays
# under ONE_STEP_BOUND_FP32, which no such bug meets (a per-partition LARS trust ratio moved the
# state by 17 %, a missing 1/N by 100 %).
ONE_STEP_BOUND_FP32 = {"loss": 1e-4, "params": 1e-4, "ema": 1e-4, "buffers": 1e-4, "queue": 1e-4, "state": 2e-2}
# The EMA target after each step vs tau * previous + (1 - tau) * online fp32 masters recomputed
# from the snapshots (same inputs, torch.lerp): a few ulps at most; a bf16 target is 4e-3 off.
EMA_RECURRENCE_TOL = 1e-6
# bf16: each figure at most BF16_FLOOR_FACTOR times the floor, plus BF16_SLACK for figures whose
# floor is ~0. The floor is the largest distance between any two of REORDERINGS + 1 one-process
# runs that differ only in the order of the batch's rows (the plain run and REORDERINGS
# permutations), i.e. the spread of one-process bf16 runs under reordering, not one sample of it:
# a single pair was measured to under-state it by up to 4x on single figures (one permutation
# left the step-1 loss bitwise equal), which failed dp2-byol and ddp2-simsiam at 4.5x and 4.2x.
# Against this floor the whole matrix (2026-12-06) measured at most 1.8x (ddp2-simsiam's loss).
REORDERINGS = 3
BF16_FLOOR_FACTOR = 4.0
BF16_SLACK = 1e-6

# Sizes only; every optimisation setting comes from the config.
TINY = {
    "simclr": {"arch": "resnet10", "hidden_mlp": 32, "feat_dim": 16},
    "swav": {"arch": "resnet10", "hidden_mlp": 32, "feat_dim": 16, "num_prototypes": 12, "num_crops": [2, 2],
             "queue_length": 2 * GLOBAL_BATCH, "epoch_queue_starts": 0, "freeze_prototypes_epochs": 1},
    "moco": {"base_encoder": "resnet10", "emb_dim": 16, "num_negatives": 2 * GLOBAL_BATCH},
    "byol": {"base_encoder": "resnet10", "projector_hidden_dim": 32, "projector_out_dim": 16},
    "simsiam": {"arch": "resnet10", "hidden_mlp": 32, "feat_dim": 32, "predictor_hidden_dim": 8},
    "amdim": {"encoder_feature_dim": 8, "embedding_fx_dim": 16, "conv_block_depth": 1},
    "cpc_v2": {"encoder_width": 8, "encoder_depth": 1, "target_dim": 16},
    # ViT-mini/7 on 14 px global crops (2 x 2 patches) and 7 px local ones (one patch); no drop
    # path (its masks are drawn per rank); the last layer frozen in epoch 0 (steps 1-3).
    "dino": {"encoder_options": {"image_size": 14, "drop_path_rate": 0.0, "pool": "cls"}, "out_dim": 32,
             "hidden_dim": 16, "bottleneck_dim": 8, "num_crops": [2, 2], "freeze_last_layer": 1},
}
IMAGE_SIZE = {"amdim": 28, "cpc_v2": 28, "dino": 14}  # their encoders' smallest input; ResNets see 16 px
WARMUP_STEPS = 2  # the configs warm up over 10-20 of 200 steps; here 2 of 6, then the cosine
CONFIG_GLOBAL_BATCH = 256  # what every fmnist_cpu.yaml trains with


def module_config(method: str) -> dict:
    """The model section of the method's Fashion-MNIST config, with the sizes above.

    SGD/LARS learning rates are scaled from the config's global batch (256) to this one (16) by
    the linear rule (Adam's do not depend on the batch: the configs say ``plan.lr_rule: none``).
    At the configs' rates a batch of 16 moves the excluded biases and norms by ~30 % per step,
    and then one switched ReLU moves a weight by ~1e-2 of its size."""
    config = load_config(os.path.join(REPO, "configs", method, "fmnist_cpu.yaml"))
    model = OmegaConf.to_container(config.model, resolve=True)
    model.update(TINY[method])
    model["warmup_steps"] = WARMUP_STEPS
    model.pop("warmup_epochs", None)
    if model.get("optimizer") not in ("adam", "adamw"):
        for key in ("learning_rate", "final_lr", "start_lr"):
            if key in model:
                model[key] = model[key] * GLOBAL_BATCH / CONFIG_GLOBAL_BATCH
    return model


def build_module(method: str):
    seed_everything(SEED)  # the same initial weights (and MoCo queue) in every process
    return METHODS[method](**module_config(method))


def global_batches(method: str, permutation: torch.Tensor | None = None) -> list:
    """STEPS global batches ((views...), labels); rows permuted by ``permutation`` if given."""
    g = torch.Generator().manual_seed(SEED + 1)
    size = IMAGE_SIZE.get(method, 16)
    multicrop = method in ("swav", "dino")
    sizes = (size, size, size // 2, size // 2) if multicrop else (size, size)
    out = []
    for _ in range(STEPS):
        base = torch.rand(GLOBAL_BATCH, 1, size, size, generator=g)
        views = []
        for s in sizes:
            view = base if s == size else torch.nn.functional.interpolate(base, size=(s, s), mode="bilinear", align_corners=False)
            views.append((view + 0.2 * torch.randn(view.shape, generator=g)).contiguous())
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
        if permutation is not None:
            views, labels = [v[permutation] for v in views], labels[permutation]
        out.append((list(views) if multicrop else tuple(views), labels))
    return out


def rank_slice(batches: list, rank: int, world: int) -> list:
    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    out = []
    for views, labels in batches:
        sliced = [v[rows] for v in views]
        out.append((sliced if isinstance(views, list) else tuple(sliced), labels[rows]))
    return out


def permutation(index: int = 1) -> torch.Tensor:
    """The ``index``-th reordering of the global batch's rows (1..REORDERINGS)."""
    return torch.randperm(GLOBAL_BATCH, generator=torch.Generator().manual_seed(SEED + 1 + index))


class Epochs:
    """``STEPS`` batches served as ``EPOCHS`` epochs of ``BATCHES_PER_EPOCH`` (the trainer calls
    ``set_epoch``), so SwAV's freeze epoch ends after step 3."""

    def __init__(self, batches: list):
        self.batches = batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __iter__(self):
        start = self.epoch * BATCHES_PER_EPOCH
        return iter(self.batches[start : start + BATCHES_PER_EPOCH])


# -- what one step leaves behind ------------------------------------------------------------------
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def _is_ema(name: str) -> bool:
    return name.startswith(("target_", "momentum_encoder.", "momentum_projection.", "teacher_"))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(trainer, module, loss: torch.Tensor) -> dict:
    """Full fp32 values of everything compared, read the way each backend stores it (for
    DeepSpeed through its public ``safe_get_full_*``, independent of our own master-weight map).
    A collective under N ranks (every rank calls it, in the same order)."""
    strategy = trainer.strategy
    engine = getattr(strategy, "engine", None)
    optimizer = trainer.optimizers[0]
    out = {"step": trainer.global_step, "loss": float(strategy.reduce(loss.detach().float().reshape(1), op="mean")),
           "params": {}, "ema": {}, "state": {}, "buffers": {}, "queue": None, "queue_state": None, "online": None,
           "ema_dtypes": set(), "tau": _ema_rate(module), "prototypes_working": None}
    ema = [(name, p) for name, p in module.named_parameters() if _is_ema(name)]
    if ema:
        # The fp32 values the EMA updates (under DeepSpeed held by the strategy beside the engine,
        # which has no fp32 copy of parameters it does not train), and the working copy the
        # forward pass reads, which must be exactly their cast.
        held = strategy.master_parameters([p for _, p in ema])
        out["ema_working_exact"] = True
        for (name, p), value in zip(ema, held):
            value = _whole(value)
            out["ema"][name] = value.detach().float().cpu().clone()
            out["ema_dtypes"].add(str(value.dtype).replace("torch.", ""))
            working = _working_value(p)
            out["ema_working_exact"] &= torch.equal(working, value.detach().cpu().to(working.dtype).reshape(working.shape))
    for name, p in module.named_parameters():
        if _is_ema(name):
            continue
        out["params"][name] = _full_value(p, engine)
        if p.requires_grad:
            for key in STATE_KEYS:
                value = _full_state(p, key, optimizer, engine)
                if value is not None:
                    out["state"][f"{name}:{key}"] = value
    for name, b in module.named_buffers():
        if b.is_floating_point():
            out["buffers"][name] = b.detach().float().cpu().clone()
    queue = getattr(module, "queue", None)
    if queue is not None and hasattr(queue, "logical_state"):  # SwAV: one logical queue over the ranks
        state = queue.logical_state(module.collective)
        out["queue_state"] = state
        out["queue"] = state["embeddings"][:, : state["filled"]].clone() if state else None
    elif queue is not None:  # MoCo: identical on every rank
        out["queue_state"] = queue.state_dict()
        out["queue"] = out["queue_state"]["keys"].float()
    prototypes = getattr(module, "prototypes", None)
    if prototypes is not None:  # the module's working copy (bf16 under DeepSpeed bf16)
        out["prototypes_working"] = _working_value(prototypes.weight)
    evaluator = getattr(module, "online_evaluator", None)
    if evaluator is not None and evaluator.head is not None:
        out["online"] = evaluator.state_dict()
        for name, p in evaluator.head.named_parameters():
            out["params"][f"online_head.{name}"] = p.detach().float().cpu().clone()
    return out


def _full_value(p, engine) -> torch.Tensor:
    if engine is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p)
        if value is not None:
            return value.detach().float().cpu().clone()
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().float().cpu().clone()
    return _whole(p.detach()).float().cpu().clone()


def _working_value(p) -> torch.Tensor:
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().cpu().clone()
    return _whole(p.detach()).cpu().clone()


def _ema_rate(module) -> float | None:
    """The tau of the EMA update this step made (BYOL's cosine schedule, MoCo's fixed m)."""
    if hasattr(module, "current_tau"):
        return float(module.current_tau)
    if hasattr(module, "current_momentum"):  # DINO's teacher
        return float(module.current_momentum)
    if "encoder_momentum" in getattr(module, "hparams", {}):
        return float(module.hparams["encoder_momentum"])
    return None


ONLINE_OF = {"target_encoder.": "encoder.", "target_projector.": "projector.", "momentum_encoder.": "encoder.",
             "momentum_projection.": "projection.", "teacher_encoder.": "encoder.", "teacher_head.": "head."}


def ema_recurrence_error(previous: dict, taken: dict) -> float:
    """How far the EMA target after a step is from tau * previous target + (1 - tau) * the
    online network's fp32 master weights after that step, computed here in fp32 (relative)."""
    tau, worst_error = taken["tau"], 0.0
    for name, target in taken["ema"].items():
        prefix = next(p for p in ONLINE_OF if name.startswith(p))
        online = taken["params"][ONLINE_OF[prefix] + name[len(prefix):]]
        expected = torch.lerp(previous[name], online, 1.0 - tau)
        error = (target - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
        worst_error = max(worst_error, error)
    return worst_error


def _full_state(p, key, optimizer, engine) -> torch.Tensor | None:
    if engine is not None and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
        if key not in _deepspeed_state_keys(engine):
            return None  # every rank decides alike (the reads below are collectives)
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_full_optimizer_state

            value = safe_get_full_optimizer_state(p, key)
        else:
            value = _stage12_state(p, key, engine)
        return None if value is None else value.detach().float().cpu().clone()
    value = optimizer.state.get(p, {}).get(key)
    return _whole(value.detach()).float().cpu().clone() if isinstance(value, torch.Tensor) else None


def _stage12_state(p, key, engine) -> torch.Tensor:
    """ZeRO-1/2: ``p``'s optimizer state from the flat partitions, by DeepSpeed's own fragment
    addresses. (Its ``safe_get_full_optimizer_state`` links a group's state on the first step of
    group 0, before groups 1.. have any, and then finds none for them.)"""
    import torch.distributed as dist

    wrapper = engine.optimizer
    flats = getattr(wrapper, "single_partition_of_fp32_groups", None) or wrapper.fp32_groups_flat_partition
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mapping = p._hp_mapping
    if mapping is not None:
        flat = flats[mapping.param_group_index]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(engine.basic_optimizer.state[flat][key].narrow(0, hp.start, hp.numel))
    dist.all_reduce(full)
    return full.view(p.shape)


def _deepspeed_state_keys(engine) -> set[str]:
    """The per-element state keys of the torch optimizer DeepSpeed steps (same on every rank)."""
    optimizer = engine.basic_optimizer
    keys = set()
    for flat, state in optimizer.state.items():
        keys |= {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == flat.shape}
    return keys


class Recorder(Callback):
    """After every optimizer step (and after the module's own EMA/queue hooks): a snapshot,
    handed to ``sink`` on rank 0."""

    def __init__(self, sink):
        self.sink = sink

    def on_train_start(self, trainer, module):
        # SwAV's prototypes once the engine exists (DeepSpeed bf16 makes its fp32 masters from
        # the bf16 module): what "unchanged through the freeze epoch" compares with.
        prototypes = getattr(module, "prototypes", None)
        if prototypes is not None:
            initial = (_full_value(prototypes.weight, getattr(trainer.strategy, "engine", None)),
                       _working_value(prototypes.weight))
            if trainer.is_global_zero and hasattr(self.sink, "initial_prototypes"):
                self.sink.initial_prototypes = initial

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        taken = snapshot(trainer, module, loss)
        if trainer.is_global_zero:
            self.sink(taken)


def train(method: str, strategy, precision: str, batches: list, callbacks: list, permuted: torch.Tensor | None = None,
          module=None):
    """Fit ``build_module(method)`` (or ``module``, built by it elsewhere: XLA:CPU device threads
    share one host RNG and cannot each build it) for ``STEPS`` steps."""
    module = build_module(method) if module is None else module
    if permuted is not None and method == "amdim":
        _permute_anchor_draws(module.contrastive_task, permuted)
    trainer = Trainer(strategy=strategy, max_epochs=EPOCHS, precision=precision, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0, seed=SEED,
                      callbacks=callbacks)
    try:
        trainer.fit(module, Epochs(batches))
    finally:
        strategy.teardown()  # dp's part threads; a process group made by the caller stays
    if trainer.global_step != STEPS:
        raise AssertionError(f"{method}: ran {trainer.global_step} steps, expected {STEPS}")
    return module


def _permute_anchor_draws(task, perm: torch.Tensor) -> None:
    """AMDIM draws its 5x5 anchor locations per batch row; on a permuted batch, give row i the
    location its image had in the plain run, so the objective is the same and only the order of
    the sums changes."""
    draw = task._draw_locations

    def permuted(b, world_b, offset, sizes, device):
        return [locations[perm.to(locations.device)] for locations in draw(b, world_b, offset, sizes, device)]

    task._draw_locations = permuted


# -- snapshots on disk -----------------------------------------------------------------------------
def save_sink(directory: str):
    os.makedirs(directory, exist_ok=True)

    def sink(taken):
        torch.save(taken, os.path.join(directory, f"step{taken['step']}.pt"))

    return sink


def load_step(directory: str, step: int) -> dict:
    return torch.load(os.path.join(directory, f"step{step}.pt"), weights_only=False)


# -- comparing -------------------------------------------------------------------------------------
def _relative_norm(a: dict, b: dict, what: str) -> float:
    if set(a) != set(b):
        raise AssertionError(f"{what}: different tensors: {sorted(set(a) ^ set(b))[:6]}")
    if not b:
        return 0.0
    for name in b:
        if a[name].shape != b[name].shape:
            raise AssertionError(f"{what} {name}: shape {tuple(a[name].shape)} vs {tuple(b[name].shape)}")
    diff = math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b))
    scale = math.sqrt(sum(float((b[n].double() ** 2).sum()) for n in b))
    return 0.0 if diff == 0 else (diff / scale if scale > 0 else math.inf)


DEAD_GRADIENT = 1e-5


def gradient_free(reference: dict) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic: the RMS of their first-moment
    optimizer state (momentum buffer, Adam's exp_avg) is below ``DEAD_GRADIENT`` of the largest.
    Measured: such tensors sit at 1e-7 of the largest, every other one above 1e-4 (AMDIM's
    embedding biases and SimSiam's last projector bias feed a BatchNorm that cancels them; CPC's
    target bias shifts every score of a softmax alike). What they hold is rounding noise, which
    Adam normalises into steps of up to lr: a difference between runs there measures nothing."""
    rms = {k.rsplit(":", 1)[0]: float(v.double().pow(2).mean().sqrt()) for k, v in reference["state"].items()
           if k.endswith((":momentum_buffer", ":exp_avg")) and v.numel()}
    if not rms:
        return set()
    largest = max(rms.values())
    return {name for name, value in rms.items() if value < DEAD_GRADIENT * largest}


def compare(taken: dict, reference: dict, unpermute_queue=None) -> dict:
    """The figures of one step (see the module docstring)."""
    dead = gradient_free(reference)
    if dead:
        def alive(values: dict) -> dict:
            return {k: v for k, v in values.items() if k.rsplit(":", 1)[0] not in dead}

        taken = {**taken, "params": alive(taken["params"]), "state": alive(taken["state"])}
        reference = {**reference, "params": alive(reference["params"]), "state": alive(reference["state"])}
    out = {"loss": abs(taken["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1.0),
           "dead": dead,
           "params": _relative_norm(taken["params"], reference["params"], "parameters"),
           "ema": _relative_norm(taken["ema"], reference["ema"], "EMA target") if reference["ema"] else None,
           "buffers": _relative_norm(taken["buffers"], reference["buffers"], "buffers") if reference["buffers"] else None,
           "state": None, "queue": None}
    if set(taken["state"]) != set(reference["state"]):
        missing = sorted(set(taken["state"]) ^ set(reference["state"]))
        # A parameter held out of the step (SwAV's frozen prototypes) has no state on one process
        # and zeros in a ZeRO partition: the same optimizer behaviour. Anything else is an error.
        extra = [k for k in missing if k in taken["state"] and not taken["state"][k].any()]
        if extra != missing:
            raise AssertionError(f"optimizer state: different entries {missing[:6]}")
        taken = {**taken, "state": {k: v for k, v in taken["state"].items() if k in reference["state"]}}
    keys = sorted({k.rsplit(":", 1)[1] for k in reference["state"]})
    if keys:
        out["state"] = max(_relative_norm({k: v for k, v in taken["state"].items() if k.endswith(":" + key)},
                                          {k: v for k, v in reference["state"].items() if k.endswith(":" + key)},
                                          f"optimizer state {key}") for key in keys)
    queue, ref_queue = taken.get("queue"), reference.get("queue")
    if ref_queue is not None or queue is not None:
        if queue is None or ref_queue is None or queue.shape != ref_queue.shape:
            raise AssertionError(f"queue: {None if queue is None else tuple(queue.shape)} vs "
                                 f"{None if ref_queue is None else tuple(ref_queue.shape)}")
        if unpermute_queue is not None:
            queue = unpermute_queue(queue, taken["step"])
        out["queue"] = (queue.float() - ref_queue.float()).abs().max().item() if queue.numel() else 0.0
    return out


def worst(per_step: list[dict], spare: int = 0) -> dict:
    """Worst value of each figure over the steps, leaving out the ``spare`` worst steps (None
    where a figure does not apply), and the gradient-free parameters left out on any step."""
    out = {}
    for figure in FIGURES:
        values = sorted(s[figure] for s in per_step if s.get(figure) is not None)
        out[figure] = values[-1 - spare] if len(values) > spare else None
    out["dead"] = sorted(set().union(*(s.get("dead", set()) for s in per_step)))
    return out


def queue_unpermuter(method: str, perm: torch.Tensor):
    """The queue of a run on permuted batches with its rows put back in the plain run's order."""
    inverse = torch.argsort(perm)
    b = GLOBAL_BATCH

    def swav(queue, step):  # (num_assign, filled, dim), newest global batch first
        blocks = queue.view(queue.shape[0], -1, b, queue.shape[-1])
        return blocks[:, :, inverse].reshape(queue.shape)

    def moco(queue, step):  # (K, dim); block j holds the keys of steps j, j + K/B, ...
        out = queue.clone()
        for block in range(min(step, queue.shape[0] // b)):
            out[block * b : (block + 1) * b] = queue[block * b : (block + 1) * b][inverse]
        return out

    return {"swav": swav, "moco": moco}.get(method)


# -- teacher forcing ---------------------------------------------------------------------------------
class TeacherForcing(Callback):
    """On one process: after each step, compare with the N-rank run's state after the same step,
    then take that state over, so the next step starts where the N-rank run's did."""

    def __init__(self, states: str):
        self.states = states
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        mine = snapshot(trainer, module, loss)
        theirs = load_step(self.states, trainer.global_step)
        self.steps.append(compare(theirs, mine))
        load_state(module, trainer.optimizers[0], theirs)


def load_state(module, optimizer, taken: dict) -> None:
    """Set a one-process module, its optimizer and its queue to a snapshot."""
    float_keys = {k for k, v in module.state_dict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    values = {**taken["params"], **taken["ema"], **taken["buffers"]}
    values = {k: v for k, v in values.items() if not k.startswith("online_head.")}
    if set(values) != float_keys:
        raise AssertionError(f"snapshot and module differ in {sorted(set(values) ^ float_keys)[:6]}")
    module.load_state_dict(values, strict=False)
    params = dict(module.named_parameters())
    for key, value in taken["state"].items():
        name, slot = key.rsplit(":", 1)
        state = optimizer.state[params[name]]
        if slot in state:
            state[slot].copy_(value)
        elif value.any():
            raise AssertionError(f"{key}: state the one-process optimizer does not have")
    queue = getattr(module, "queue", None)
    if queue is not None and hasattr(queue, "load_logical_state"):
        if taken["queue_state"]:
            queue.load_logical_state(taken["queue_state"])
    elif queue is not None:
        queue.load_state_dict(taken["queue_state"])
    if taken["online"] is not None:
        module.online_evaluator.load_state_dict(taken["online"])


def forced_replay(method: str, states: str, dtype: torch.dtype = torch.float32) -> list[dict]:
    """``TeacherForcing`` by one process whose module and batches are ``dtype``: the figures of
    each step against the snapshots in ``states``."""
    def cast(views):
        return type(views)(v.to(dtype) for v in views)

    forcing = TeacherForcing(states)
    batches = [(cast(views), labels) for views, labels in global_batches(method)]
    train(method, strategy_for("single", 1), "32", batches, [forcing], module=build_module(method).to(dtype))
    return forcing.steps


def excess(figures: dict) -> float:
    """How far a step's figures are over the strict fp32 tolerance (the largest ratio; <= 1: within)."""
    return max(figures[k] / TOLERANCE_FP32[k] for k in FIGURES if figures.get(k) is not None)


def _within_fp32_bounds(steps: list[dict]) -> bool:
    typical, outlier = worst(steps, spare=1), worst(steps)
    return (all(typical[k] is None or typical[k] <= TOLERANCE_FP32[k] for k in FIGURES)
            and all(outlier[k] is None or outlier[k] <= ONE_STEP_BOUND_FP32[k] for k in FIGURES))


def teacher_forced(method: str, states: str) -> tuple[dict, dict, list[int]]:
    """One process replaying a run step by step from the states saved in ``states``: the figures
    of every step but the worst one, of the worst one (see ``TOLERANCE_FP32``), and the steps
    settled by float64.

    The float64 arbiter: the N ranks sum gradients, BatchNorm moments and Sinkhorn marginals in
    another order than one process, so activations differ by ~1e-7, and a ReLU whose input is a
    rounding-level tie can open in one run and stay shut in the other. Then one step's update
    differs in a few entries (optimizer state ~1e-3 relative) although both runs are right to
    rounding. Where the fp32 replay is outside the bounds, each step is replayed again from the
    same state in float64 and counts against whichever one-process run, fp32 or float64, the
    N-rank step is closer to; a step counted against float64 while outside the tolerance against
    fp32 is reported as settled by float64 (the fp32 one-process run switched a gate, the N-rank
    run did not). A bug cannot hide behind it: it moves the N-rank run away from both references.
    """
    steps = forced_replay(method, states, torch.float32)
    settled = []
    if not _within_fp32_bounds(steps):
        arbiter = forced_replay(method, states, torch.float64)
        chosen = []
        for number, (fp32, fp64) in enumerate(zip(steps, arbiter), start=1):
            if excess(fp64) < excess(fp32):
                chosen.append(fp64)
                if excess(fp32) > 1:
                    settled.append(number)
            else:
                chosen.append(fp32)
        steps = chosen
    return worst(steps, spare=1), worst(steps), settled


# -- the cells -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    method: str
    backend: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.method}-{'fp32' if self.precision == '32' else 'bf16'}"

    @property
    def deepspeed(self) -> bool:
        return self.backend.startswith("zero")

    @property
    def engine_reference(self) -> bool:
        """bf16 cells compared with the same engine on one rank (its own bf16 scheme)."""
        return self.deepspeed or self.backend.startswith("fsdp")

    @property
    def reference(self) -> str:
        """The one-process run a bf16 cell is compared with (fp32 cells: ``single-fp32``)."""
        if self.precision == "32":
            return "single-fp32"
        return f"{self.backend}-bf16" if self.engine_reference else "single-bf16"


ALL_CELLS = [Cell(m, b, p) for p in PRECISIONS for b in BACKENDS
             for m in (FSDP_METHOD_NAMES if b.startswith("fsdp") else METHOD_NAMES)]
# cell id -> a phrase of the start-up error that refuses it (none: every cell trains).
EXPECTED_REFUSALS: dict[str, str] = {}


@dataclass
class Result:
    cell: Cell
    figures: dict = field(default_factory=dict)  # fp32: teacher-forced, all steps but the worst; bf16: free-running
    outlier: dict | None = None  # fp32: the worst teacher-forced step
    free_running: dict | None = None  # fp32: the six-step free run against the one-process run
    floor: dict | None = None  # bf16: the one-process reordering floor
    refused: str | None = None
    frozen_prototypes_bitwise: bool | None = None  # SwAV: unchanged through the freeze epoch
    ema_recurrence: float | None = None  # BYOL/MoCo: distance of the target from its fp32 EMA recurrence
    ema_dtypes: list | None = None
    settled_by_float64: list | None = None  # fp32: steps counted against the float64 replay (teacher_forced)
    seconds: float = 0.0


def strategy_for(backend: str, world: int, precision: str = "32"):
    from scale_ssl.strategies import DDPStrategy, DeepSpeedStrategy, DPStrategy, FSDPStrategy, SingleDeviceStrategy

    if backend.startswith("fsdp"):
        return FSDPStrategy(accelerator="cpu", precision=precision, sync_batchnorm=True)
    if backend == "single":
        return SingleDeviceStrategy(accelerator="cpu")
    if backend.startswith("dp"):
        return DPStrategy(accelerator="cpu", devices=int(backend[2:]), sync_batchnorm=True)
    if backend.startswith("ddp"):
        return DDPStrategy(accelerator="cpu", sync_batchnorm=True)
    return DeepSpeedStrategy(accelerator="cpu", zero_stage=int(backend[4:]), micro_batch_size=GLOBAL_BATCH // world,
                             sync_batchnorm=True)


class _Run:
    """Rank 0's sink during a cell: keeps the free-running figures against ``reference`` and,
    for fp32, saves every state for teacher forcing."""

    def __init__(self, method: str, reference: str, states: str | None):
        self.reference = reference
        self.save = save_sink(states) if states else None
        self.steps: list[dict] = []
        self.prototypes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (master, working copy)
        self.initial_prototypes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ema_errors: list[float] = []
        self.ema_dtypes: set[str] = set()
        self._previous_ema = None
        if method in ("byol", "moco", "dino"):
            initial = build_module(method)
            self._previous_ema = {n: p.detach().float() for n, p in initial.named_parameters() if _is_ema(n)}

    def __call__(self, taken: dict) -> None:
        self.steps.append(compare(taken, load_step(self.reference, taken["step"])))
        if taken["prototypes_working"] is not None:
            self.prototypes.append((taken["params"]["prototypes.weight"], taken["prototypes_working"]))
        if self._previous_ema is not None:
            self.ema_errors.append(ema_recurrence_error(self._previous_ema, taken))
            if not taken["ema_working_exact"]:
                self.ema_errors.append(math.inf)  # the forward pass would read a stale target
            self._previous_ema = taken["ema"]
            self.ema_dtypes |= taken["ema_dtypes"]
        if self.save is not None:
            self.save(taken)


def run_cell(cell: Cell, rank: int, world: int, root: str) -> Result | None:
    """Train ``cell`` on this rank of ``world``; rank 0 returns its ``Result`` (fp32 figures are
    filled in later by ``finish_cell``, in a process without a process group)."""
    started = time.perf_counter()
    states = os.path.join(root, "states", cell.id) if cell.precision == "32" else None
    run = _Run(cell.method, os.path.join(root, "refs", f"{cell.method}-{cell.reference}"), states)
    batches = global_batches(cell.method)
    if world > 1:
        batches = rank_slice(batches, rank, world)
    result = Result(cell)
    try:
        train(cell.method, strategy_for(cell.backend, world, cell.precision), cell.precision, batches, [Recorder(run)])
    except ValueError as err:
        if cell.id not in EXPECTED_REFUSALS:
            raise
        result.refused = str(err)
        return result if rank == 0 else None
    if rank != 0:
        return None
    if cell.precision == "32":
        result.free_running = worst(run.steps)
    else:
        result.figures = worst(run.steps)
    result.frozen_prototypes_bitwise = _frozen_bitwise(run.initial_prototypes, run.prototypes)
    if run.ema_errors:
        result.ema_recurrence = max(run.ema_errors)
        result.ema_dtypes = sorted(run.ema_dtypes)
    result.seconds = time.perf_counter() - started
    return result


def finish_cell(result: Result, root: str) -> Result:
    """fp32: the teacher-forced comparison from the saved states (then deleted); bf16: the floor."""
    cell = result.cell
    if result.refused is not None:
        return result
    if cell.precision == "32":
        started = time.perf_counter()
        states = os.path.join(root, "states", cell.id)
        result.figures, result.outlier, result.settled_by_float64 = teacher_forced(cell.method, states)
        shutil.rmtree(states, ignore_errors=True)
        result.seconds += time.perf_counter() - started
    else:
        result.floor = floor_figures(cell.method, cell.reference, root)
    return result


def _frozen_bitwise(initial: tuple | None, prototypes: list[tuple[torch.Tensor, torch.Tensor]]) -> bool | None:
    """SwAV: after every step of the freeze epoch the prototypes, as the optimizer holds them
    and as the module holds them, equal their values at the start bitwise; and they train after."""
    if not prototypes:
        return None
    master0, working0 = initial
    frozen = prototypes[:BATCHES_PER_EPOCH]
    unchanged = all(torch.equal(master, master0) and torch.equal(working, working0) for master, working in frozen)
    return unchanged and not torch.equal(prototypes[-1][0], master0)


# -- one-process references -----------------------------------------------------------------------
def reference_jobs(cells: list) -> list[tuple[str, str]]:
    """(method, reference kind) runs the cells need: the plain run, and for bf16 its reorderings."""
    jobs = []
    for cell in cells:
        kinds = [cell.reference]
        if cell.precision != "32":
            kinds += [f"{cell.reference}-perm{i}" for i in range(1, REORDERINGS + 1)]
        jobs += [(cell.method, k) for k in kinds if (cell.method, k) not in jobs]
    return jobs


def run_reference(method: str, kind: str, root: str) -> None:
    """One process on the whole global batch. ``kind``: ``<backend>-<fp32|bf16>[-perm<i>]``."""
    backend, precision, *variant = kind.split("-")
    directory = os.path.join(root, "refs", f"{method}-{kind}")
    if os.path.isfile(os.path.join(directory, f"step{STEPS}.pt")):
        return
    perm = permutation(int(variant[0].removeprefix("perm"))) if variant else None
    precision = "32" if precision == "fp32" else "bf16-mixed"
    train(method, strategy_for(backend, 1, precision), precision,
          global_batches(method, perm), [Recorder(save_sink(directory))], permuted=perm)


def floor_figures(method: str, reference: str, root: str) -> dict:
    """The reordering floor: the worst figure between any two one-process runs of ``reference``
    that differ only in the order of the batch rows (queues put back in the plain order first)."""
    runs = [(os.path.join(root, "refs", f"{method}-{reference}"), None)]
    runs += [(os.path.join(root, "refs", f"{method}-{reference}-perm{i}"), queue_unpermuter(method, permutation(i)))
             for i in range(1, REORDERINGS + 1)]

    def in_plain_order(directory: str, unpermute, step: int) -> dict:
        state = load_step(directory, step)
        if unpermute is not None and state.get("queue") is not None:
            state["queue"] = unpermute(state["queue"], step)
        return state

    per_step = []
    for step in range(1, STEPS + 1):
        states = [in_plain_order(directory, unpermute, step) for directory, unpermute in runs]
        per_step += [compare(states[i], states[j]) for i in range(len(states)) for j in range(i + 1, len(states))]
    return worst(per_step)


def problems(result: Result) -> list[str]:
    """What is wrong with a measured cell ([] when it is equal within its tolerance)."""
    if result.refused is not None:
        expected = EXPECTED_REFUSALS.get(result.cell.id)
        return [] if expected and expected in result.refused else [f"refused: {result.refused}"]
    found = []
    if result.cell.precision == "32":
        limits = TOLERANCE_FP32
        for figure, limit in ONE_STEP_BOUND_FP32.items():
            value = result.outlier.get(figure)
            if value is not None and not value <= limit:
                found.append(f"{figure} differs by {value:.3g} on its worst step > {limit:.3g}")
    else:
        limits = {k: BF16_FLOOR_FACTOR * result.floor[k] + BF16_SLACK for k in FIGURES if result.floor.get(k) is not None}
    for figure, limit in limits.items():
        value = result.figures.get(figure)
        if value is not None and not value <= limit:
            found.append(f"{figure} differs by {value:.3g} > {limit:.3g}")
    if result.frozen_prototypes_bitwise is False:
        found.append("SwAV's prototypes changed during the freeze epoch (or did not train after it)")
    if result.ema_recurrence is not None and not result.ema_recurrence <= EMA_RECURRENCE_TOL:
        found.append(f"EMA target is {result.ema_recurrence:.3g} from its fp32 update from the master weights")
    if result.ema_dtypes is not None and result.ema_dtypes != ["float32"]:
        found.append(f"EMA target held in {result.ema_dtypes}, not float32")
    return found


# -- launches: one per backend ---------------------------------------------------------------------------
LAUNCH = {"dp2": "dp2", "ddp2": "ddp2", "ddp4": "ddp4", "zero1": "deepspeed", "zero2": "deepspeed", "zero3": "deepspeed",
          "fsdp2": "fsdp2"}


def ranks_run_cells(rank: int, world: int, cells: list, root: str, deepspeed_checks: tuple = ()) -> tuple:
    """A spawned rank: one process group for all its cells (a second rendezvous on the same port
    can stall gloo), every cell in turn, then the DeepSpeed fix checks of the given stages."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = [run_cell(cell, rank, world, root) for cell in cells]
    checks = {}
    if deepspeed_checks:
        from tests._deepspeed_checks import check_stage

        checks = {stage: check_stage(rank, world, stage, root) for stage in deepspeed_checks}
    return results, checks


def ranks_run_references(rank: int, world: int, jobs: list, root: str) -> list:
    """DeepSpeed's one-process references: a world of one, still with a process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for method, kind in jobs:
        run_reference(method, kind, root)
    return []
