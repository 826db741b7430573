"""``ModelCheckpoint``: keep the best ``save_top_k`` checkpoints by a monitored metric, and/or the
last one, every N steps or epochs. Files are written atomically by the strategy (temp + fsync +
rename), so a crash mid-save never replaces a good checkpoint with a partial one."""

from __future__ import annotations

import math
import os
import shutil

from scale_ssl.trainer.callback import Callback


class ModelCheckpoint(Callback):
    """Args:
        dirpath: directory (default ``<default_root_dir>/checkpoints``).
        filename: format string with ``{epoch}``, ``{step}`` and metric names, e.g.
            ``"simclr-{epoch}-{val_loss:.3f}"`` (default ``"epoch={epoch}-step={step}"``).
        monitor / mode: metric in ``trainer.callback_metrics`` to rank by, "min" or "max";
            ``None`` keeps the latest ``save_top_k``.
        save_top_k: how many to keep (-1 all, 0 none but ``last``).
        save_last: also write ``last.ckpt`` at every save.
        every_n_train_steps / every_n_epochs: when to save (default: every epoch end, or after
            each validation run when ``monitor`` is a validation metric).
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 mode: str = "min", save_top_k: int = 1, save_last: bool | None = None,
                 every_n_train_steps: int | None = None, every_n_epochs: int | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode={mode!r}; use 'min' or 'max'")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint: save_top_k must be an int >= -1, got {save_top_k!r}")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelCheckpoint: {name} must be an int >= 1 or None, got {value!r}")
        if every_n_train_steps and every_n_epochs:
            raise ValueError("ModelCheckpoint: give every_n_train_steps or every_n_epochs, not both")
        self.dirpath = dirpath
        self.filename = filename or "epoch={epoch}-step={step}"
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (None if every_n_train_steps else 1)
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._last_saved_step = -1

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint[monitor={self.monitor}]"

    def setup(self, trainer, module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = trainer.checkpoint_dir

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def _save(self, trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._last_saved_step:
            return
        self._last_saved_step = trainer.global_step
        metrics = dict(trainer.callback_metrics)
        score = None
        if self.monitor is not None:
            if self.monitor not in metrics:
                raise ValueError(
                    f"ModelCheckpoint(monitor={self.monitor!r}) found no such metric; logged metrics: "
                    f"{sorted(metrics)}. Log it with self.log({self.monitor!r}, ...) or fix the name"
                )
            score = float(metrics[self.monitor])
        if self.save_top_k != 0:
            path = os.path.join(self.dirpath, self._format_name(trainer, metrics) + ".ckpt")
            if self._is_top_k(score):
                trainer.save_checkpoint(path)
                self.best_k_models[path] = score if score is not None else float(trainer.global_step)
                self._drop_worst(trainer)
        if self.save_last:
            self.last_model_path = os.path.join(self.dirpath, "last.ckpt")
            trainer.save_checkpoint(self.last_model_path)

    def _is_top_k(self, score) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        if score is None:  # no monitor: the newest replaces the oldest
            return True
        if math.isnan(score):
            return False
        worst = max(self.best_k_models.values()) if self.mode == "min" else min(self.best_k_models.values())
        return score < worst if self.mode == "min" else score > worst

    def _drop_worst(self, trainer) -> None:
        reverse = self.mode == "max" and self.monitor is not None
        ranked = sorted(self.best_k_models.items(), key=lambda kv: kv[1], reverse=reverse)
        if self.monitor is None:
            ranked = sorted(self.best_k_models.items(), key=lambda kv: kv[1], reverse=True)  # newest first
        keep = ranked if self.save_top_k == -1 else ranked[: self.save_top_k]
        for path, _ in ranked[len(keep):]:
            del self.best_k_models[path]
            if trainer.is_global_zero and os.path.isdir(path):  # a DeepSpeed checkpoint directory
                shutil.rmtree(path)
            elif trainer.is_global_zero and os.path.exists(path):
                os.remove(path)
        self.best_model_path, self.best_model_score = keep[0]

    def _format_name(self, trainer, metrics: dict) -> str:
        values = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        values.update({k.replace("/", "_"): v for k, v in metrics.items()})
        try:
            return self.filename.replace("/", "_").format(**values)
        except KeyError as err:
            raise ValueError(
                f"ModelCheckpoint: filename {self.filename!r} names {err.args[0]!r}, which is not a logged metric; "
                f"available: epoch, step, {', '.join(sorted(values))}"
            ) from None

    def state_dict(self) -> dict:
        return {"best_k_models": dict(self.best_k_models), "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "dirpath": self.dirpath}

    def load_state_dict(self, state: dict) -> None:
        self.best_k_models = dict(state.get("best_k_models", {}))
        self.best_model_path = state.get("best_model_path", "")
        self.best_model_score = state.get("best_model_score")
        self.last_model_path = state.get("last_model_path", "")
