"""``FreezeParameters``: no update for some parameters during the first epochs (SwAV keeps its
prototypes fixed for the first epoch, Caron et al. 2020, sec. 4) — gradients are dropped right
before the optimizer step, so momentum and weight decay do not move them either."""

from __future__ import annotations

from scale_ssl.trainer.callback import Callback


class FreezeParameters(Callback):
    def __init__(self, groups: list[tuple[list, int]]):
        self.groups = groups  # [(parameters, freeze while current_epoch < n), ...]

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for params, epochs in self.groups:
            if trainer.current_epoch < epochs:
                for p in params:
                    p.grad = None
