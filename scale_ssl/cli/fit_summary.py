"""The lines ``scale-ssl fit`` prints when it ends: what a user needs to act on the run.

Where the last checkpoint is (to evaluate, export or resume it), which MLflow run holds the curves
and how to open it, the final loss, the throughput and the wall time. Rank zero prints; the other
ranks stay silent, so a 64-rank job prints it once.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from scale_ssl.tracking.mlflow_logger import redact_credentials
from scale_ssl.trainer.callback import Callback

LOSS_KEY = "train/loss"


@dataclass
class FitSummary:
    steps: int
    wall_s: float
    checkpoint: str | None  # absolute path of last.ckpt, None when no checkpoint was written
    final_loss: float | None
    images_per_s: float | None  # median over the logging windows (steady state)
    images_per_s_overall: float | None  # images of this fit / wall time (start-up included)
    run_id: str | None
    tracking_uri: str | None
    ui_command: str | None

    def format(self) -> str:
        lines = [f"scale_ssl fit: done, {self.steps} steps in {_duration(self.wall_s)}"]
        lines.append(f"  last checkpoint : {self.checkpoint or 'none written (checkpointing is off)'}")
        if self.run_id:
            lines.append(f"  MLflow run      : {self.run_id} at {self.tracking_uri}")
            lines.append(f"  open it with    : {self.ui_command}")
        else:
            lines.append("  MLflow run      : none (tracking.enabled=false)")
        if self.final_loss is not None:
            lines.append(f"  final loss      : {self.final_loss:.4f}")
        if self.images_per_s is not None:
            overall = f" ({self.images_per_s_overall:.1f} over the whole fit, start-up included)" \
                if self.images_per_s_overall else ""
            lines.append(f"  images/s        : {self.images_per_s:.1f} (median of the logged windows after the "
                         f"first){overall}")
        return "\n".join(lines)


class FitClock(Callback):
    """Notes when ``fit`` was called and the step training started from (after a resume restored
    it), so the summary counts only this fit's steps and time."""

    def __init__(self):
        self.started = time.perf_counter()
        self.start_step = 0

    def on_train_start(self, trainer, module) -> None:
        self.start_step = trainer.global_step

    def print_summary(self, trainer, global_batch_size: int) -> "FitSummary | None":
        return print_fit_summary(trainer, time.perf_counter() - self.started, global_batch_size, self.start_step)


def summarize_fit(trainer, wall_s: float, global_batch_size: int, start_step: int = 0) -> FitSummary:
    """Collect the summary from a trainer whose ``fit`` returned after ``wall_s`` seconds (it ran
    from ``start_step``, non-zero on resume, to ``trainer.global_step``)."""
    history = list(getattr(trainer, "history", []))
    losses = [row[LOSS_KEY] for row in history if LOSS_KEY in row]
    if not losses:  # a method logging under another name: its first loss-like key
        keys = sorted({k for row in history for k in row if "loss" in k})
        losses = [row[keys[0]] for row in history if keys and keys[0] in row]
    # The first window holds start-up costs (workers, first graph): left out when there are others.
    rates = [row["images_per_s"] for row in history if "images_per_s" in row]
    rates = rates[1:] if len(rates) > 1 else rates
    steps_run = trainer.global_step - start_step
    checkpoint = os.path.join(trainer.checkpoint_dir, "last.ckpt")
    logger = trainer.logger
    run_id = getattr(logger, "run_id", None) if logger is not None else None
    return FitSummary(
        steps=trainer.global_step,
        wall_s=wall_s,
        checkpoint=os.path.abspath(checkpoint) if os.path.exists(checkpoint) else None,
        final_loss=float(losses[-1]) if losses else None,
        images_per_s=statistics.median(rates) if rates else None,
        images_per_s_overall=steps_run * global_batch_size / wall_s if wall_s > 0 and steps_run > 0 else None,
        run_id=run_id,
        tracking_uri=redact_credentials(logger.tracking_uri) if run_id else None,
        ui_command=logger.ui_command() if run_id else None,
    )


def print_fit_summary(trainer, wall_s: float, global_batch_size: int, start_step: int = 0) -> FitSummary | None:
    """Print :func:`summarize_fit` on rank zero; returns it there, ``None`` on other ranks."""
    if not trainer.is_global_zero:
        return None
    summary = summarize_fit(trainer, wall_s, global_batch_size, start_step)
    print(summary.format(), flush=True)
    return summary


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"
