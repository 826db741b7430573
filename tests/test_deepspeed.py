"""A real DeepSpeed engine (CPU accelerator, gloo) behind the trainer: ZeRO 0-3 give the global
NT-Xent loss and one-step update of one process on the whole batch (= the DDP column of the
strategy matrix); resume is exact; bf16 runs; fp16 is a clear error on CPU."""

from __future__ import annotations

import math
import os

import pytest
import torch

from scale_ssl.strategies import DeepSpeedStrategy
from scale_ssl.strategies.deepspeed import consolidate_checkpoint
from scale_ssl.trainer import Callback, Trainer
from tests.distributed import run_on_ranks
from tests.test_strategy_matrix import GLOBAL_BATCH, UPDATE_REL_TOL, TinyContrastive, _update_diff, global_batch, reference

pytest.importorskip("deepspeed")


def _rank_batches(rank, world, steps=1):
    (x1, x2), y = global_batch()
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    return [((x1[sl], x2[sl]), y[sl])] * steps


def _trainer(stage, precision="32", root=None, max_steps=1, callbacks=()):
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=stage, micro_batch_size=GLOBAL_BATCH // 2)
    return Trainer(strategy=strategy, max_steps=max_steps, precision=precision, logger=False, enable_progress_bar=False,
                   enable_checkpointing=root is not None, default_root_dir=root or "runs/unused", log_every_n_steps=1,
                   num_sanity_val_steps=0, callbacks=list(callbacks))


class Interrupt(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= 2


def _all_engines(rank, world, root):
    """Every DeepSpeed case in one pair of processes (each engine start costs tens of seconds):
    ZeRO 0-3 one-step equivalence, save/resume at ZeRO-2, bf16."""
    out = {"stages": {}}
    for stage in (0, 1, 2, 3):
        module = TinyContrastive()
        trainer = _trainer(stage)
        trainer.fit(module, _rank_batches(rank, world))
        out["stages"][stage] = (trainer.strategy.full_state_dict(module), trainer.callback_metrics["loss"])

    def run(sub, mode):
        module = TinyContrastive()
        trainer = _trainer(2, root=os.path.join(root, sub), max_steps=4, callbacks=[Interrupt()] if mode == "first_half" else [])
        trainer.fit(module, _rank_batches(rank, world, steps=4), ckpt_path="last" if mode == "resume" else None)
        return trainer.strategy.full_state_dict(module), trainer.global_step

    out["straight"] = run("straight", "straight")
    run("resumed", "first_half")
    out["resumed"] = run("resumed", "resume")

    module = TinyContrastive()
    trainer = _trainer(2, precision="bf16-mixed", max_steps=2)
    trainer.fit(module, _rank_batches(rank, world, steps=2))
    out["bf16"] = (trainer.callback_metrics["loss"], next(module.parameters()).dtype)
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    return run_on_ranks(_all_engines, 2, str(root)), root


@pytest.mark.timeout(900)
def test_zero_stages_0_to_3_equal_one_process_on_the_global_batch(engines):
    results, _ = engines
    ref_state, ref_loss = reference()
    figures = {}
    for rank_result in results:
        for stage, (state, loss) in rank_result["stages"].items():
            assert math.isclose(loss, ref_loss, rel_tol=1e-6), (stage, loss, ref_loss)
            diff = _update_diff(state, ref_state)
            figures[stage] = max(diff, figures.get(stage, 0.0))
            assert diff < UPDATE_REL_TOL, f"ZeRO-{stage}: update differs by {diff:.2e} (relative)"
    print("ZeRO stage -> max relative update difference vs one process:", figures)


@pytest.mark.timeout(900)
def test_save_and_resume_equals_an_uninterrupted_run_and_consolidates(engines, tmp_path):
    results, root = engines
    for rank_result in results:
        (a, step_a), (b, step_b) = rank_result["straight"], rank_result["resumed"]
        assert step_a == step_b == 4
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # a ZeRO checkpoint directory -> a plain checkpoint that load_from_checkpoint reads
    plain = consolidate_checkpoint(str(root / "resumed" / "checkpoints" / "last.ckpt"), str(tmp_path / "plain.ckpt"))
    loaded = TinyContrastive()
    loaded.load_state_dict(torch.load(plain, weights_only=True)["state_dict"])
    for key, value in results[0]["straight"][0].items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


@pytest.mark.timeout(900)
def test_bf16_runs(engines):
    for rank_result in engines[0]:
        loss, dtype = rank_result["bf16"]
        assert math.isfinite(loss) and dtype == torch.bfloat16


def test_fp16_on_cpu_is_a_clear_error(monkeypatch):
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=2)
    strategy.trainer = Trainer(strategy="single", precision="32")
    strategy.trainer.precision_name = "16-mixed"
    with pytest.raises(ValueError, match="DeepSpeed's CPU accelerator has no fp16"):
        strategy.build_config()


def test_user_config_is_checked_against_trainer_settings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}')
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=2, config=str(path))
    strategy.trainer = Trainer(strategy="single", accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 but the trainer settings give 2"):
        strategy.build_config()
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        DeepSpeedStrategy(zero_stage=4)
