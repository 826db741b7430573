"""``LearningRateMonitor``: log every parameter group's learning rate (and momentum) as metrics,
named after the scheduler's ``name`` (``lr-<name>``), else ``lr-<OptimizerClass>``; several
groups get ``/pg<i>`` suffixes."""

from __future__ import annotations

from scale_ssl.trainer.callback import Callback


class LearningRateMonitor(Callback):
    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False):
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor: logging_interval={logging_interval!r}; use None, 'step' or 'epoch'")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.logging_interval in (None, "step") and trainer.global_step % trainer.log_every_n_steps == 0:
            trainer.log_metrics(self.learning_rates(trainer))

    def on_train_epoch_start(self, trainer, module) -> None:
        if self.logging_interval in (None, "epoch"):
            trainer.log_metrics(self.learning_rates(trainer))

    def learning_rates(self, trainer) -> dict[str, float]:
        names_by_optimizer = {c.optimizer_idx: c.name for c in trainer.lr_scheduler_configs if c.name}
        seen: dict[str, int] = {}
        out = {}
        for idx, optimizer in enumerate(trainer.optimizers):
            base = names_by_optimizer.get(idx) or type(optimizer).__name__
            seen[base] = seen.get(base, 0) + 1
            if seen[base] > 1:
                base = f"{base}-{seen[base] - 1}"
            groups = optimizer.param_groups
            for g, group in enumerate(groups):
                suffix = f"/pg{g + 1}" if len(groups) > 1 else ""
                out[f"lr-{base}{suffix}"] = float(group["lr"])
                if self.log_momentum:
                    momentum = group.get("momentum", group.get("betas", (None,))[0])
                    if momentum is not None:
                        out[f"lr-{base}-momentum{suffix}"] = float(momentum)
        return out
