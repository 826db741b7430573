"""What tests/test_fsdp.py runs on its gloo ranks: a tiny SimCLR (the equivalence matrix's
ResNet-10 recipe: LARS, global BatchNorm, warmup-cosine) trained under ``strategy=fsdp``."""

from __future__ import annotations

import os

import torch

from scale_ssl.strategies import FSDPStrategy, SingleDeviceStrategy
from scale_ssl.trainer import Callback, Trainer
from tests import _equivalence as E

GLOBAL = 12  # divisible by 1, 2, 3 and 4 ranks
STEPS = 4


def global_batches(count: int = STEPS + 2, rows: int = GLOBAL) -> list:
    """``count`` batches: two more than the steps, so the epoch is not over at the last step and
    the step-2 checkpoint stays the ``.prev`` of the step-4 one."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(count):
        base = torch.rand(rows, 1, 16, 16, generator=g)
        views = tuple((base + 0.2 * torch.randn(base.shape, generator=g)).contiguous() for _ in range(2))
        out.append((views, torch.randint(0, 10, (rows,), generator=g)))
    return out


def rank_rows(batches: list, rank: int, world: int) -> list:
    b = batches[0][1].shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)
    return [(tuple(v[rows] for v in views), labels[rows]) for views, labels in batches]


class OneEpoch:
    def __init__(self, batches: list):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class GradientsSeen(Callback):
    """After each micro-batch that is not the last of an accumulation window: whether any
    parameter holds a (sharded, reduced) gradient. FSDP without sync keeps them unsharded inside."""

    def __init__(self, accumulate: int):
        self.accumulate, self.seen = accumulate, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.accumulate:
            self.seen.append(any(p.grad is not None for p in module.parameters()))


def fit(strategy, batches: list, root: str, steps: int = STEPS, ckpt: str | None = None, accumulate: int = 1,
        clip: float | None = None, every: int = 0, callbacks=(), optimizer: str | None = None):
    module = E.build_module("simclr")
    if optimizer is not None:  # LARS is blind to a gradient's scale: clipping is checked under SGD
        from scale_ssl.trainer.seed import seed_everything

        seed_everything(E.SEED)
        module = type(module)(**{**E.module_config("simclr"), "optimizer": optimizer})
    trainer = Trainer(strategy=strategy, max_steps=steps, precision="32", logger=False, enable_progress_bar=False,
                      enable_checkpointing=True, checkpoint_every_n_steps=every, default_root_dir=root,
                      accumulate_grad_batches=accumulate, gradient_clip_val=clip, num_sanity_val_steps=0,
                      log_every_n_steps=1, seed=E.SEED, callbacks=list(callbacks))
    trainer.fit(module, OneEpoch(batches), ckpt_path=ckpt)
    return module, trainer


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def state_of(module, trainer) -> dict:
    """Full parameters, buffers and momentum buffers (collectives under fsdp: every rank calls)."""
    out = {f"param:{n}": whole(p) for n, p in module.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()})
    names = {id(p): n for n, p in module.named_parameters()}
    for p, state in trainer.optimizers[0].state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state:{names[id(p)]}:{key}"] = whole(value)
    return out


def fsdp(**options) -> FSDPStrategy:
    return FSDPStrategy(accelerator="cpu", **options)


def two_rank_checks(rank: int, world: int, root: str) -> dict:
    """Every 2-rank check of test_fsdp.py in one launch; rank 0 returns the states."""
    batches = global_batches()
    mine = rank_rows(batches, rank, world)
    out = {}
    module, trainer = fit(fsdp(), mine, os.path.join(root, "straight"), every=2)
    out["straight"] = state_of(module, trainer)
    from scale_ssl.checkpoint import load_checkpoint_file

    out["prev_step"] = load_checkpoint_file(os.path.join(root, "straight", "checkpoints", "last.ckpt.prev",
                                                         "fsdp_meta.ckpt"))["global_step"]
    # last.ckpt holds step 4, its .prev step 2: resume from step 2, same world.
    prev = os.path.join(root, "straight", "checkpoints", "last.ckpt.prev")
    module, trainer = fit(fsdp(), mine, os.path.join(root, "resumed"), ckpt=prev)
    out["resumed"] = state_of(module, trainer)
    # Accumulation: 2 micro-batches of 6 global rows (3 per rank) per step.
    micro = rank_rows(global_batches(2 * STEPS, GLOBAL // 2), rank, world)
    seen = GradientsSeen(2)
    module, trainer = fit(fsdp(), micro, os.path.join(root, "accumulate"), accumulate=2, callbacks=[seen])
    out["accumulate"], out["accumulate_grads_seen"] = state_of(module, trainer), seen.seen
    module, trainer = fit(fsdp(), mine, os.path.join(root, "clip"), clip=0.05, optimizer="sgd")
    out["clip"] = state_of(module, trainer)
    module, trainer = fit(fsdp(), mine, os.path.join(root, "noclip"), optimizer="sgd")
    out["sgd_unclipped"] = state_of(module, trainer)
    module, trainer = fit(fsdp(cpu_offload=True), mine, os.path.join(root, "offload"))
    out["offload"] = state_of(module, trainer)
    module, trainer = fit(fsdp(reshard_after_forward=False), mine, os.path.join(root, "keep"))
    out["keep_gathered"] = state_of(module, trainer)
    return out if rank == 0 else None


def other_world_resume(rank: int, world: int, root: str) -> dict:
    """The 2-rank step-2 checkpoint loaded on ``world`` ranks: right after loading (no step),
    then trained to step 4."""
    prev = os.path.join(root, "straight", "checkpoints", "last.ckpt.prev")
    mine = rank_rows(global_batches(), rank, world)
    module, trainer = fit(fsdp(), mine, os.path.join(root, f"w{world}-loaded"), steps=2, ckpt=prev)
    loaded = state_of(module, trainer)
    module, trainer = fit(fsdp(), mine, os.path.join(root, f"w{world}-continued"), ckpt=prev)
    continued = state_of(module, trainer)  # a collective: every rank
    return {"loaded": loaded, "continued": continued} if rank == 0 else None


def one_process(root: str, accumulate: bool = False, clip: float | None = None) -> dict:
    if accumulate:
        module, trainer = fit(SingleDeviceStrategy(accelerator="cpu"), global_batches(2 * STEPS, GLOBAL // 2), root,
                              accumulate=2)
    else:
        module, trainer = fit(SingleDeviceStrategy(accelerator="cpu"), global_batches(), root, clip=clip,
                              optimizer="sgd" if clip is not None else None)
    return state_of(module, trainer)


def relative(a: dict, b: dict, kind: str = "param:") -> float:
    keys = [k for k in b if k.startswith(kind)]
    assert keys and set(keys) == {k for k in a if k.startswith(kind)}
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    scale = sum(float(b[k].double().pow(2).sum()) for k in keys) ** 0.5
    return diff / scale
