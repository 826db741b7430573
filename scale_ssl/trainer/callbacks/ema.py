"""``EMAWeightAveraging``: an exponential moving average of the weights, theta_ema <- d * theta_ema
+ (1 - d) * theta after every optimizer step (Polyak & Juditsky 1992; as in MoCo/BYOL targets and
"model EMA" in supervised training), built on ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn``. The average lives beside the module (``callback.ema``, saved in the
checkpoint); with ``swap_at_end`` the module holds the averaged weights when fit ends."""

from __future__ import annotations

from torch.optim.swa_utils import get_ema_multi_avg_fn

from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.callbacks._averaging import averaged_copy


class EMAWeightAveraging(Callback):
    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0, swap_at_end: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeightAveraging: decay must be in (0, 1), got {decay!r}")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"EMAWeightAveraging: every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.swap_at_end = swap_at_end
        self.ema = None
        self._pending_state = None

    def on_fit_start(self, trainer, module) -> None:
        if self.ema is None:
            # use_buffers: BatchNorm statistics are averaged too, so the EMA model is usable as is.
            self.ema = averaged_copy(module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        if self._pending_state is not None:
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step >= self.start_step and step % self.every_n_steps == 0:
            self.ema.update_parameters(module)

    def on_fit_end(self, trainer, module) -> None:
        if self.swap_at_end and self.ema is not None and int(self.ema.n_averaged) > 0:
            module.load_state_dict(self.ema.module.state_dict())

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state.get("ema")
