"""A real DeepSpeed engine (CPU accelerator, gloo) behind the trainer: resume is exact and a ZeRO
checkpoint consolidates; bf16 runs; fp16 is a clear error on CPU; a user's ds_config is checked.
ZeRO 0-3 against one process on the whole batch are the deepspeed columns of
tests/test_strategy_matrix.py (same engines, one launch: the ``deepspeed_engines`` fixture)."""

from __future__ import annotations

import math

import pytest
import torch

from scale_ssl.strategies import DeepSpeedStrategy
from scale_ssl.strategies.deepspeed import consolidate_checkpoint
from scale_ssl.strategies.step_settings import StepSettings
from tests.test_strategy_matrix import TinyContrastive

pytest.importorskip("deepspeed")


@pytest.mark.timeout(900)
def test_save_and_resume_equals_an_uninterrupted_run_and_consolidates(deepspeed_engines, tmp_path):
    results, root = deepspeed_engines
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
def test_bf16_runs(deepspeed_engines):
    for rank_result in deepspeed_engines[0]:
        loss, dtype = rank_result["bf16"]
        assert math.isfinite(loss) and dtype == torch.bfloat16


def test_fp16_on_cpu_is_a_clear_error(monkeypatch):
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=2)
    strategy.configure_step(StepSettings(precision="16-mixed"))
    with pytest.raises(ValueError, match="DeepSpeed's CPU accelerator has no fp16"):
        strategy.build_config()


def test_user_config_is_checked_against_trainer_settings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}')
    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=2, config=str(path))
    strategy.configure_step(StepSettings(accumulate_grad_batches=2))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 but the trainer settings give 2"):
        strategy.build_config()
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        DeepSpeedStrategy(zero_stage=4)
