"""Per-step linear warmup followed by cosine decay of the learning rate.

Goyal et al. "Accurate, Large Minibatch SGD", 2017 (arXiv:1706.02677) for the warmup;
Loshchilov, Hutter. "SGDR", ICLR 2017 (arXiv:1608.03983) for the cosine (without restarts).
SimCLR (arXiv:2002.05709) warms up for 10 epochs then decays with cosine; SwAV
(arXiv:2006.09882) does the same per iteration from a start lr to a final lr.

The multiplier of a group's base lr at step t, with W = warmup_steps and T = total_steps:

    f(t) = s + (1 - s) * t / W                                      for 0 <= t < W
    f(t) = e + (1 - e) * (1 + cos(pi * (t - W) / (T - W))) / 2      for W <= t < T
    f(t) = e                                                        for t >= T

s = start_factor and e = final_factor; f rises linearly from s to 1, then falls from 1 to e.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineFactor:
    """The multiplier f(t) of the module docstring, as a callable object.

    An object rather than a closure because ``LambdaLR.state_dict()`` saves an object's
    attributes (and ``load_state_dict`` restores them) but skips plain functions: a resumed
    scheduler then uses the checkpoint's schedule, not whatever it was rebuilt with.
    """

    def __init__(self, warmup_steps: int, total_steps: int, start_factor: float, final_factor: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_factor = start_factor
        self.final_factor = final_factor

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"WarmupCosineFactor: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final_factor
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (
            f"WarmupCosineFactor(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
            f"start_factor={self.start_factor}, final_factor={self.final_factor})"
        )


def _check_steps(owner: str, warmup_steps, total_steps) -> None:
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: {name} must be an int number of optimizer steps, got {value!r}")
    if total_steps <= 0:
        raise ValueError(f"{owner}: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"{owner}: warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}; "
            "shorten the warmup or lengthen the run"
        )


def _check_non_negative(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def warmup_cosine_lambda(
    warmup_steps: int, total_steps: int, start_factor: float = 0.0, final_factor: float = 0.0
) -> WarmupCosineFactor:
    """Return f(step), the multiplier of the base lr (see the module docstring), for ``LambdaLR``.

    Args:
        warmup_steps: W, steps of linear warmup, 0 <= W <= total_steps (0 starts at the peak).
        total_steps: T > 0, the step at which the cosine reaches ``final_factor``.
        start_factor: s = f(0) / f(W), >= 0.
        final_factor: e = f(T), >= 0; f stays at e after T.
    """
    owner = "warmup_cosine_lambda"
    _check_steps(owner, warmup_steps, total_steps)
    _check_non_negative(owner, "start_factor", start_factor)
    _check_non_negative(owner, "final_factor", final_factor)
    return WarmupCosineFactor(warmup_steps, total_steps, float(start_factor), float(final_factor))


class WarmupCosineSchedule(LambdaLR):
    """Per-step warmup-cosine lr: from ``start_lr`` up to each group's base lr, down to ``final_lr``.

    Call ``scheduler.step()`` after every ``optimizer.step()`` (per step, not per epoch), as
    SimCLR and SwAV do. ``start_lr`` and ``final_lr`` are absolute learning rates shared by all
    groups; each group's base lr (its ``initial_lr``, else its ``lr`` when the scheduler is built)
    is the peak. A group whose base lr is 0 (e.g. frozen by lr) stays at 0.

    Resume: build the optimizer and scheduler as for a fresh run, then ``load_state_dict`` both;
    the step count, base lrs and per-group factors come from the checkpoint, so the next
    ``step()`` gives the lr the uninterrupted run would have had.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warmup, 0 <= warmup_steps <= total_steps.
        total_steps: optimizer steps until ``final_lr`` is reached, > 0.
        start_lr: lr at step 0, >= 0.
        final_lr: lr at ``total_steps`` and after, >= 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
    ):
        owner = "WarmupCosineSchedule"
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_steps(owner, warmup_steps, total_steps)
        _check_non_negative(owner, "start_lr", start_lr)
        _check_non_negative(owner, "final_lr", final_lr)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_lr = float(start_lr)
        self.final_lr = float(final_lr)

        factors = []
        for group in optimizer.param_groups:
            # LambdaLR keeps an existing initial_lr (setdefault), so the base must be read the same way.
            base_lr = float(group.get("initial_lr", group["lr"]))
            if base_lr == 0.0:
                factors.append(WarmupCosineFactor(warmup_steps, total_steps, 0.0, 0.0))
            else:
                factors.append(
                    WarmupCosineFactor(warmup_steps, total_steps, self.start_lr / base_lr, self.final_lr / base_lr)
                )
        super().__init__(optimizer, lr_lambda=factors)
