"""One training batch, from the forward pass to the optimizer step.

Automatic optimization: forward under autocast through the strategy's wrapper (so DDP's hooks see
it) -> ``training_step_end`` -> backward of ``loss / accumulate_grad_batches`` (gradient sync
suppressed on non-final micro-batches) -> at the accumulation boundary: clip -> the module's and
callbacks' ``on_before_optimizer_step`` -> optimizer step through the precision plugin and the
strategy -> ``zero_grad`` -> step-interval schedulers. Several optimizers each get their own
``training_step`` call (their parameters toggled), or take turns by ``frequency``; LBFGS gets a
closure. Manual optimization (``automatic_optimization = False``): the module drives the step and
calls back into :meth:`manual_backward` / :meth:`manual_optimizer_step` through its trainer.

``global_step`` counts optimizer steps summed over optimizers (as Lightning >= 1.6 does), so a
GAN with two optimizers advances it by two per batch.
"""

from __future__ import annotations

import warnings

import torch

from scale_ssl.trainer.data_distribution import batch_size_of
from scale_ssl.trainer.manual_optimization import OptimizerToggle, WrappedOptimizer
from scale_ssl.trainer.optimizer_config import SchedulerConfig


class Stepping:
    def __init__(self, trainer):
        self.trainer = trainer
        self.toggle = OptimizerToggle()
        self.manual_stepped = False

    # -- set-up checks ---------------------------------------------------------------------
    def check_optimization_mode(self, module) -> None:
        settings, optimizers = self.trainer.settings, self.trainer.optimizers
        if module.automatic_optimization:
            if any(isinstance(o, torch.optim.LBFGS) for o in optimizers) and settings.accumulate_grad_batches > 1:
                raise ValueError("LBFGS re-evaluates the loss inside step(): it cannot be combined with accumulate_grad_batches > 1")
            return
        if settings.accumulate_grad_batches != 1:
            raise ValueError(
                "accumulate_grad_batches is not used with manual optimization (automatic_optimization=False): "
                "accumulate in training_step yourself and leave trainer.accumulate_grad_batches=1"
            )
        if settings.gradient_clip_val is not None:
            raise ValueError(
                "gradient_clip_val is not used with manual optimization: call "
                "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm=...) in training_step"
            )

    def active_optimizers(self, batch_idx: int) -> list[int]:
        """Which optimizers this batch trains: all (each with its own training_step call), or,
        with frequencies, the one whose turn it is."""
        optimizers, frequencies = self.trainer.optimizers, self.trainer.optimizer_frequencies
        if len(optimizers) <= 1:
            return [0] if optimizers else []
        if not frequencies:
            return list(range(len(optimizers)))
        position = batch_idx % sum(frequencies)
        for idx, freq in enumerate(frequencies):
            if position < freq:
                return [idx]
            position -= freq
        return [0]

    def steps_per_optimizer_round(self) -> int:
        if len(self.trainer.optimizers) > 1 and not self.trainer.optimizer_frequencies:
            return len(self.trainer.optimizers)
        return 1

    # -- one batch -------------------------------------------------------------------------
    def train_batch(self, module, batch, batch_idx: int, num_batches: int | None) -> bool:
        """Train on one batch; True when an optimizer step was taken."""
        trainer = self.trainer
        strategy, guard = trainer.strategy, trainer.nonfinite
        batch = strategy.batch_to_device(batch)
        module._batch_size_hint = batch_size_of(batch)
        batch = module.on_after_batch_transfer(batch, 0)
        response = module.on_train_batch_start(batch, batch_idx)
        trainer.callbacks.call("on_train_batch_start", trainer, module, batch, batch_idx)
        if response == -1:  # Lightning's convention: end this epoch here
            trainer.fit_loop.end_epoch_early = True
            return False
        if not module.automatic_optimization:
            outputs = self.run_step(module, batch, batch_idx, None)
            stepped, self.manual_stepped = self.manual_stepped, False
            self._after_batch(module, outputs, batch, batch_idx)
            return stepped

        accumulate = trainer.settings.accumulate_grad_batches
        last_of_epoch = num_batches is not None and batch_idx + 1 == num_batches
        is_step = (batch_idx + 1) % accumulate == 0 or last_of_epoch
        optimizers = trainer.optimizers
        outputs, stepped = None, False
        for opt_idx in self.active_optimizers(batch_idx):
            multi = len(optimizers) > 1
            if multi:
                self.toggle.toggle(module, optimizers, opt_idx)
            try:
                optimizer = optimizers[opt_idx] if optimizers else None
                if isinstance(optimizer, torch.optim.LBFGS):
                    outputs = self._lbfgs_step(module, optimizer, opt_idx, batch, batch_idx)
                    stepped = True
                    continue
                with strategy.no_backward_sync(trainer.wrapped, enabled=not is_step):
                    outputs = self.run_step(module, batch, batch_idx, opt_idx if multi else None)
                    loss = extract_loss(outputs)
                    if loss is None:
                        if strategy.world_size > 1:
                            raise RuntimeError(
                                "training_step returned None under a distributed strategy; every rank must return a "
                                "loss (skipping on one rank would leave the others waiting in the gradient all-reduce)"
                            )
                        continue
                    if optimizer is not None and strategy.host_reads_split_the_step:
                        guard.note_on_device(loss)
                        strategy.backward(trainer.precision.scale(loss / accumulate))
                    elif optimizer is not None:
                        if guard.loss_is_nonfinite(loss):
                            guard.skip_window = True  # no backward on any rank: no rank waits in an all-reduce
                        else:
                            strategy.backward(trainer.precision.scale(loss / accumulate))
                if is_step and optimizer is not None:
                    if guard.skip_window:
                        guard.skip_step(optimizer, batch_idx)
                        continue
                    self._optimizer_step(module, optimizer, opt_idx)
                    guard.consecutive = 0
                    stepped = True
            finally:
                if multi:
                    self.toggle.untoggle(module)
        self._after_batch(module, outputs, batch, batch_idx)
        return stepped

    def run_step(self, module, batch, batch_idx: int, opt_idx: int | None):
        args = (batch, batch_idx) if opt_idx is None else (batch, batch_idx, opt_idx)
        with self.trainer.precision.autocast():
            outputs = self.trainer.wrapped(*args)
        return module.training_step_end(outputs)

    def _optimizer_step(self, module, optimizer, opt_idx: int) -> None:
        trainer = self.trainer
        settings = trainer.settings
        if settings.gradient_clip_val is not None:
            self.clip(optimizer, settings.gradient_clip_val, settings.gradient_clip_algorithm)
        module.on_before_optimizer_step(optimizer)
        trainer.callbacks.call("on_before_optimizer_step", trainer, module, optimizer)
        trainer.precision.step(optimizer, lambda: trainer.strategy.optimizer_step(optimizer))
        optimizer.zero_grad(set_to_none=True)
        trainer.global_step += 1
        self.step_schedulers_of(opt_idx)

    def _lbfgs_step(self, module, optimizer, opt_idx: int, batch, batch_idx: int):
        """LBFGS evaluates the loss several times per step: the trainer builds that closure."""
        trainer = self.trainer
        holder = {}

        def closure():
            optimizer.zero_grad(set_to_none=True)
            outputs = self.run_step(module, batch, batch_idx, opt_idx if len(trainer.optimizers) > 1 else None)
            loss = extract_loss(outputs)
            trainer.strategy.backward(loss)
            holder["outputs"] = outputs
            return loss.detach()

        module.on_before_optimizer_step(optimizer)
        trainer.strategy.optimizer_step(optimizer, closure)
        optimizer.zero_grad(set_to_none=True)
        trainer.global_step += 1
        self.step_schedulers_of(opt_idx)
        return holder.get("outputs")

    def _after_batch(self, module, outputs, batch, batch_idx: int) -> None:
        # After the optimizer step, as in Lightning: EMA targets and queues see the new weights.
        module.on_train_batch_end(outputs, batch, batch_idx)
        self.trainer.callbacks.call("on_train_batch_end", self.trainer, module, outputs, batch, batch_idx)

    # -- schedulers ------------------------------------------------------------------------
    def step_schedulers_of(self, opt_idx: int) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.optimizer_idx == opt_idx and config.interval == "step":
                steps_of_this_optimizer = getattr(config, "_steps", 0) + 1
                config._steps = steps_of_this_optimizer
                if steps_of_this_optimizer % config.frequency == 0:
                    self.step_scheduler(config)

    def step_epoch_schedulers(self, epoch: int) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and (epoch + 1) % config.frequency == 0:
                self.step_scheduler(config)

    def step_scheduler(self, config: SchedulerConfig) -> None:
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metrics = self.trainer.callback_metrics
            value = metrics.get(config.monitor)
            if value is None:
                message = (
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; available: "
                    f"{sorted(metrics)}; log it with self.log({config.monitor!r}, ...) or set strict=False"
                )
                if config.strict:
                    raise ValueError(message)
                warnings.warn(message + " (skipping this scheduler step)", stacklevel=2)
                return
            config.scheduler.step(value)
        else:
            config.scheduler.step()

    # -- what a module asks for (through Trainer's public handle) ---------------------------
    def clip(self, optimizer, value: float, algorithm: str) -> None:
        raw = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
        if algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={algorithm!r}; use 'norm' or 'value'")
        self.trainer.precision.unscale(raw)
        self.trainer.strategy.clip_gradients(raw, value, algorithm)

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        self.trainer.strategy.backward(self.trainer.precision.scale(loss), *args, **kwargs)

    def manual_optimizer_step(self, wrapped: WrappedOptimizer, closure=None, **kwargs):
        trainer = self.trainer
        optimizer = wrapped.optimizer
        trainer.module.on_before_optimizer_step(optimizer)
        if closure is not None:
            result = trainer.strategy.optimizer_step(optimizer, closure)
        else:
            result = trainer.precision.step(optimizer, lambda: trainer.strategy.optimizer_step(optimizer))
        trainer.global_step += 1
        self.manual_stepped = True
        return result

    def optimizer_index(self, optimizer) -> int:
        raw = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
        for idx, opt in enumerate(self.trainer.optimizers):
            if opt is raw:
                return idx
        raise ValueError("toggle_optimizer: this optimizer was not returned by configure_optimizers")


def extract_loss(outputs) -> torch.Tensor | None:
    if outputs is None:
        return None
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "loss" not in outputs:
            raise ValueError("training_step returned a dict without a 'loss' key; return {'loss': loss, ...}")
        return outputs["loss"]
    raise TypeError(
        f"training_step must return a loss tensor, a dict with 'loss', or None; got {type(outputs).__name__}"
    )

