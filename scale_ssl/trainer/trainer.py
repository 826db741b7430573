"""The one training loop. Strategies decide how it is distributed; methods decide what it learns.

The loop is written once and reads top to bottom: fetch batch -> forward under autocast (through
the strategy's wrapper, so DDP's hooks see it) -> ``training_step_end`` -> backward (gradient
sync suppressed on non-final micro-batches) -> clip -> optimizer step -> schedulers -> hooks ->
metrics at logging intervals only -> checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import nn

from scale_ssl.strategies import Strategy, build_strategy
from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.module import SSLModule
from scale_ssl.trainer.optimizer_config import SchedulerConfig, parse_optimizer_config
from scale_ssl.trainer.precision import Precision
from scale_ssl.trainer.progress import ProgressDisplay
from scale_ssl.trainer.seed import rng_state, seed_everything, set_rng_state
from scale_ssl.strategies.checkpoint_io import CHECKPOINT_FORMAT_VERSION


class _TrainingStepAdapter(nn.Module):
    """Makes ``forward`` run ``training_step`` so a DDP wrapper sees the step as its forward."""

    def __init__(self, module: SSLModule):
        super().__init__()
        self.module = module

    def forward(self, batch, batch_idx: int):
        return self.module.training_step(batch, batch_idx)


class Trainer:
    """Fit an ``SSLModule`` with a strategy backend.

    Args:
        strategy: "single", "ddp" (or a ``Strategy`` instance).
        max_steps: optimizer steps to run (-1: bounded by ``max_epochs``).
        max_epochs: passes over the training stream (``None`` with ``max_steps=-1`` means 1).
        precision: "32", "bf16-mixed", "16-mixed" (CUDA only).
        accumulate_grad_batches: micro-batches per optimizer step; the loss is divided by it and
            DDP skips gradient sync on all but the last micro-batch.
        gradient_clip_val / gradient_clip_algorithm: clip by global norm ("norm") or value.
        log_every_n_steps: metrics are reduced and fetched from the device only this often.
        logger: an MLflow-style logger, ``None`` for the default MLflow logger, ``False`` for none.
        checkpoint_every_n_steps: also write ``last.ckpt`` every N optimizer steps (0: at the end only).
        default_root_dir: where checkpoints (``checkpoints/``) and the local MLflow store go.
        seed: seeds python/numpy/torch identically on every rank before the module is set up.
        strategy_options: keyword arguments for the strategy (e.g. ``sync_batchnorm``).
    """

    def __init__(
        self,
        strategy: str | Strategy = "single",
        max_steps: int = -1,
        max_epochs: int | None = None,
        precision: str | int = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        log_every_n_steps: int = 50,
        logger: Any = None,
        callbacks: list[Callback] | None = None,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
        checkpoint_every_n_steps: int = 0,
        default_root_dir: str = "runs",
        seed: int | None = 0,
        limit_train_batches: int | None = None,
        check_val_every_n_epoch: int = 1,
        run_config: dict | None = None,
        strategy_options: dict | None = None,
    ):
        _check_int("trainer.max_steps", max_steps, minimum=-1)
        if max_epochs is not None:
            _check_int("trainer.max_epochs", max_epochs, minimum=1)
        _check_int("trainer.accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        _check_int("trainer.log_every_n_steps", log_every_n_steps, minimum=1)
        _check_int("trainer.checkpoint_every_n_steps", checkpoint_every_n_steps, minimum=0)
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}; use 'norm' or 'value'"
            )
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"trainer.gradient_clip_val must be > 0 or null, got {gradient_clip_val!r}")
        self.strategy = build_strategy(strategy, **(strategy_options or {}))
        self.max_steps = max_steps
        self.max_epochs = max_epochs if max_epochs is not None else (1 if max_steps == -1 else None)
        self.precision_name = str(precision)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.log_every_n_steps = log_every_n_steps
        self._logger_arg = logger
        self.logger = None
        self.callbacks = list(callbacks or [])
        self.enable_progress_bar = enable_progress_bar
        self.enable_checkpointing = enable_checkpointing
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.default_root_dir = default_root_dir
        self.seed = seed
        self.limit_train_batches = limit_train_batches
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.run_config = run_config

        self.global_step = 0
        self.current_epoch = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.callback_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.module: SSLModule | None = None
        self.train_dataloader = None
        self.should_stop = False

    # -- derived quantities a module may ask for -------------------------------------------
    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def num_training_batches(self) -> int | None:
        loader = self.train_dataloader
        try:
            n = len(loader)
        except TypeError:
            return None
        if self.limit_train_batches is not None:
            n = min(n, self.limit_train_batches)
        return n

    @property
    def steps_per_epoch(self) -> int | None:
        n = self.num_training_batches
        return None if n is None else math.ceil(n / self.accumulate_grad_batches)

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimizer steps this fit will run (what warmup/cosine schedules are laid over)."""
        if self.max_steps > 0:
            return self.max_steps
        per_epoch = self.steps_per_epoch
        if per_epoch is None or self.max_epochs is None:
            raise ValueError(
                "cannot know the number of training steps: set trainer.max_steps, or give a training "
                "stream with a length together with trainer.max_epochs"
            )
        return per_epoch * self.max_epochs

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.default_root_dir, "checkpoints")

    # -- fit -------------------------------------------------------------------------------
    def fit(self, module: SSLModule, train_dataloaders=None, ckpt_path: str | None = None) -> SSLModule:
        strategy = self.strategy
        strategy.setup_environment()
        if self.seed is not None:
            seed_everything(self.seed)
        self.module = module
        module.trainer = self
        self.precision = Precision(self.precision_name, strategy.root_device)
        module.setup("fit")
        self.train_dataloader = train_dataloaders if train_dataloaders is not None else module.train_dataloader()
        if self.train_dataloader is None:
            raise ValueError("no training data: pass train_dataloaders to fit() or implement train_dataloader()")

        adapter = _TrainingStepAdapter(module)
        self.wrapped = strategy.setup_module(adapter)
        self.optimizers, self.lr_scheduler_configs = parse_optimizer_config(module.configure_optimizers())

        checkpoint = None
        if ckpt_path is not None:
            checkpoint = strategy.load_checkpoint(self._resolve_ckpt_path(ckpt_path))
            self._restore(checkpoint)

        self.logger = self._build_logger(checkpoint)
        if self.logger is not None and checkpoint is None:
            self.logger.log_hyperparams(self._params_to_log(module))
            if self.run_config is not None:
                self.logger.log_dict(self.run_config, "config/resolved_config.yaml")

        for cb in self.callbacks:
            cb.on_fit_start(self, module)
        module.on_fit_start()
        module.train()
        module.on_train_start()
        status = "FAILED"
        try:
            self._fit_loop(module)
            status = "FINISHED"
        finally:
            if self.enable_checkpointing and status == "FINISHED":
                self.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
            if status == "FINISHED":
                module.on_train_end()
                for cb in self.callbacks:
                    cb.on_fit_end(self, module)
            if self.logger is not None:
                if status == "FINISHED":
                    self.logger.log_metric_curves(keys=_curve_keys(self.history))
                self.logger.finalize(status)
        return module

    def _fit_loop(self, module: SSLModule) -> None:
        total_steps = self.max_steps if self.max_steps > 0 else self.estimated_stepping_batches
        with ProgressDisplay(self.enable_progress_bar and self.is_global_zero, total_steps) as progress:
            self._progress = progress
            progress.update(self.global_step)
            window_start, window_images = time.perf_counter(), 0
            while not self._done():
                loader = self.train_dataloader
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(self.current_epoch)
                module.on_train_epoch_start()
                for cb in self.callbacks:
                    cb.on_train_epoch_start(self, module)
                num_batches = self.num_training_batches
                # Mid-epoch resume: a stream that can seek (``skip_batches``) starts after the
                # batches already trained on; any other iterable is replayed without compute.
                skip, self._batches_to_skip = self._batches_to_skip, 0
                start = 0
                if skip and hasattr(loader, "skip_batches"):
                    loader.skip_batches(skip)
                    start, skip = skip, 0
                exhausted, batch_idx = True, -1
                for batch_idx, batch in enumerate(loader, start=start):
                    if num_batches is not None and batch_idx >= num_batches:
                        break
                    if batch_idx < skip:
                        continue
                    window_images += _batch_size(batch) * self.world_size
                    stepped = self._train_micro_batch(module, batch, batch_idx, num_batches)
                    self._batch_in_epoch = batch_idx + 1
                    if stepped and self.global_step % self.log_every_n_steps == 0:
                        elapsed = time.perf_counter() - window_start
                        self._log_step_metrics(module, images_per_s=window_images / max(elapsed, 1e-9))
                        window_start, window_images = time.perf_counter(), 0
                    if stepped and self.checkpoint_every_n_steps and self.global_step % self.checkpoint_every_n_steps == 0:
                        self.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
                    if self._done():
                        exhausted = num_batches is not None and batch_idx + 1 >= num_batches
                        break
                if batch_idx < 0:
                    raise RuntimeError(
                        f"the training stream yielded no batch in epoch {self.current_epoch}; check the shard "
                        "paths and that global_batch_size is not larger than the data set"
                    )
                if exhausted:
                    self._end_epoch(module)

    def _end_epoch(self, module: SSLModule) -> None:
        module.on_train_epoch_end()
        for cb in self.callbacks:
            cb.on_train_epoch_end(self, module)
        for config in self.lr_scheduler_configs:
            if config.interval == "epoch" and (self.current_epoch + 1) % config.frequency == 0:
                self._step_scheduler(config)
        self.current_epoch += 1
        self._batch_in_epoch = 0

    def _done(self) -> bool:
        if self.should_stop:
            return True
        if self.max_steps > 0 and self.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    def _train_micro_batch(self, module: SSLModule, batch, batch_idx: int, num_batches: int | None) -> bool:
        strategy = self.strategy
        accumulate = self.accumulate_grad_batches
        last_of_epoch = num_batches is not None and batch_idx + 1 == num_batches
        is_step = (batch_idx + 1) % accumulate == 0 or last_of_epoch
        batch = strategy.batch_to_device(batch)
        with strategy.no_backward_sync(self.wrapped, enabled=not is_step):
            with self.precision.autocast():
                outputs = self.wrapped(batch, batch_idx)
            outputs = module.training_step_end(outputs)
            loss = _extract_loss(outputs)
            if loss is None:
                if self.world_size > 1:
                    raise RuntimeError(
                        "training_step returned None under a distributed strategy; every rank must return a loss "
                        "(skipping on one rank would leave the others waiting in the gradient all-reduce)"
                    )
                return False
            strategy.backward(self.precision.scale(loss / accumulate))
        if is_step:
            for optimizer in self.optimizers:
                self._clip_gradients(optimizer)
                self.precision.step(optimizer, lambda opt=optimizer: strategy.optimizer_step(opt))
                optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            for config in self.lr_scheduler_configs:
                if config.interval == "step" and self.global_step % config.frequency == 0:
                    self._step_scheduler(config)
        # After the optimizer step, as in Lightning: EMA targets and queues see the new weights.
        module.on_train_batch_end(outputs, batch, batch_idx)
        for cb in self.callbacks:
            cb.on_train_batch_end(self, module, outputs, batch, batch_idx)
        return is_step

    def _clip_gradients(self, optimizer) -> None:
        if self.gradient_clip_val is None:
            return
        self.precision.unscale(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.gradient_clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val)

    def _step_scheduler(self, config: SchedulerConfig) -> None:
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.callback_metrics.get(config.monitor)
            if value is None:
                if config.strict:
                    raise ValueError(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was never logged; log it with "
                        f"self.log({config.monitor!r}, ...) or set strict=False"
                    )
                return
            config.scheduler.step(value)
        else:
            config.scheduler.step()

    # -- metrics ---------------------------------------------------------------------------
    def _log_step_metrics(self, module: SSLModule, images_per_s: float) -> None:
        """Reduce and fetch the module's logged values. Every rank reaches this at the same step,
        so the ``sync_dist`` all-reduce cannot deadlock."""
        logged = dict(module._logged)
        names = sorted(logged)
        values = {}
        synced = [n for n in names if logged[n][1]["sync_dist"]]
        if synced and self.world_size > 1:
            stacked = torch.stack([logged[n][0].float().reshape(()) for n in synced])
            reduced = self.strategy.reduce(stacked, op="mean")
            for n, v in zip(synced, reduced.tolist()):
                values[n] = v
        for n in names:
            if n not in values:
                values[n] = float(logged[n][0].float().mean())
        for i, opt in enumerate(self.optimizers):
            values[f"lr-{i}" if len(self.optimizers) > 1 else "lr"] = float(opt.param_groups[0]["lr"])
        values["images_per_s"] = images_per_s
        values["epoch"] = float(self.current_epoch)
        self.callback_metrics.update(values)
        self.history.append({"step": self.global_step, **values})
        if self.logger is not None:
            self.logger.log_metrics(values, step=self.global_step)
        shown = {n: values[n] for n in names if logged[n][1]["prog_bar"]}
        shown["img/s"] = images_per_s
        self._progress.update(self.global_step, shown)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        module = self.module
        checkpoint = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "module_class": type(module).__name__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "optimizer_states": [opt.state_dict() for opt in self.optimizers],
            "lr_scheduler_states": [c.scheduler.state_dict() for c in self.lr_scheduler_configs],
            "precision_state": self.precision.state_dict(),
            "global_step": self.global_step,
            "epoch": self.current_epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "world_size": self.world_size,
            "rng_states": self.strategy.all_gather_object(rng_state()),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
            "mlflow_run_id": self.logger.run_id if self.logger is not None else None,
            "config": self.run_config,
        }
        if hasattr(self.train_dataloader, "state_dict"):
            checkpoint["data_state"] = self.train_dataloader.state_dict()
        module.on_save_checkpoint(checkpoint)
        self.strategy.save_checkpoint(checkpoint, path)

    def _resolve_ckpt_path(self, ckpt_path: str) -> str:
        if ckpt_path == "last":
            return os.path.join(self.checkpoint_dir, "last.ckpt")
        return ckpt_path

    _batches_to_skip = 0
    _batch_in_epoch = 0

    def _restore(self, checkpoint: dict) -> None:
        module = self.module
        module.load_state_dict(checkpoint["state_dict"])
        for opt, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            opt.load_state_dict(state)
        for config, state in zip(self.lr_scheduler_configs, checkpoint["lr_scheduler_states"]):
            config.scheduler.load_state_dict(state)
        self.precision.load_state_dict(checkpoint.get("precision_state", {}))
        self.global_step = int(checkpoint["global_step"])
        self.current_epoch = int(checkpoint["epoch"])
        self._batches_to_skip = int(checkpoint.get("batch_in_epoch", 0))
        states = checkpoint.get("rng_states") or []
        if checkpoint.get("world_size") == self.world_size and len(states) == self.world_size:
            set_rng_state(states[self.strategy.global_rank])
        for cb in self.callbacks:
            if cb.state_key in checkpoint.get("callbacks", {}):
                cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
        if "data_state" in checkpoint and hasattr(self.train_dataloader, "load_state_dict"):
            self.train_dataloader.load_state_dict(checkpoint["data_state"])
        module.on_load_checkpoint(checkpoint)
        self._resumed_run_id = checkpoint.get("mlflow_run_id")

    def _build_logger(self, checkpoint: dict | None):
        if self._logger_arg is False:
            return None
        run_id = checkpoint.get("mlflow_run_id") if checkpoint else None
        logger = self._logger_arg
        if logger is None:
            logger = MLflowLogger(default_root_dir=self.default_root_dir, rank=self.strategy.global_rank)
        if run_id is not None:
            logger.continue_run(run_id)
        return logger

    def _params_to_log(self, module: SSLModule) -> dict:
        """The run config as given (flattened by the logger), plus what only the trainer knows."""
        params = dict(self.run_config or {})
        params["module"] = {"class": type(module).__name__, **module.hparams}
        params["strategy"] = {"name": self.strategy.name, "world_size": self.world_size}
        return params


def _extract_loss(outputs) -> torch.Tensor | None:
    if outputs is None:
        return None
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "loss" not in outputs:
            raise ValueError("training_step returned a dict without a 'loss' key")
        return outputs["loss"]
    raise TypeError(
        f"training_step must return a loss tensor, a dict with 'loss', or None; got {type(outputs).__name__}"
    )


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)):
        for item in batch:
            return _batch_size(item)
    if isinstance(batch, dict):
        for item in batch.values():
            return _batch_size(item)
    return 1


def _curve_keys(history: list[dict]) -> tuple[str, ...]:
    keys = {k for row in history for k in row if "loss" in k}
    return tuple(sorted(keys))


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
