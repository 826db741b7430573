"""The ``Trainer``: the wiring of the loop's components, and the handle modules and callbacks use.

The loop itself is written once, in components named by what they do (each a short file):


=========================  ==================================================================
``settings.py``            the constructor's arguments, checked once, frozen (``TrainerSettings``)
``model_preparation.py``   channels-last and ``torch.compile`` before the strategy wraps the module
``loaders.py``             where the loaders come from; each rank's share (``data_distribution.py``)
``fit_loop.py``            epochs of batches until a stop bound; what runs between batches
``stepping.py``            one batch: forward, backward, accumulation, clipping, precision, the
                           optimizer step, schedulers; manual optimization
``nonfinite_guard.py``     what a NaN/inf loss on any rank does
``evaluation_loop.py``     validation inside fit, ``validate`` and ``test``
``metric_publisher.py``    metrics to the logger, progress bar and ``callback_metrics``; the logger
``checkpoint_state.py``    what a checkpoint holds; resuming from one
``callback_list.py``       the callbacks and the one place their hooks are called from
=========================  ==================================================================

A batch flows: fetch -> ``strategy.batch_to_device`` -> forward under autocast through the
strategy's wrapper (so DDP's hooks see it) -> ``training_step_end`` -> backward (gradient sync
suppressed on non-final micro-batches) -> clip -> optimizer step -> schedulers -> hooks ->
metrics at logging intervals only -> validation at its interval -> checkpoints.

What a module or callback may ask of its trainer is the public surface below: the run's position
(``global_step``, ``current_epoch``), ``strategy``, ``optimizers``, ``lr_scheduler_configs``,
``callback_metrics``, ``estimated_stepping_batches``, ``should_stop``, ``save_checkpoint``,
``log_metrics``, and for manual optimization ``manual_backward``, ``manual_optimizer_step``,
``toggle_optimizer``/``untoggle_optimizer`` and ``clip_gradients``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from scale_ssl.runtime import CollectiveFailure, is_collective_failure
from scale_ssl.runtime.precision_choice import resolve_precision
from scale_ssl.strategies import Strategy, build_strategy
from scale_ssl.strategies.step_settings import StepSettings
from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.callback_list import CallbackList
from scale_ssl.trainer.checkpoint_state import CheckpointState, elastic_restart_count
from scale_ssl.trainer.evaluation_loop import EvaluationLoop
from scale_ssl.trainer.fit_loop import FitLoop
from scale_ssl.trainer.loaders import LoaderSource, limited_length
from scale_ssl.trainer.manual_optimization import WrappedOptimizer
from scale_ssl.trainer.metric_publisher import MetricPublisher
from scale_ssl.trainer.model_preparation import native_cpu_bf16, prepare_module
from scale_ssl.trainer.module import SSLModule
from scale_ssl.trainer.nonfinite_guard import NonFiniteGuard, NonFiniteLossError  # noqa: F401  (re-exported)
from scale_ssl.trainer.optimizer_config import SchedulerConfig, parse_optimizer_config
from scale_ssl.trainer.precision import Precision
from scale_ssl.trainer.seed import seed_everything
from scale_ssl.trainer.stepping import Stepping
from scale_ssl.trainer.settings import (  # noqa: F401  (re-exported)
    COMPILE_STRATEGIES,
    NONFINITE_POLICIES,
    TrainerSettings,
)


class _StepAdapter(nn.Module):
    """Makes ``forward`` run ``training_step`` so a DDP wrapper sees the step as its forward."""

    def __init__(self, module: SSLModule):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module.training_step(*args)


class Trainer:
    """Fit, validate, test and predict with an ``SSLModule`` on a strategy backend.

    Args:
        strategy: "single", "ddp" (or a ``Strategy`` instance); ``strategy_options`` are passed on.
        max_epochs / min_epochs / max_steps / min_steps: stop bounds; ``should_stop`` (e.g. from
            EarlyStopping) is honoured only once the minimums are reached. With neither
            ``max_epochs`` nor ``max_steps`` one epoch runs.
        precision: "32", "bf16-mixed", "16-mixed" (CUDA only), or "auto": bf16-mixed where the device
            runs bf16 natively, else "32" (scale_ssl/runtime/precision_choice.py).
        accumulate_grad_batches: micro-batches per optimizer step; the loss is divided by it and
            DDP skips gradient sync on all but the last micro-batch.
        gradient_clip_val / gradient_clip_algorithm: clip by global norm ("norm") or value.
        check_val_every_n_epoch / val_check_interval: validate every n epochs, or inside an epoch
            every ``val_check_interval`` batches (int) or fraction of the epoch (float).
        limit_{train,val,test,predict}_batches: an int count or a float fraction of the loader.
        num_sanity_val_steps: validation batches run before training (skipped on resume).
        fast_dev_run: True (or n) runs 1 (n) batch of train/val/test with no checkpoints or logs.
        log_every_n_steps: metrics are reduced and fetched from the device only this often.
        logger: an MLflow-style logger, ``None`` for the default MLflow logger, ``False`` for none.
        callbacks: ``Callback`` instances.
        checkpoint_every_n_steps: write ``last.ckpt`` every N optimizer steps (0: at the end only).
        default_root_dir: where checkpoints (``checkpoints/``) and the local MLflow store go.
        seed / deterministic: seeding of python/numpy/torch on every rank; deterministic kernels.
        run_config: the resolved run config, stored in checkpoints and logged to MLflow.
        on_nonfinite_loss: what a NaN/inf loss on any rank does. The check is one all-gather of a
            per-rank flag before backward, so every rank takes the same decision. "stop" (default):
            the step is skipped on all ranks; after ``max_consecutive_nonfinite`` consecutive
            skipped steps the last good state is checkpointed and ``NonFiniteLossError`` names the
            step and ranks. "skip": skip such steps and keep going. "off": no check.
            On XLA (where a host read mid-step would split the compiled step program) the flag
            stays on the device and is read at each log interval: "stop" then stops there, naming
            the steps and ranks, without skipping (the last checkpoint is the last good state);
            "skip" is refused there.
        max_consecutive_nonfinite: consecutive non-finite steps tolerated under "stop".
        channels_last: convert the module's 4-D weights to channels-last memory format before
            training (inputs follow inside the first convolution). None (default): on for a
            convolutional module under "single"/"ddp" on CUDA, or under bf16-mixed on a CPU with
            native bf16; off otherwise (fp32 on a CPU measured no faster). True forces it
            (single/ddp only), False keeps the default layout.
        compile_model: ``torch.compile`` the method's ``encoder`` (the backbone every method has,
            nearly all of a step's compute) in place with ``nn.Module.compile``, so parameter
            names, checkpoints and DDP's wrapper are unchanged. Off by default: the first steps pay
            the compilation (tens of seconds for a ResNet on CPU; docs/BENCHMARKS.md
            "torch.compile"), which short runs do not earn back. Supported under "single" and
            "ddp"; refused under dp (threads replicate the module), deepspeed and xla (their own
            engines trace the model).
        use_distributed_sampler: under a multi-rank strategy, re-create a map-style DataLoader
            given to fit/validate/test/predict (directly, by the module's hooks or a datamodule)
            so each rank reads its share: training splits the (shuffled, re-shuffled every epoch)
            order into equal shares without repeats, evaluation into shares that together hold
            every sample exactly once; a user's own sampler is kept and split the same way
            (``scale_ssl/trainer/data_distribution.py``). False: loaders are used as given.

    Under an elastic restart (torchrun sets ``TORCHELASTIC_RESTART_COUNT > 0``) ``fit`` defaults
    to ``ckpt_path="last"``: the newest checkpoint that passes its checksum (``last.ckpt``, else the
    ``last.ckpt.prev`` it replaced); with none yet, training starts from scratch.
    """

    def __init__(
        self,
        strategy: str | Strategy = "single",
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        min_steps: int | None = None,
        precision: str | int = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        check_val_every_n_epoch: int | None = 1,
        val_check_interval: int | float | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        num_sanity_val_steps: int = 2,
        fast_dev_run: bool | int = False,
        log_every_n_steps: int = 50,
        logger: Any = None,
        callbacks: list[Callback] | None = None,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
        checkpoint_every_n_steps: int = 0,
        default_root_dir: str = "runs",
        seed: int | None = 0,
        deterministic: bool = False,
        run_config: dict | None = None,
        optim_recipe: Any = None,
        strategy_options: dict | None = None,
        on_nonfinite_loss: str = "stop",
        max_consecutive_nonfinite: int = 3,
        compile_model: bool = False,
        channels_last: bool | None = None,
        use_distributed_sampler: bool = True,
    ):
        options = dict(strategy_options or {})
        precision = resolve_precision(precision, options.get("accelerator", "auto"))
        self.settings = TrainerSettings.from_arguments(
            max_epochs=max_epochs, min_epochs=min_epochs, max_steps=max_steps, min_steps=min_steps,
            precision=precision, accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
            check_val_every_n_epoch=check_val_every_n_epoch, val_check_interval=val_check_interval,
            limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
            num_sanity_val_steps=num_sanity_val_steps, fast_dev_run=fast_dev_run,
            log_every_n_steps=log_every_n_steps, logger_enabled=logger is not False,
            enable_progress_bar=enable_progress_bar, enable_checkpointing=enable_checkpointing,
            checkpoint_every_n_steps=checkpoint_every_n_steps, default_root_dir=default_root_dir, seed=seed,
            deterministic=deterministic, on_nonfinite_loss=on_nonfinite_loss,
            max_consecutive_nonfinite=max_consecutive_nonfinite, compile_model=compile_model,
            channels_last=channels_last, use_distributed_sampler=use_distributed_sampler,
        )
        if strategy == "fsdp":  # FSDP casts parameters itself: it needs the run's precision
            options.setdefault("precision", str(precision))
        self.strategy = build_strategy(strategy, **options)
        engine_precision = getattr(self.strategy, "precision", None)
        if engine_precision is not None and engine_precision.replace("-true", "") != str(precision).replace("-true", ""):
            raise ValueError(
                f"trainer.precision={str(precision)!r} but the {self.strategy.name} strategy was built for precision "
                f"{engine_precision!r}; build it with the trainer's precision (or pass the strategy by name)"
            )
        self.settings.check_strategy(self.strategy.name)
        self.run_config = run_config
        self.optim_recipe = optim_recipe
        self.recipe = None
        self.channels_last = False  # resolved by fit()

        # Where the run stands (what a checkpoint records) and what fit() attached.
        self.state = "initializing"
        self.global_step = 0
        self.current_epoch = 0
        self.batch_in_epoch = 0
        self.planned_steps: int | None = None
        self.should_stop = False
        self.sanity_checking = False
        self.module: SSLModule | None = None
        self.wrapped: nn.Module | None = None
        self.precision: Precision | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.wrapped_optimizers: list[WrappedOptimizer] = []
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.optimizer_frequencies: list[int] = []
        self.train_dataloader = None
        self.val_dataloaders: list = []
        self.logger = None
        self.callback_metrics: dict[str, float] = {}
        self.logged_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.callbacks = CallbackList(callbacks or [])

        # The components (each holds this trainer as its wiring).
        self.loaders = LoaderSource(self)
        self.fit_loop = FitLoop(self)
        self.stepping = Stepping(self)
        self.nonfinite = NonFiniteGuard(self)
        self.evaluation = EvaluationLoop(self)
        self.metrics = MetricPublisher(self, logger)
        self.checkpointing = CheckpointState(self)
        self._environment_ready = False

    # -- derived quantities a module may ask for -------------------------------------------
    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def num_training_batches(self) -> int | None:
        return limited_length(self.loaders.train_loader(), self.settings.limit_train_batches)

    @property
    def steps_per_epoch(self) -> int | None:
        n = self.num_training_batches
        if n is None:
            return None
        return math.ceil(n / self.settings.accumulate_grad_batches) * self.stepping.steps_per_optimizer_round()

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimizer steps this fit will run (what warmup/cosine schedules are laid over)."""
        if self.settings.max_steps > 0:
            return self.settings.max_steps
        per_epoch = self.steps_per_epoch
        if per_epoch is None or self.settings.max_epochs is None:
            raise ValueError(
                "cannot know the number of training steps: set trainer.max_steps, or give a training "
                "stream with a length together with trainer.max_epochs"
            )
        return per_epoch * self.settings.max_epochs

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.settings.default_root_dir, "checkpoints")

    @property
    def nonfinite_steps_skipped(self) -> int:
        return self.nonfinite.steps_skipped

    # -- entry points ----------------------------------------------------------------------
    def fit(self, model: SSLModule, train_dataloaders=None, val_dataloaders=None, datamodule=None,
            ckpt_path: str | None = None) -> SSLModule:
        self.state = "fit"
        module = self._attach(model, "fit", datamodule)
        self.loaders.train_source = train_dataloaders
        self.loaders.datamodule = datamodule
        self.train_dataloader = None
        settings = self.settings
        # Engines that step the optimizer themselves (DeepSpeed) are built from these settings.
        self.strategy.configure_step(StepSettings(settings.precision_name, settings.accumulate_grad_batches,
                                                  settings.gradient_clip_val, settings.gradient_clip_algorithm))
        self.channels_last = prepare_module(module, settings, self.strategy)
        self.wrapped = self.strategy.setup_module(_StepAdapter(module))
        returned = self._recipe_optimizers(module) if self.optim_recipe is not None else module.configure_optimizers()
        self.optimizers, self.lr_scheduler_configs, self.optimizer_frequencies = parse_optimizer_config(returned)
        self.wrapped, self.optimizers = self.strategy.connect_optimizers(self.wrapped, self.optimizers)
        self.wrapped_optimizers = [WrappedOptimizer(opt, self, i) for i, opt in enumerate(self.optimizers)]
        self.stepping.check_optimization_mode(module)
        self.train_dataloader = self.loaders.train_loader()
        if self.train_dataloader is None:
            raise ValueError("no training data: pass train_dataloaders to fit() or implement train_dataloader()")
        self.planned_steps = self._steps_planned_for_this_fit()
        self.val_dataloaders = self.loaders.loaders(val_dataloaders, "val_dataloader", datamodule)

        if ckpt_path is None and settings.enable_checkpointing and elastic_restart_count() > 0:
            ckpt_path = "last"  # the elastic agent restarted us: continue from the newest good checkpoint
        checkpoint = None
        if ckpt_path is not None:
            checkpoint = self.checkpointing.load_for_fit(ckpt_path)
            if checkpoint is not None:
                self.checkpointing.restore(checkpoint)
        self.logger = self.metrics.start_logger(checkpoint, module)

        status = "FAILED"
        try:
            self.callbacks.call_with_module("on_fit_start", self, module)
            if checkpoint is None and settings.num_sanity_val_steps != 0 and self.evaluation.has_validation(module):
                self.evaluation.sanity_check(module)
            module.train()
            self.callbacks.call_with_module("on_train_start", self, module)
            self.fit_loop.run(module)
            self.nonfinite.check_deferred()
            self.callbacks.call_with_module("on_train_end", self, module)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as err:
            if self.world_size > 1 and is_collective_failure(err):
                # A peer died or stalls: say who and where, then exit non-zero so the elastic agent
                # restarts the group (waiting longer would only hang the job).
                raise CollectiveFailure(
                    f"rank {self.global_rank} at global step {self.global_step} (epoch {self.current_epoch}, batch "
                    f"{self.batch_in_epoch}): a collective failed ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}); another rank died or "
                    "stalled past the collective timeout (trainer.collective_timeout_s)"
                ) from err
            raise
        finally:
            if status == "FINISHED":
                # Not again if the loop just wrote this very state: the kept ``.prev`` must stay
                # one checkpoint older, or a damaged last.ckpt would have no real fallback.
                if settings.enable_checkpointing and self.checkpointing.last_saved != (self.global_step, self.current_epoch):
                    self.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
                self.callbacks.call_with_module("on_fit_end", self, module)
            self.metrics.finish_logger(status)
            self._teardown(module, "fit")
            # The training wrapper (DDP holds the process group) is not needed past fit:
            # validate/test/predict run the module itself. Dropping it lets the strategy's
            # process group be freed, threads joined, when it is destroyed (strategies/ddp.py).
            self.wrapped = None
        self.state = "finished"
        return module

    def validate(self, model: SSLModule, dataloaders=None, datamodule=None, ckpt_path: str | None = None) -> list[dict]:
        return self._evaluate(model, "validate", dataloaders, datamodule, ckpt_path)

    def test(self, model: SSLModule, dataloaders=None, datamodule=None, ckpt_path: str | None = None) -> list[dict]:
        return self._evaluate(model, "test", dataloaders, datamodule, ckpt_path)

    def predict(self, model: SSLModule, dataloaders=None, datamodule=None, ckpt_path: str | None = None) -> list:
        self.state = "predict"
        module = self._attach(model, "predict", datamodule)
        loaders = self.loaders.loaders(dataloaders, "predict_dataloader", datamodule)
        if not loaders:
            raise ValueError("no predict data: pass dataloaders to predict() or implement predict_dataloader()")
        self._load_weights(module, ckpt_path)
        try:
            return self.evaluation.predict(module, loaders)
        finally:
            self._teardown(module, "predict")

    def _evaluate(self, model, stage: str, dataloaders, datamodule, ckpt_path) -> list[dict]:
        self.state = stage
        module = self._attach(model, stage, datamodule)
        hook = "val_dataloader" if stage == "validate" else "test_dataloader"
        loaders = self.loaders.loaders(dataloaders, hook, datamodule)
        if not loaders:
            raise ValueError(f"no {stage} data: pass dataloaders to {stage}() or implement {hook}()")
        self._load_weights(module, ckpt_path)
        self.logger = self.metrics.logger_for_evaluation()
        try:
            return self.evaluation.run(module, stage, loaders)
        finally:
            self._teardown(module, stage)

    def _load_weights(self, module: SSLModule, ckpt_path: str | None) -> None:
        if ckpt_path is not None:
            module.load_state_dict(self.strategy.load_checkpoint(self.checkpointing.resolve_path(ckpt_path))["state_dict"])
        module.to(self.strategy.root_device)

    # -- set-up ----------------------------------------------------------------------------
    def _attach(self, module: SSLModule, stage: str, datamodule) -> SSLModule:
        if not isinstance(module, SSLModule):
            raise TypeError(f"Trainer.{stage} expects an SSLModule, got {type(module).__name__}")
        strategy, settings = self.strategy, self.settings
        if not self._environment_ready:
            strategy.setup_environment()
            self._environment_ready = True
        if settings.seed is not None:
            seed_everything(settings.seed)
        if settings.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.module = module
        module.trainer = self
        self.precision = Precision(settings.precision_name, strategy.root_device, autocast=strategy.autocast_enabled)
        if settings.precision_name == "bf16-mixed" and strategy.root_device.type == "cpu" and not native_cpu_bf16():
            warnings.warn(
                "trainer.precision='bf16-mixed' on a CPU whose oneDNN has no native bf16 (no AVX512-BF16 or AMX): "
                "bf16 is emulated here and slower than fp32; set trainer.precision=auto (or 32) for speed on this machine",
                stacklevel=2,
            )
        # prepare_data writes to disk: once per node, before any rank builds a loader.
        if strategy.local_rank == 0:
            if datamodule is not None and hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
            module.prepare_data()
        strategy.barrier()
        if datamodule is not None and hasattr(datamodule, "setup"):
            datamodule.setup(stage)
        module.setup(stage)
        self.callbacks.call("setup", self, module, stage)
        return module

    def _teardown(self, module: SSLModule, stage: str) -> None:
        self.callbacks.call("teardown", self, module, stage)
        module.teardown(stage)

    def _recipe_optimizers(self, module: SSLModule):
        """The config's ``optim`` recipe replaces the method's own ``configure_optimizers``."""
        from scale_ssl.trainer.callbacks import FreezeParameters, StochasticWeightAveraging

        built = self.optim_recipe.build(module, self.steps_per_epoch, self.estimated_stepping_batches)
        self.recipe = built
        if self.is_global_zero and self.settings.enable_progress_bar:
            print(self.optim_recipe.describe(built), flush=True)
        if built.frozen:
            self.callbacks.append(FreezeParameters(built.frozen))
        swa = self.optim_recipe.swa
        if swa is not None:
            self.callbacks.append(StochasticWeightAveraging(swa_lrs=swa["lr"], swa_epoch_start=swa.get("start_epoch", 0.8),
                                                            annealing_epochs=swa.get("anneal_epochs", 10)))
        if built.scheduler_config is None:
            return built.optimizer
        return {"optimizer": built.optimizer, "lr_scheduler": built.scheduler_config}

    def _steps_planned_for_this_fit(self) -> int | None:
        """``estimated_stepping_batches`` (what schedules are laid over), or None when unknown."""
        try:
            return self.estimated_stepping_batches
        except ValueError:
            return None

    # -- the handle for modules and callbacks ----------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Called on every rank (states are gathered); rank zero writes atomically."""
        self.checkpointing.save(path)

    def log_metrics(self, values: dict[str, float]) -> None:
        """For callbacks: publish host floats to the logger and ``callback_metrics``."""
        self.metrics.publish(dict(values), shown=[])

    def has_validation(self, module: SSLModule | None = None) -> bool:
        """Whether this fit validates (validation loaders and a ``validation_step``)."""
        return self.evaluation.has_validation(module if module is not None else self.module)

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        self.stepping.manual_backward(loss, *args, **kwargs)

    def manual_optimizer_step(self, optimizer: WrappedOptimizer, closure=None, **kwargs):
        return self.stepping.manual_optimizer_step(optimizer, closure, **kwargs)

    def toggle_optimizer(self, module: SSLModule, optimizer) -> None:
        self.stepping.toggle.toggle(module, self.optimizers, self.stepping.optimizer_index(optimizer))

    def untoggle_optimizer(self, module: SSLModule) -> None:
        self.stepping.toggle.untoggle(module)

    def clip_gradients(self, optimizer, gradient_clip_val: float, gradient_clip_algorithm: str = "norm") -> None:
        self.stepping.clip(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _setting(name: str, field: str | None = None) -> property:
    field = field or name
    return property(lambda self: getattr(self.settings, field), doc=f"``trainer.settings.{field}`` (read-only)")


# The settings read as the trainer's own attributes, as in Lightning (``trainer.max_steps``, ...).
for _name in ("max_epochs", "min_epochs", "max_steps", "min_steps", "precision_name", "accumulate_grad_batches",
              "gradient_clip_val", "gradient_clip_algorithm", "check_val_every_n_epoch", "val_check_interval",
              "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
              "num_sanity_val_steps", "fast_dev_run", "log_every_n_steps", "enable_progress_bar",
              "enable_checkpointing", "checkpoint_every_n_steps", "default_root_dir", "seed", "deterministic",
              "on_nonfinite_loss", "max_consecutive_nonfinite", "compile_model", "use_distributed_sampler"):
    setattr(Trainer, _name, _setting(_name))
Trainer.channels_last_setting = _setting("channels_last_setting", "channels_last")
del _name
