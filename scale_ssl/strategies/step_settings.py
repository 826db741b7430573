"""The loop's settings an engine needs when it builds itself, handed over explicitly.

An engine that runs the optimizer step itself (DeepSpeed: its own loss scaling, accumulation
boundary and gradient clipping) must be configured with the loop's precision, accumulation and
clipping. The trainer passes them as this frozen value (``Strategy.configure_step``); so does the
CLI when it checks a DeepSpeed config before launch. No strategy holds a reference to a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepSettings:
    """``precision``: "32", "bf16-mixed" or "16-mixed"; ``accumulate_grad_batches``: micro-batches
    per optimizer step; ``gradient_clip_val``/``gradient_clip_algorithm``: as the trainer's."""

    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
