"""Every DeepSpeed case of the suite in one pair of gloo processes, because each engine start
costs tens of seconds: ZeRO 0-3 one-step runs (the deepspeed columns of the strategy matrix),
save/resume at ZeRO-2, bf16. Used through the session fixture ``deepspeed_engines``."""

from __future__ import annotations

import os

from scale_ssl.strategies import DeepSpeedStrategy
from scale_ssl.trainer import Callback, Trainer
from tests.test_strategy_matrix import GLOBAL_BATCH, TinyContrastive, global_batch


def rank_batches(rank, world, steps=1):
    (x1, x2), y = global_batch()
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    return [((x1[sl], x2[sl]), y[sl])] * steps


def deepspeed_trainer(stage, precision="32", root=None, max_steps=1, callbacks=()):
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=stage, micro_batch_size=GLOBAL_BATCH // 2)
    return Trainer(strategy=strategy, max_steps=max_steps, precision=precision, logger=False, enable_progress_bar=False,
                   enable_checkpointing=root is not None, default_root_dir=root or "runs/unused", log_every_n_steps=1,
                   num_sanity_val_steps=0, callbacks=list(callbacks))


class StopAfterTwoSteps(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= 2


def all_engines(rank, world, root):
    out = {"stages": {}}
    for stage in (0, 1, 2, 3):
        module = TinyContrastive()
        trainer = deepspeed_trainer(stage)
        trainer.fit(module, rank_batches(rank, world))
        out["stages"][stage] = (trainer.strategy.full_state_dict(module), trainer.callback_metrics["loss"])

    def run(sub, mode):
        module = TinyContrastive()
        callbacks = [StopAfterTwoSteps()] if mode == "first_half" else []
        trainer = deepspeed_trainer(2, root=os.path.join(root, sub), max_steps=4, callbacks=callbacks)
        trainer.fit(module, rank_batches(rank, world, steps=4), ckpt_path="last" if mode == "resume" else None)
        return trainer.strategy.full_state_dict(module), trainer.global_step

    out["straight"] = run("straight", "straight")
    run("resumed", "first_half")
    out["resumed"] = run("resumed", "resume")

    module = TinyContrastive()
    trainer = deepspeed_trainer(2, precision="bf16-mixed", max_steps=2)
    trainer.fit(module, rank_batches(rank, world, steps=2))
    out["bf16"] = (trainer.callback_metrics["loss"], next(module.parameters()).dtype)
    return out
