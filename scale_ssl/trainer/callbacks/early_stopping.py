"""``EarlyStopping``: stop when a monitored metric has not improved for ``patience`` checks.

The decision is taken on rank zero and broadcast, so every rank stops at the same step even when
the metric was logged without ``sync_dist`` (a rank that stopped alone would leave the others
waiting in a collective). ``min_epochs`` / ``min_steps`` of the trainer still apply.
"""

from __future__ import annotations

import math

from scale_ssl.trainer.callback import Callback


class EarlyStopping(Callback):
    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, mode: str = "min",
                 strict: bool = True, check_finite: bool = True, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None, check_on_train_epoch_end: bool | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode={mode!r}; use 'min' or 'max'")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        self.monitor = monitor
        self.min_delta = abs(min_delta)
        self.patience = patience
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopped_epoch = 0
        self.stopping_reason = ""

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[monitor={self.monitor}]"

    def on_validation_end(self, trainer, module) -> None:
        if not self._on_train_epoch_end(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._on_train_epoch_end(trainer):
            self._check(trainer)

    def _on_train_epoch_end(self, trainer) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return not trainer.has_validation(trainer.module)

    def _check(self, trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if self.strict:
                raise ValueError(
                    f"EarlyStopping(monitor={self.monitor!r}) found no such metric; logged metrics: "
                    f"{sorted(trainer.callback_metrics)}. Log it with self.log({self.monitor!r}, ...) or pass strict=False"
                )
            return
        stop, reason = self._evaluate(float(value))
        stop, reason = trainer.strategy.broadcast_object((stop, reason), src=0)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = reason

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def _evaluate(self, value: float) -> tuple[bool, str]:
        if self.check_finite and not math.isfinite(value):
            return True, f"{self.monitor} = {value} is not finite"
        if self.stopping_threshold is not None and (
            value < self.stopping_threshold if self.mode == "min" else value > self.stopping_threshold
        ):
            return True, f"{self.monitor} = {value} reached the stopping threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and (
            value > self.divergence_threshold if self.mode == "min" else value < self.divergence_threshold
        ):
            return True, f"{self.monitor} = {value} crossed the divergence threshold {self.divergence_threshold}"
        if self._improved(value):
            self.best_score, self.wait_count = value, 0
            return False, ""
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, f"{self.monitor} did not improve for {self.wait_count} checks (best {self.best_score})"
        return False, ""

    def state_dict(self) -> dict:
        return {"wait_count": self.wait_count, "best_score": self.best_score, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.wait_count = state["wait_count"]
        self.best_score = state["best_score"]
        self.stopped_epoch = state["stopped_epoch"]
