"""Validation, test and predict: when validation runs inside ``fit`` and how one pass over the
loaders goes.

One pass: eval mode, no grad, each loader once; ``*_step_end`` and ``*_epoch_end(outputs)``
called; epoch-logged metrics averaged (and reduced over ranks) into ``callback_metrics``.
"""

from __future__ import annotations

import torch

from scale_ssl.trainer.data_distribution import batch_size_of
from scale_ssl.trainer.loaders import limited_length
from scale_ssl.trainer.metrics import reduce_and_fetch, reduce_epoch_and_fetch
from scale_ssl.trainer.module import SSLModule


class EvaluationLoop:
    def __init__(self, trainer):
        self.trainer = trainer

    # -- when, inside fit ------------------------------------------------------------------
    def has_validation(self, module: SSLModule) -> bool:
        return bool(self.trainer.val_dataloaders) and type(module).validation_step is not SSLModule.validation_step

    def in_epoch_every(self, num_batches: int | None) -> int | None:
        """Validate inside the epoch every this many batches (``val_check_interval``), on the
        epochs ``check_val_every_n_epoch`` selects."""
        settings = self.trainer.settings
        interval = settings.val_check_interval
        if interval is None or not self.has_validation(self.trainer.module):
            return None
        every_n = settings.check_val_every_n_epoch
        if every_n is not None and (self.trainer.current_epoch + 1) % every_n != 0:
            return None
        if isinstance(interval, float):
            if num_batches is None:
                raise ValueError("trainer.val_check_interval as a fraction needs a training loader with a length")
            return max(1, int(num_batches * interval))
        return interval

    def due_at_epoch_end(self) -> bool:
        """End-of-epoch validation (when no in-epoch ``val_check_interval`` is set)."""
        settings = self.trainer.settings
        if not self.has_validation(self.trainer.module) or settings.check_val_every_n_epoch is None:
            return False
        if settings.val_check_interval is not None:
            return False
        return (self.trainer.current_epoch + 1) % settings.check_val_every_n_epoch == 0

    def sanity_check(self, module: SSLModule) -> None:
        trainer = self.trainer
        trainer.sanity_checking = True
        try:
            steps = trainer.settings.num_sanity_val_steps
            self.run(module, "validate", trainer.val_dataloaders, limit_override=None if steps < 0 else steps, log=False)
        finally:
            trainer.sanity_checking = False
            trainer.callback_metrics = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("val")}

    def validation_run(self, module: SSLModule) -> None:
        self.run(module, "validate", self.trainer.val_dataloaders)
        self.trainer.callbacks.call("on_validation_end", self.trainer, module)

    # -- one pass --------------------------------------------------------------------------
    def run(self, module: SSLModule, stage: str, loaders: list, limit_override: int | None = None,
            log: bool = True) -> list[dict]:
        trainer = self.trainer
        strategy, callbacks = trainer.strategy, trainer.callbacks
        prefix = "validation" if stage == "validate" else "test"
        step_end = getattr(module, f"{prefix}_step_end")
        settings = trainer.settings
        limit_setting = settings.limit_val_batches if prefix == "validation" else settings.limit_test_batches
        was_training = module.training
        previous_stage = module._stage
        module._stage = prefix
        module.eval()
        callbacks.call_with_module(f"on_{prefix}_epoch_start", trainer, module)
        all_outputs = []
        per_loader_metrics = []
        try:
            with torch.no_grad():
                for dl_idx, loader in enumerate(loaders):
                    limit = limit_override if limit_override is not None else limited_length(loader, limit_setting)
                    outputs = []
                    for batch_idx, batch in enumerate(loader):
                        if limit is not None and batch_idx >= limit:
                            break
                        batch = strategy.batch_to_device(batch)
                        module._batch_size_hint = batch_size_of(batch)
                        batch = module.on_after_batch_transfer(batch, dl_idx)
                        args = (batch, batch_idx, dl_idx) if len(loaders) > 1 else (batch, batch_idx)
                        with trainer.precision.autocast():
                            out = step_end(strategy.eval_step(module, f"{prefix}_step", args))
                        if out is not None:
                            outputs.append(out)
                        callbacks.call(f"on_{prefix}_batch_end", trainer, module, out, batch, batch_idx)
                    all_outputs.append(outputs)
            epoch_end = getattr(module, f"{prefix}_epoch_end", None)
            if callable(epoch_end):  # the older Lightning form, with every step's outputs
                epoch_end(all_outputs[0] if len(loaders) == 1 else all_outputs)
            callbacks.call_with_module(f"on_{prefix}_epoch_end", trainer, module)
            values = reduce_epoch_and_fetch(module._metrics.pop_epoch(), strategy)
            values.update(reduce_and_fetch(module._metrics.pop_step(), strategy))
            trainer.callback_metrics.update(values)
            if log and trainer.logger is not None and values:
                trainer.logger.log_metrics(values, step=trainer.global_step)
            per_loader_metrics.append(values)
        finally:
            module._stage = previous_stage
            module.train(was_training)
        return per_loader_metrics

    def predict(self, module: SSLModule, loaders: list) -> list:
        """``predict_step`` over every loader (eval mode, no grad); one list per loader."""
        trainer = self.trainer
        results = []
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for dl_idx, loader in enumerate(loaders):
                    limit = limited_length(loader, trainer.settings.limit_predict_batches)
                    outputs = []
                    for batch_idx, batch in enumerate(loader):
                        if limit is not None and batch_idx >= limit:
                            break
                        batch = module.on_after_batch_transfer(trainer.strategy.batch_to_device(batch), dl_idx)
                        with trainer.precision.autocast():
                            args = (batch, batch_idx, dl_idx) if len(loaders) > 1 else (batch, batch_idx)
                            outputs.append(module.predict_step(*args))
                    results.append(outputs)
        finally:
            module.train(was_training)
        return results[0] if len(results) == 1 else results
