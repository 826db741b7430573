"""Callbacks: code that runs at fixed points of the loop without the trainer knowing the method."""

from __future__ import annotations


class Callback:
    """Override any hook; every hook receives the trainer and the module."""

    def on_fit_start(self, trainer, module) -> None: ...

    def on_train_epoch_start(self, trainer, module) -> None: ...

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None: ...

    def on_train_epoch_end(self, trainer, module) -> None: ...

    def on_validation_epoch_end(self, trainer, module) -> None: ...

    def on_fit_end(self, trainer, module) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def state_key(self) -> str:
        return type(self).__qualname__
