"""Resuming into a run of another length (here ``max_steps`` 4 -> 8) re-plans the learning-rate
schedule over the new length from the current step and says so, instead of continuing the old
schedule past its end (which trained at ``final_lr`` = 0 without a word)."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.methods import SimCLR
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.test_trainer_callbacks import Interrupt

BATCH = 8


def make_simclr() -> SimCLR:
    seed_everything(1)
    return SimCLR(arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=16, feat_dim=8,
                  optimizer="sgd", learning_rate=0.4, warmup_steps=2, final_lr=0.0)


def batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(BATCH, 1, 28, 28, generator=g), torch.randn(BATCH, 1, 28, 28, generator=g)),
             torch.zeros(BATCH, dtype=torch.long)) for _ in range(n)]


def run(root, max_steps, ckpt_path=None) -> Trainer:
    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                      default_root_dir=str(root))
    trainer.fit(make_simclr(), batches(), ckpt_path=ckpt_path)
    return trainer


def lr_by_step(trainer) -> dict[int, float]:
    """The lr the optimizer holds after each step (what the next step trains with)."""
    return {row["step"]: row["lr"] for row in trainer.history if "lr" in row}


def test_a_longer_resume_replans_the_schedule_and_says_so(tmp_path, capsys):
    short = run(tmp_path / "a", 4)
    assert lr_by_step(short)[4] == 0.0  # the 4-step plan has ended: its lr is final_lr
    capsys.readouterr()
    resumed = run(tmp_path / "a", 8, ckpt_path="last")
    banner = capsys.readouterr().out
    assert "resuming at global step 4 of a run planned for 4 optimizer steps; this run is planned for 8" in banner
    assert "re-planned over 8 steps" in banner and "lr 0 (the old plan's) -> 0.3" in banner, banner
    planned_for_8 = lr_by_step(run(tmp_path / "b", 8))
    after = lr_by_step(resumed)
    assert sorted(after) == [5, 6, 7, 8]
    for step in (5, 6, 7):
        assert after[step] > 0
        assert after[step] == pytest.approx(planned_for_8[step], rel=1e-9)  # the 8-step plan, from step 4 on


def test_the_same_length_resumes_the_checkpoints_schedule_exactly(tmp_path, capsys):
    straight = lr_by_step(run(tmp_path / "s", 6))
    stopped = Trainer(max_steps=6, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                      default_root_dir=str(tmp_path / "r"), callbacks=[Interrupt(at_step=3)])
    stopped.fit(make_simclr(), batches())  # the 6-step run, stopped after step 3
    assert stopped.global_step == 3
    capsys.readouterr()
    resumed = lr_by_step(run(tmp_path / "r", 6, ckpt_path="last"))
    assert "re-planned" not in capsys.readouterr().out
    for step in (4, 5, 6):
        assert resumed[step] == straight[step]
