"""Focused checks of the DeepSpeed fixes on small modules (fast in bf16 too; the real recipes are
in the equivalence matrix), run inside the matrix's DeepSpeed launch on 2 gloo ranks.

Each check returns plain figures; ``tests/test_deepspeed_fixes.py`` asserts on them. Values are
read through DeepSpeed's public ``safe_get_full_*`` wherever DeepSpeed holds them, so a mistake in
our own master-weight map cannot hide itself.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.methods.ema import ema_step, frozen_copy
from scale_ssl.optim import LARS
from scale_ssl.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from scale_ssl.trainer import Callback, SSLModule, Trainer

GLOBAL_BATCH = 16


class Towers(SSLModule):
    """An online MLP whose layers differ in size and norm (so ZeRO's partitions cut through
    them and per-partition trust ratios would differ from per-layer ones), a ``head`` that can be
    held out of the first epoch (SwAV's prototypes), and an EMA target of the online MLP."""

    def __init__(self, optimizer: str = "lars", freeze_head_epochs: int = 0, ema: bool = True, tau: float = 0.9):
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Sequential(nn.Linear(8, 48, bias=False), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 24))
        with torch.no_grad():
            self.online[3].weight.mul_(20.0)  # norms 20x apart: one shared trust ratio would be far off
        self.head = nn.Linear(24, 12, bias=False)
        self.target = frozen_copy(self.online) if ema else None
        self.optimizer_name, self.freeze_head_epochs, self.tau = optimizer, freeze_head_epochs, tau

    def ema_target_modules(self):
        return [self.target] if self.target is not None else []

    def training_step(self, batch, batch_idx):
        x = batch
        z = self.head(self.online(x))
        loss = (z - 0.5).pow(2).mean()
        if self.target is not None:
            with torch.no_grad():
                t = self.target(x)
            loss = loss + F.mse_loss(self.online(x).float(), t.float())
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.current_epoch < self.freeze_head_epochs:
            self.skip_update(self.head.parameters())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.target is not None:
            ema_step(self, self.target, self.online, self.tau)

    def configure_optimizers(self):
        trained = [p for n, p in self.named_parameters() if not n.startswith("target.")]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(trained, lr=1e-2)
        return LARS(trained, lr=1.0, momentum=0.9, weight_decay=1e-4, eta=0.02)


def batches(rank: int, world: int, steps: int) -> list:
    g = torch.Generator().manual_seed(3)
    out = []
    b = GLOBAL_BATCH // world
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 8, generator=g)
        out.append(x[rank * b : (rank + 1) * b])
    return out


class TwoEpochs:
    def __init__(self, items: list):
        self.items, self.epoch = items, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items) // 2

    def __iter__(self):
        half = len(self.items) // 2
        return iter(self.items[self.epoch * half : (self.epoch + 1) * half])


def _full(p):
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return (value if value is not None else p).detach().float().cpu().clone()


def _working(p):
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().cpu().clone()
    return p.detach().cpu().clone()


def _momentum(p, engine):
    """``p``'s momentum buffer from the flat partitions (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "ds_id"):
        return safe_get_full_optimizer_state(p, "momentum_buffer").cpu()
    import torch.distributed as dist

    from tests._equivalence import _stage12_state

    if not any("momentum_buffer" in s for s in engine.basic_optimizer.state.values()):
        full = torch.zeros(p.numel())
        dist.all_reduce(full)
        return full.view(p.shape)
    return _stage12_state(p, "momentum_buffer", engine).cpu()


def _trainer(strategy, max_epochs=2, precision="32", callbacks=(), root=None, max_steps=-1):
    return Trainer(strategy=strategy, max_epochs=max_epochs, max_steps=max_steps, precision=precision, logger=False,
                   enable_progress_bar=False, enable_checkpointing=root is not None, default_root_dir=root or "runs/unused",
                   num_sanity_val_steps=0, log_every_n_steps=1, callbacks=list(callbacks))


def _deepspeed(stage, world):
    return DeepSpeedStrategy(accelerator="cpu", zero_stage=stage, micro_batch_size=GLOBAL_BATCH // world, sync_batchnorm=True)


class Watch(Callback):
    """Per step: the head's master / working copy / momentum, the online masters and the target."""

    def __init__(self):
        self.steps = []
        self.initial = None

    def on_train_start(self, trainer, module):
        # After the engine is built: under bf16 DeepSpeed makes its fp32 masters from the bf16
        # module, so "unchanged" means equal to these, not to the fp32 weights it was given.
        self.initial = {"head": _full(module.head.weight), "head_working": _working(module.head.weight)}
        if module.target is not None:
            held = trainer.strategy.master_parameters(list(module.target.parameters()))
            self.initial["target"] = [v.detach().cpu().clone() for v in held]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        engine = trainer.strategy.engine
        online = [_full(p) for p in module.online.parameters()]
        record = {"head": _full(module.head.weight), "head_working": _working(module.head.weight),
                  "head_momentum": _momentum(module.head.weight, engine), "online": online,
                  "params": {n: _full(p) for n, p in module.named_parameters() if not n.startswith("target.")}}
        if module.target is not None:
            held = trainer.strategy.master_parameters(list(module.target.parameters()))
            record["target"] = [v.detach().cpu().clone() for v in held]
            record["target_working"] = [_working(p) for p in module.target.parameters()]
        self.steps.append(record)


def _one_process(module_kwargs: dict, steps: int) -> dict:
    module = Towers(**module_kwargs)
    _trainer(SingleDeviceStrategy(accelerator="cpu")).fit(module, TwoEpochs(batches(0, 1, steps)))
    return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def check_stage(rank: int, world: int, stage: int, root: str) -> dict:
    """Every check at one ZeRO stage (2 ranks); figures on rank 0."""
    out = {}
    steps = 4
    # LARS: per-layer trust ratios across partition boundaries, fp32 vs one process.
    reference = _one_process({"ema": False}, steps)
    module = Towers(ema=False)
    _trainer(_deepspeed(stage, world)).fit(module, TwoEpochs(batches(rank, world, steps)))
    values = {n: _full(p) for n, p in module.named_parameters()}
    out["lars_rel"] = max(((values[n] - reference[n]).abs().max() / reference[n].abs().max()).item() for n in reference)

    for precision in ("32", "bf16-mixed"):
        # The head held out of epoch 0; the EMA target in fp32 from the masters.
        watch = Watch()
        module = Towers(freeze_head_epochs=1)
        trainer = _trainer(_deepspeed(stage, world), precision=precision, callbacks=[watch])
        trainer.fit(module, TwoEpochs(batches(rank, world, steps)))
        frozen = watch.steps[: steps // 2]
        key = "fp32" if precision == "32" else "bf16"
        initial = watch.initial
        out[f"freeze_{key}"] = {
            "master_unchanged": all(torch.equal(s["head"], initial["head"]) for s in frozen),
            "working_unchanged": all(torch.equal(s["head_working"], initial["head_working"]) for s in frozen),
            "momentum_zero": all(not s["head_momentum"].any() for s in frozen),
            "trains_after": not torch.equal(watch.steps[-1]["head"], initial["head"]),
        }
        previous, worst, exact_working, dtypes = initial["target"], 0.0, True, set()
        for s in watch.steps:
            expected = [torch.lerp(t, o, 1.0 - module.tau) for t, o in zip(previous, s["online"])]
            worst = max(worst, max(((t - e).abs().max() / e.abs().max()).item() for t, e in zip(s["target"], expected)))
            exact_working &= all(torch.equal(w, t.to(w.dtype).reshape(w.shape)) for w, t in zip(s["target_working"], s["target"]))
            dtypes |= {str(t.dtype) for t in s["target"]}
            previous = s["target"]
        out[f"ema_{key}"] = {"recurrence": worst, "working_is_cast": exact_working, "dtypes": sorted(dtypes)}
        if precision == "32":
            reference = _one_process({"freeze_head_epochs": 1}, steps)
            final = watch.steps[-1]["params"]
            out["freeze_ema_vs_one_process"] = max(
                ((final[n] - reference[n]).abs().max() / reference[n].abs().max()).item() for n in final)

    # A frozen parameter under Adam: refused before any weight moves.
    module = Towers(optimizer="adam", freeze_head_epochs=1, ema=False)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    try:
        _trainer(_deepspeed(stage, world)).fit(module, TwoEpochs(batches(rank, world, steps)))
        out["adam_freeze_error"] = None
    except ValueError as err:
        out["adam_freeze_error"] = str(err)
    out["adam_freeze_untouched"] = all(torch.equal(_full(p), before[n].float()) for n, p in module.named_parameters())

    # Stop after 2 steps and resume (bf16): the same weights and fp32 EMA target as straight through.
    def run(sub, stop_after=None, resume=False):
        module = Towers(freeze_head_epochs=1)
        callbacks = [StopAfter(stop_after)] if stop_after else []
        trainer = _trainer(_deepspeed(stage, world), precision="bf16-mixed", callbacks=callbacks,
                           root=os.path.join(root, f"stage{stage}", sub))
        trainer.fit(module, TwoEpochs(batches(rank, world, steps)), ckpt_path="last" if resume else None)
        target = [v.detach().cpu().clone() for v in trainer.strategy.master_parameters(list(module.target.parameters()))]
        return {n: _full(p) for n, p in module.named_parameters() if not n.startswith("target.")}, target, trainer

    straight, straight_target, _ = run("straight")
    run("resumed", stop_after=2)
    resumed, resumed_target, trainer = run("resumed", resume=True)
    out["resume_params_equal"] = all(torch.equal(straight[n], resumed[n]) for n in straight)
    out["resume_target_equal"] = all(torch.equal(a, b) for a, b in zip(straight_target, resumed_target))
    if rank == 0:
        from scale_ssl.strategies.deepspeed import read_deepspeed_checkpoint

        consolidated = read_deepspeed_checkpoint(os.path.join(root, f"stage{stage}", "resumed", "checkpoints", "last.ckpt"))
        names = [n for n, _ in Towers().named_parameters() if n.startswith("target.")]
        out["consolidated_target_fp32"] = all(consolidated["state_dict"][n].dtype == torch.float32 and
                                              torch.equal(consolidated["state_dict"][n], t)
                                              for n, t in zip(names, resumed_target))
    return out if rank == 0 else {}


class StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.steps
