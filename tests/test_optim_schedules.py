"""Warmup-cosine multipliers against the closed form, absolute per-group lrs, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scale_ssl.optim import WarmupCosineSchedule, warmup_cosine_lambda

# W = 10 warmup steps, T = 110 total, s = 0.1, e = 0.01: the cosine runs over steps 10..110.
CLOSED_FORM = [
    (0, 0.1),                                              # start_factor
    (5, 0.1 + 0.9 * 0.5),                                  # half-way up the warmup line
    (10, 1.0),                                             # peak at the end of warmup
    (35, 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter into the cosine
    (60, 0.01 + 0.99 * 0.5),                               # mid-cosine
    (110, 0.01),                                           # end
    (500, 0.01),                                           # constant after the end
]


@pytest.mark.parametrize("step, expected", CLOSED_FORM)
def test_warmup_cosine_lambda_matches_closed_form(step, expected):
    factor = warmup_cosine_lambda(10, 110, start_factor=0.1, final_factor=0.01)
    assert factor(step) == pytest.approx(expected, rel=1e-12)


def test_zero_warmup_starts_at_peak_and_full_warmup_holds_until_the_end():
    assert warmup_cosine_lambda(0, 100)(0) == 1.0
    assert warmup_cosine_lambda(0, 100)(50) == pytest.approx(0.5)
    only_warmup = warmup_cosine_lambda(100, 100, final_factor=0.2)
    assert only_warmup(50) == pytest.approx(0.5)
    assert only_warmup(100) == 0.2


def _optimizer(lrs=(0.4, 0.1, 0.0)) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=1.0, momentum=0.9)


def _run(optimizer, scheduler, steps: int) -> list[list[float]]:
    history = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        history.append([group["lr"] for group in optimizer.param_groups])
    return history


def test_schedule_uses_absolute_start_and_final_lr_per_group():
    optimizer = _optimizer()
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=4, total_steps=12, start_lr=0.02, final_lr=0.001)
    lrs = [[group["lr"] for group in optimizer.param_groups]] + _run(optimizer, scheduler, 14)
    # Step 0: every non-zero group starts at start_lr; the lr-0 group stays at 0 throughout.
    assert lrs[0] == pytest.approx([0.02, 0.02, 0.0])
    assert lrs[2] == pytest.approx([0.02 + 0.5 * (0.4 - 0.02), 0.02 + 0.5 * (0.1 - 0.02), 0.0])
    assert lrs[4] == pytest.approx([0.4, 0.1, 0.0])
    assert lrs[8] == pytest.approx([0.001 + 0.5 * (0.4 - 0.001), 0.001 + 0.5 * (0.1 - 0.001), 0.0])
    assert lrs[12] == pytest.approx([0.001, 0.001, 0.0])
    assert lrs[14] == pytest.approx([0.001, 0.001, 0.0])


def test_scheduler_state_dict_resume_continues_identically():
    def fresh():
        optimizer = _optimizer()
        return optimizer, WarmupCosineSchedule(optimizer, warmup_steps=5, total_steps=20, start_lr=0.01, final_lr=0.002)

    optimizer, scheduler = fresh()
    straight = _run(optimizer, scheduler, 16)

    optimizer, scheduler = fresh()
    first_half = _run(optimizer, scheduler, 7)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    assert scheduler.last_epoch == 7
    second_half = _run(optimizer, scheduler, 9)
    assert first_half + second_half == straight


def test_resume_takes_the_schedule_from_the_checkpoint_not_the_rebuilt_arguments():
    optimizer = _optimizer()
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=5, total_steps=20, start_lr=0.01, final_lr=0.002)
    _run(optimizer, scheduler, 3)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    rebuilt = _optimizer()
    rebuilt_scheduler = WarmupCosineSchedule(rebuilt, warmup_steps=1, total_steps=2, start_lr=0.3, final_lr=0.0)
    rebuilt.load_state_dict(saved_optimizer)
    rebuilt_scheduler.load_state_dict(saved_scheduler)
    assert _run(rebuilt, rebuilt_scheduler, 5) == _run(optimizer, scheduler, 5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(warmup_steps=11, total_steps=10), ValueError, r"warmup_steps must be in \[0, total_steps=10\]"),
        (dict(warmup_steps=-1, total_steps=10), ValueError, "warmup_steps must be in"),
        (dict(warmup_steps=0, total_steps=0), ValueError, "total_steps must be > 0"),
        (dict(warmup_steps=0.5, total_steps=10), TypeError, "warmup_steps must be an int"),
        (dict(warmup_steps=1, total_steps=10, start_lr=-0.1), ValueError, "start_lr must be a finite number >= 0"),
        (dict(warmup_steps=1, total_steps=10, final_lr=float("nan")), ValueError, "final_lr must be a finite number >= 0"),
    ],
)
def test_schedule_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        WarmupCosineSchedule(_optimizer(), **kwargs)


def test_lambda_argument_errors():
    with pytest.raises(ValueError, match="warmup_cosine_lambda: total_steps must be > 0"):
        warmup_cosine_lambda(0, -5)
    with pytest.raises(ValueError, match="start_factor must be a finite number >= 0"):
        warmup_cosine_lambda(1, 5, start_factor=-1.0)
