"""``StochasticWeightAveraging``: average the weights of the last epochs with a constant or
annealed SWA learning rate (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018), built on ``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``,
``update_bn``). At the end of fit the module holds the averaged weights and BatchNorm statistics
recomputed for them."""

from __future__ import annotations

from torch.optim.swa_utils import SWALR

from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.callbacks._averaging import averaged_copy, recompute_batchnorm
from scale_ssl.trainer.optimizer_config import SchedulerConfig


class StochasticWeightAveraging(Callback):
    """Args:
        swa_lrs: SWA learning rate (one for all groups, or one per parameter group).
        swa_epoch_start: epoch index to start averaging, or a float fraction of ``max_epochs``.
        annealing_epochs / annealing_strategy: ``SWALR`` annealing to ``swa_lrs`` ("cos"|"linear").
        bn_update_batches: batches for the final BatchNorm update (None: the whole epoch).
    """

    def __init__(self, swa_lrs: float | list[float], swa_epoch_start: int | float = 0.8, annealing_epochs: int = 10,
                 annealing_strategy: str = "cos", bn_update_batches: int | None = None):
        if annealing_strategy not in ("cos", "linear"):
            raise ValueError(f"StochasticWeightAveraging: annealing_strategy={annealing_strategy!r}; use 'cos' or 'linear'")
        lrs = swa_lrs if isinstance(swa_lrs, (list, tuple)) else [swa_lrs]
        if not lrs or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs):
            raise ValueError(f"StochasticWeightAveraging: swa_lrs must be positive numbers, got {swa_lrs!r}")
        if isinstance(swa_epoch_start, float) and not 0 < swa_epoch_start <= 1:
            raise ValueError(f"StochasticWeightAveraging: a float swa_epoch_start is a fraction in (0, 1], got {swa_epoch_start}")
        if isinstance(swa_epoch_start, int) and swa_epoch_start < 0:
            raise ValueError(f"StochasticWeightAveraging: swa_epoch_start must be >= 0, got {swa_epoch_start}")
        self.swa_lrs = swa_lrs
        self.swa_epoch_start = swa_epoch_start
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.bn_update_batches = bn_update_batches
        self.averaged = None
        self._start_epoch = None
        self._scheduler_swapped = False

    def on_fit_start(self, trainer, module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError("StochasticWeightAveraging supports exactly one optimizer")
        start = self.swa_epoch_start
        if isinstance(start, float):
            if trainer.max_epochs is None:
                raise ValueError("StochasticWeightAveraging: a fractional swa_epoch_start needs trainer.max_epochs")
            start = int(start * (trainer.max_epochs - 1))
        self._start_epoch = start
        if self.averaged is None:
            self.averaged = averaged_copy(module)
        elif getattr(self, "_pending_state", None) is not None:
            self.averaged.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch >= self._start_epoch and not self._scheduler_swapped:
            optimizer = trainer.optimizers[0]
            swalr = SWALR(optimizer, swa_lr=self.swa_lrs, anneal_epochs=self.annealing_epochs,
                          anneal_strategy=self.annealing_strategy)
            trainer.lr_scheduler_configs = [SchedulerConfig(swalr, interval="epoch", name="swa_lr")]
            self._scheduler_swapped = True

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch >= self._start_epoch:
            self.averaged.update_parameters(module)

    def on_train_end(self, trainer, module) -> None:
        if self.averaged is None or int(self.averaged.n_averaged) == 0:
            return
        for target, source in zip(module.parameters(), self.averaged.module.parameters()):
            target.data.copy_(source.data)
        recompute_batchnorm(trainer.train_dataloader, module, trainer.strategy.root_device, self.bn_update_batches)

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict() if self.averaged is not None else None,
                "scheduler_swapped": self._scheduler_swapped}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state.get("averaged")
        self._scheduler_swapped = False  # re-created (with its position lost) on the next epoch start
