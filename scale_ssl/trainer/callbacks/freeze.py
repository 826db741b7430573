"""``FreezeParameters``: no update for some parameters during the first epochs (SwAV keeps its
prototypes fixed for the first epoch, Caron et al. 2020, sec. 4) — right before each optimizer
step the strategy is told to ``skip_update`` them, so neither the gradient, momentum nor weight
decay moves them, on every strategy (under DeepSpeed, ZeRO's flattened master copy included)."""

from __future__ import annotations

from scale_ssl.trainer.callback import Callback


class FreezeParameters(Callback):
    def __init__(self, groups: list[tuple[list, int]]):
        self.groups = groups  # [(parameters, freeze while current_epoch < n), ...]

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for params, epochs in self.groups:
            if trainer.current_epoch < epochs:
                trainer.strategy.skip_update(params)
