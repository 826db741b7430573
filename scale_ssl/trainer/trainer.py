"""The one training loop. Strategies decide how it is distributed; methods decide what it learns.

The loop is written once and reads top to bottom: fetch batch -> forward under autocast (through
the strategy's wrapper, so DDP's hooks see it) -> ``training_step_end`` -> backward (gradient
sync suppressed on non-final micro-batches) -> clip -> optimizer step -> schedulers -> hooks ->
metrics at logging intervals only -> validation at its interval -> checkpoints.

``global_step`` counts optimizer steps summed over optimizers (as Lightning >= 1.6 does), so a
GAN with two optimizers advances it by two per batch.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from scale_ssl.strategies import Strategy, build_strategy
from scale_ssl.strategies.checkpoint_io import (
    CHECKPOINT_FORMAT_VERSION,
    CorruptCheckpointError,
    checkpoint_candidates,
    load_checkpoint_file,
)
from scale_ssl.strategies.ddp import CollectiveFailure, is_collective_failure
from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer.callback import Callback
from scale_ssl.trainer.data_distribution import (
    EVAL,
    TRAIN,
    batch_size_of,
    check_listed_batches,
    distribute_loader,
    equal_batches_by_construction,
    lockstep_batches,
    set_loader_epoch,
)
from scale_ssl.trainer.manual_optimization import OptimizerToggle, WrappedOptimizer
from scale_ssl.trainer.metrics import reduce_and_fetch, reduce_epoch_and_fetch
from scale_ssl.trainer.module import SSLModule
from scale_ssl.trainer.optimizer_config import SchedulerConfig, parse_optimizer_config
from scale_ssl.trainer.precision import Precision
from scale_ssl.trainer.progress import ProgressDisplay
from scale_ssl.trainer.seed import rng_state, seed_everything, set_rng_state


class _StepAdapter(nn.Module):
    """Makes ``forward`` run ``training_step`` so a DDP wrapper sees the step as its forward."""

    def __init__(self, module: SSLModule):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module.training_step(*args)


# Strategies under which trainer.compile is supported (see Trainer's ``compile_model``).
COMPILE_STRATEGIES = ("single", "ddp")
# Strategies under which the module may be converted to channels_last (see ``channels_last``).
CHANNELS_LAST_STRATEGIES = ("single", "ddp")


def native_cpu_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels natively (AVX512-BF16 / AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compile_encoder(module: SSLModule) -> None:
    """Compile ``module.encoder`` in place (``nn.Module.compile``: the module object, its
    parameters and state-dict keys stay, only its call goes through ``torch.compile``), once."""
    encoder = getattr(module, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"trainer.compile=true compiles the method's `encoder` module, and {type(module).__name__} has none; "
            "set trainer.compile=false"
        )
    if getattr(encoder, "_compiled_call_impl", None) is None:
        encoder.compile()


class Trainer:
    """Fit, validate, test and predict with an ``SSLModule`` on a strategy backend.

    Args:
        strategy: "single", "ddp" (or a ``Strategy`` instance); ``strategy_options`` are passed on.
        max_epochs / min_epochs / max_steps / min_steps: stop bounds; ``should_stop`` (e.g. from
            EarlyStopping) is honoured only once the minimums are reached. With neither
            ``max_epochs`` nor ``max_steps`` one epoch runs.
        precision: "32", "bf16-mixed", "16-mixed" (CUDA only).
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
        _check_int("trainer.max_steps", max_steps, minimum=-1)
        if not isinstance(compile_model, bool):
            raise TypeError(f"trainer.compile must be true or false, got {compile_model!r}")
        if channels_last not in (None, True, False):
            raise TypeError(f"trainer.channels_last must be true, false or null (automatic), got {channels_last!r}")
        if on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.on_nonfinite_loss={on_nonfinite_loss!r}; use one of {NONFINITE_POLICIES}")
        _check_int("trainer.max_consecutive_nonfinite", max_consecutive_nonfinite, minimum=1)
        for name, value in (("max_epochs", max_epochs), ("min_epochs", min_epochs), ("min_steps", min_steps)):
            if value is not None:
                _check_int(f"trainer.{name}", value, minimum=0)
        _check_int("trainer.accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        _check_int("trainer.log_every_n_steps", log_every_n_steps, minimum=1)
        _check_int("trainer.checkpoint_every_n_steps", checkpoint_every_n_steps, minimum=0)
        _check_int("trainer.num_sanity_val_steps", num_sanity_val_steps, minimum=-1)
        if check_val_every_n_epoch is not None:
            _check_int("trainer.check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}; use 'norm' or 'value'")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"trainer.gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}")
        for name, value in (("limit_train_batches", limit_train_batches), ("limit_val_batches", limit_val_batches),
                            ("limit_test_batches", limit_test_batches), ("limit_predict_batches", limit_predict_batches)):
            _check_limit(f"trainer.{name}", value)
        if val_check_interval is not None:
            _check_limit("trainer.val_check_interval", val_check_interval)
            if val_check_interval == 0:
                raise ValueError("trainer.val_check_interval must be > 0 (an int batch count or a fraction in (0, 1])")
        if isinstance(fast_dev_run, bool) or fast_dev_run is None:
            fast_dev_batches = 1 if fast_dev_run else 0
        else:
            _check_int("trainer.fast_dev_run", fast_dev_run, minimum=0)
            fast_dev_batches = fast_dev_run

        self.strategy = build_strategy(strategy, **(strategy_options or {}))
        if compile_model and self.strategy.name not in COMPILE_STRATEGIES:
            raise ValueError(
                f"trainer.compile=true is supported with trainer.strategy in {COMPILE_STRATEGIES}, not "
                f"{self.strategy.name!r} (its engine replicates or traces the model itself); set trainer.compile=false"
            )
        self.compile_model = compile_model
        if channels_last and self.strategy.name not in CHANNELS_LAST_STRATEGIES:
            raise ValueError(
                f"trainer.channels_last=true is supported with trainer.strategy in {CHANNELS_LAST_STRATEGIES}, not "
                f"{self.strategy.name!r} (its engine lays out or flattens the parameters itself); set it to null or false"
            )
        self.channels_last_setting = channels_last
        self.channels_last = False  # resolved by fit()
        if not isinstance(use_distributed_sampler, bool):
            raise TypeError(f"use_distributed_sampler must be True or False, got {use_distributed_sampler!r}")
        self.use_distributed_sampler = use_distributed_sampler
        self._equal_batches = True
        self.fast_dev_run = fast_dev_batches
        if fast_dev_batches:
            # As in Lightning: n batches of each stage, one epoch, nothing written.
            max_steps, max_epochs = fast_dev_batches, 1
            limit_train_batches = limit_val_batches = limit_test_batches = limit_predict_batches = fast_dev_batches
            num_sanity_val_steps, val_check_interval, check_val_every_n_epoch = 0, None, 1
            logger, enable_checkpointing = False, False
        self.max_steps = max_steps
        self.max_epochs = max_epochs if max_epochs is not None else (1 if max_steps == -1 else None)
        self.min_epochs = min_epochs or 0
        self.min_steps = min_steps or 0
        self.precision_name = str(precision)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_check_interval = val_check_interval
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.limit_predict_batches = limit_predict_batches
        self.num_sanity_val_steps = num_sanity_val_steps
        self.log_every_n_steps = log_every_n_steps
        self._logger_arg = logger
        self.logger = None
        self.callbacks = list(callbacks or [])
        self.enable_progress_bar = enable_progress_bar
        self.enable_checkpointing = enable_checkpointing
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.default_root_dir = default_root_dir
        self.seed = seed
        self.deterministic = deterministic
        self.run_config = run_config
        self.optim_recipe = optim_recipe
        self.recipe = None
        self.on_nonfinite_loss = on_nonfinite_loss
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_steps_skipped = 0
        self._consecutive_nonfinite = 0
        self._skip_window = False
        self._nonfinite_ranks: list[int] = []
        self._deferred_nonfinite: torch.Tensor | None = None  # device-side flag count (XLA)
        self._deferred_since_step = 0
        self._last_saved: tuple[int, int] | None = None

        self.global_step = 0
        self.current_epoch = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self.wrapped_optimizers: list[WrappedOptimizer] = []
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.optimizer_frequencies: list[int] = []
        self.callback_metrics: dict[str, float] = {}
        self.logged_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.module: SSLModule | None = None
        self.train_dataloader = None
        self.val_dataloaders: list = []
        self.should_stop = False
        self.sanity_checking = False
        self.state = "initializing"
        self._toggle = OptimizerToggle()
        self._batches_to_skip = 0
        self._batch_in_epoch = 0
        self._progress = ProgressDisplay(False, None)
        self._environment_ready = False
        self._end_epoch_early = False
        self._train_source = None
        self._datamodule = None
        self._planned_steps: int | None = None

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
        return _limited_length(self._train_loader(), self.limit_train_batches)

    @property
    def steps_per_epoch(self) -> int | None:
        n = self.num_training_batches
        if n is None:
            return None
        return math.ceil(n / self.accumulate_grad_batches) * self._steps_per_optimizer_round()

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

    # -- entry points ----------------------------------------------------------------------
    def fit(self, model: SSLModule, train_dataloaders=None, val_dataloaders=None, datamodule=None,
            ckpt_path: str | None = None) -> SSLModule:
        self.state = "fit"
        module = self._attach(model, "fit", datamodule)
        self._train_source = train_dataloaders
        self._datamodule = datamodule
        self.train_dataloader = None
        self.strategy.trainer = self  # engines configured from the trainer's settings (DeepSpeed)
        self.channels_last = self._wants_channels_last(module)
        if self.channels_last:
            # Before the strategy wraps the module (DDP's gradient buckets follow the parameters'
            # layout) and before the optimizers exist; Module.to keeps the parameter objects.
            module.to(memory_format=torch.channels_last)
        if self.compile_model:
            _compile_encoder(module)
        self.wrapped = self.strategy.setup_module(_StepAdapter(module))
        returned = self._recipe_optimizers(module) if self.optim_recipe is not None else module.configure_optimizers()
        self.optimizers, self.lr_scheduler_configs, self.optimizer_frequencies = parse_optimizer_config(returned)
        self.wrapped, self.optimizers = self.strategy.connect_optimizers(self.wrapped, self.optimizers)
        self.wrapped_optimizers = [WrappedOptimizer(opt, self, i) for i, opt in enumerate(self.optimizers)]
        self._check_optimization_mode(module)
        self.train_dataloader = self._train_loader()
        if self.train_dataloader is None:
            raise ValueError("no training data: pass train_dataloaders to fit() or implement train_dataloader()")
        self._planned_steps = self._steps_planned_for_this_fit()
        self.val_dataloaders = self._loaders(val_dataloaders, "val_dataloader", datamodule)

        if ckpt_path is None and self.enable_checkpointing and elastic_restart_count() > 0:
            ckpt_path = "last"  # the elastic agent restarted us: continue from the newest good checkpoint
        checkpoint = None
        if ckpt_path is not None:
            checkpoint = self._load_fit_checkpoint(ckpt_path)
            if checkpoint is not None:
                self._restore(checkpoint)
        self.logger = self._build_logger(checkpoint)
        if self.logger is not None and checkpoint is None:
            self.logger.log_hyperparams(self._params_to_log(module))
            if self.recipe is not None:
                self.logger.log_metrics({"effective_lr": self.recipe.effective_lr}, step=0)
            if self.run_config is not None:
                self.logger.log_dict(self.run_config, "config/resolved_config.yaml")

        status = "FAILED"
        try:
            self._call("on_fit_start")
            if checkpoint is None and self.num_sanity_val_steps != 0 and self._has_validation(module):
                self._sanity_check(module)
            module.train()
            self._call("on_train_start")
            self._fit_loop(module)
            self._check_deferred_nonfinite()
            self._call("on_train_end")
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
                    f"{self._batch_in_epoch}): a collective failed ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}); another rank died or "
                    "stalled past the collective timeout (trainer.collective_timeout_s)"
                ) from err
            raise
        finally:
            if status == "FINISHED":
                # Not again if the loop just wrote this very state: the kept ``.prev`` must stay
                # one checkpoint older, or a damaged last.ckpt would have no real fallback.
                if self.enable_checkpointing and self._last_saved != (self.global_step, self.current_epoch):
                    self.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
                self._call("on_fit_end")
            self._finish_logger(status)
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
        loaders = self._loaders(dataloaders, "predict_dataloader", datamodule)
        if not loaders:
            raise ValueError("no predict data: pass dataloaders to predict() or implement predict_dataloader()")
        if ckpt_path is not None:
            module.load_state_dict(self.strategy.load_checkpoint(self._resolve_ckpt_path(ckpt_path))["state_dict"])
        module.to(self.strategy.root_device)
        results = []
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for dl_idx, loader in enumerate(loaders):
                    limit = _limited_length(loader, self.limit_predict_batches)
                    outputs = []
                    for batch_idx, batch in enumerate(loader):
                        if limit is not None and batch_idx >= limit:
                            break
                        batch = module.on_after_batch_transfer(self.strategy.batch_to_device(batch), dl_idx)
                        with self.precision.autocast():
                            outputs.append(module.predict_step(batch, batch_idx, dl_idx) if len(loaders) > 1 else module.predict_step(batch, batch_idx))
                    results.append(outputs)
        finally:
            module.train(was_training)
            self._teardown(module, "predict")
        return results[0] if len(results) == 1 else results

    # -- set-up ----------------------------------------------------------------------------
    def _attach(self, module: SSLModule, stage: str, datamodule) -> SSLModule:
        if not isinstance(module, SSLModule):
            raise TypeError(f"Trainer.{stage} expects an SSLModule, got {type(module).__name__}")
        strategy = self.strategy
        if not self._environment_ready:
            strategy.setup_environment()
            self._environment_ready = True
        if self.seed is not None:
            seed_everything(self.seed)
        if self.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.module = module
        module.trainer = self
        self.precision = Precision(self.precision_name, strategy.root_device, autocast=strategy.autocast_enabled)
        if self.precision_name == "bf16-mixed" and strategy.root_device.type == "cpu" and not native_cpu_bf16():
            warnings.warn(
                "trainer.precision='bf16-mixed' on a CPU whose oneDNN has no native bf16 (no AVX512-BF16 or AMX): "
                "bf16 is emulated here and slower than fp32; set trainer.precision=32 for speed on this machine",
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
        for cb in self.callbacks:
            cb.setup(self, module, stage)
        return module

    def _teardown(self, module: SSLModule, stage: str) -> None:
        for cb in self.callbacks:
            cb.teardown(self, module, stage)
        module.teardown(stage)

    def _wants_channels_last(self, module: SSLModule) -> bool:
        """``channels_last`` resolved: as set, or (null) on where it is faster and nothing in the
        engine lays out parameters itself: a 2-D convolutional module under single/ddp, on a CUDA
        device (NVIDIA's guidance for convolutions on tensor cores) or under bf16-mixed on a CPU
        whose oneDNN runs bf16 natively (the hand-written bf16 + channels-last step measured 1.25 s
        against 2.01 s for ours without it on such a CPU, issue #20). Off for fp32 on a CPU,
        where it measured no faster, and where bf16 is emulated (docs/BENCHMARKS.md, "The SimCLR
        step")."""
        if self.channels_last_setting is not None:
            return self.channels_last_setting
        if self.strategy.name not in CHANNELS_LAST_STRATEGIES:
            return False
        if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
            return False
        device = self.strategy.root_device.type
        return device == "cuda" or (device == "cpu" and self.precision_name == "bf16-mixed" and native_cpu_bf16())

    def _train_loader(self):
        """The training loader, fetched once and lazily: ``configure_optimizers`` may ask for
        ``estimated_stepping_batches`` before the loop starts, as in Lightning."""
        if self.train_dataloader is None and self.state == "fit" and self.module is not None:
            if self._train_source is not None:
                loader = self._train_source
            elif self._datamodule is not None and hasattr(self._datamodule, "train_dataloader"):
                loader = self._datamodule.train_dataloader()
            else:
                loader = self.module.train_dataloader()
            self.train_dataloader = self._distribute(loader, TRAIN, "the training loader")
            self._equal_batches = self._batches_known_equal(self.train_dataloader)
        return self.train_dataloader

    def _batches_known_equal(self, loader) -> bool:
        """Whether every rank's batches are known to be equal in size without a per-step check:
        by construction, or, for a list of batches, by one comparison of all sizes now."""
        if equal_batches_by_construction(loader, self.world_size):
            return True
        if isinstance(loader, (list, tuple)):
            check_listed_batches(self.strategy.all_gather_object([batch_size_of(b) for b in loader]))
            return True
        return False

    def _distribute(self, loader, stage: str, what: str):
        if loader is None or not self.use_distributed_sampler:
            return loader
        return distribute_loader(loader, stage, self.world_size, self.global_rank,
                                 self.seed if self.seed is not None else 0, what)

    def _loaders(self, given, hook: str, datamodule) -> list:
        if given is None:
            source = datamodule if datamodule is not None and hasattr(datamodule, hook) else self.module
            given = getattr(source, hook)()
        if given is None:
            return []
        loaders = list(given) if isinstance(given, (list, tuple)) and given and _is_loader(given[0]) else [given]
        what = hook.replace("_dataloader", "").replace("val", "validation")
        return [self._distribute(loader, EVAL, f"the {what} loader" + (f" {i}" if len(loaders) > 1 else ""))
                for i, loader in enumerate(loaders)]

    def _recipe_optimizers(self, module: SSLModule):
        """The config's ``optim`` recipe replaces the method's own ``configure_optimizers``."""
        from scale_ssl.trainer.callbacks import FreezeParameters, StochasticWeightAveraging

        built = self.optim_recipe.build(module, self.steps_per_epoch, self.estimated_stepping_batches)
        self.recipe = built
        if self.is_global_zero and self.enable_progress_bar:
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

    def _check_optimization_mode(self, module: SSLModule) -> None:
        if module.automatic_optimization:
            if any(isinstance(o, torch.optim.LBFGS) for o in self.optimizers) and self.accumulate_grad_batches > 1:
                raise ValueError("LBFGS re-evaluates the loss inside step(): it cannot be combined with accumulate_grad_batches > 1")
            return
        if self.accumulate_grad_batches != 1:
            raise ValueError(
                "accumulate_grad_batches is not used with manual optimization (automatic_optimization=False): "
                "accumulate in training_step yourself and leave trainer.accumulate_grad_batches=1"
            )
        if self.gradient_clip_val is not None:
            raise ValueError(
                "gradient_clip_val is not used with manual optimization: call "
                "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm=...) in training_step"
            )

    # -- the fit loop ----------------------------------------------------------------------
    def _fit_loop(self, module: SSLModule) -> None:
        total_steps = self.max_steps if self.max_steps > 0 else self.estimated_stepping_batches
        with ProgressDisplay(self.enable_progress_bar and self.is_global_zero, total_steps) as progress:
            self._progress = progress
            progress.update(self.global_step)
            self._window = [time.perf_counter(), 0]
            while not self._done():
                self._run_epoch(module)

    def _run_epoch(self, module: SSLModule) -> None:
        loader = self.train_dataloader
        set_loader_epoch(loader, self.current_epoch)
        module._stage = "train"
        self._call("on_train_epoch_start")
        num_batches = self.num_training_batches
        val_every = self._val_check_batches(num_batches)
        # Mid-epoch resume: a stream that can seek (``skip_batches``) starts after the batches
        # already trained on; any other iterable is replayed without compute.
        skip, self._batches_to_skip = self._batches_to_skip, 0
        start = 0
        if skip and hasattr(loader, "skip_batches"):
            loader.skip_batches(skip)
            start, skip = skip, 0
        exhausted, batch_idx = True, -1
        batches = self.strategy.device_batches(loader)
        if not self._equal_batches and not self.strategy.host_reads_split_the_step:
            # Equal per-rank batches are not guaranteed by how this loader is built: every rank
            # learns every rank's batch size before the step (one small all-gather per step).
            batches = lockstep_batches(batches, self.strategy.collective, self.strategy.root_device, num_batches,
                                       start, self._describe_batch)
        for batch_idx, batch in enumerate(batches, start=start):
            if num_batches is not None and batch_idx >= num_batches:
                break
            if batch_idx < skip:
                continue
            self._window[1] += batch_size_of(batch) * self.world_size
            stepped = self._train_batch(module, batch, batch_idx, num_batches)
            self._batch_in_epoch = batch_idx + 1
            if stepped and self.global_step % self.log_every_n_steps == 0:
                self._check_deferred_nonfinite()
                self._log_step_metrics(module)
            if stepped and self.checkpoint_every_n_steps and self.global_step % self.checkpoint_every_n_steps == 0:
                self.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
            if val_every and (batch_idx + 1) % val_every == 0:
                self._validation_run(module)
            if self._end_epoch_early:
                self._end_epoch_early = False
                break
            if self._done():
                exhausted = num_batches is not None and batch_idx + 1 >= num_batches
                break
        if batch_idx < start:
            if num_batches is not None and start >= num_batches:  # resumed after the epoch's last batch
                self._end_epoch(module)
                return
            raise RuntimeError(
                f"the training stream yielded no batch in epoch {self.current_epoch}; check the shard "
                "paths and that global_batch_size is not larger than the data set"
            )
        if exhausted:
            self._end_epoch(module)

    def _describe_batch(self, batch_idx: int) -> str:
        return f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"

    def _end_epoch(self, module: SSLModule) -> None:
        if self._validation_due():
            self._validation_run(module)
        module._stage = "train"
        self._call("on_train_epoch_end")
        self._log_epoch_metrics(module)
        self._log_data_stats()
        for config in self.lr_scheduler_configs:
            if config.interval == "epoch" and (self.current_epoch + 1) % config.frequency == 0:
                self._step_scheduler(config)
        self.current_epoch += 1
        self._batch_in_epoch = 0

    def _done(self) -> bool:
        minimums_met = self.current_epoch >= self.min_epochs and self.global_step >= self.min_steps
        if self.should_stop and minimums_met:
            return True
        if self.max_steps > 0 and self.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    # -- one batch -------------------------------------------------------------------------
    def _active_optimizers(self, batch_idx: int) -> list[int]:
        """Which optimizers this batch trains: all (each with its own training_step call), or,
        with frequencies, the one whose turn it is."""
        if len(self.optimizers) <= 1:
            return [0] if self.optimizers else []
        if not self.optimizer_frequencies:
            return list(range(len(self.optimizers)))
        position = batch_idx % sum(self.optimizer_frequencies)
        for idx, freq in enumerate(self.optimizer_frequencies):
            if position < freq:
                return [idx]
            position -= freq
        return [0]

    def _steps_per_optimizer_round(self) -> int:
        if len(self.optimizers) > 1 and not self.optimizer_frequencies:
            return len(self.optimizers)
        return 1

    def _train_batch(self, module: SSLModule, batch, batch_idx: int, num_batches: int | None) -> bool:
        batch = self.strategy.batch_to_device(batch)
        module._batch_size_hint = batch_size_of(batch)
        batch = module.on_after_batch_transfer(batch, 0)
        response = module.on_train_batch_start(batch, batch_idx)
        for cb in self.callbacks:
            cb.on_train_batch_start(self, module, batch, batch_idx)
        if response == -1:  # Lightning's convention: end this epoch here
            self._end_epoch_early = True
            return False
        if not module.automatic_optimization:
            outputs = self._run_step(module, batch, batch_idx, None)
            stepped = self._manual_stepped
            self._manual_stepped = False
            self._after_batch(module, outputs, batch, batch_idx)
            return stepped

        accumulate = self.accumulate_grad_batches
        last_of_epoch = num_batches is not None and batch_idx + 1 == num_batches
        is_step = (batch_idx + 1) % accumulate == 0 or last_of_epoch
        outputs, stepped = None, False
        for opt_idx in self._active_optimizers(batch_idx):
            multi = len(self.optimizers) > 1
            if multi:
                self._toggle.toggle(module, self.optimizers, opt_idx)
            try:
                optimizer = self.optimizers[opt_idx] if self.optimizers else None
                if isinstance(optimizer, torch.optim.LBFGS):
                    outputs = self._lbfgs_step(module, optimizer, opt_idx, batch, batch_idx)
                    stepped = True
                    continue
                with self.strategy.no_backward_sync(self.wrapped, enabled=not is_step):
                    outputs = self._run_step(module, batch, batch_idx, opt_idx if multi else None)
                    loss = _extract_loss(outputs)
                    if loss is None:
                        if self.world_size > 1:
                            raise RuntimeError(
                                "training_step returned None under a distributed strategy; every rank must return a "
                                "loss (skipping on one rank would leave the others waiting in the gradient all-reduce)"
                            )
                        continue
                    if optimizer is not None and self.strategy.host_reads_split_the_step:
                        self._note_nonfinite_on_device(loss)
                        self.strategy.backward(self.precision.scale(loss / accumulate))
                    elif optimizer is not None:
                        if self._loss_is_nonfinite(loss):
                            self._skip_window = True  # no backward on any rank: no rank waits in an all-reduce
                        else:
                            self.strategy.backward(self.precision.scale(loss / accumulate))
                if is_step and optimizer is not None:
                    if self._skip_window:
                        self._skip_nonfinite_step(optimizer, batch_idx)
                        continue
                    self._optimizer_step(module, optimizer, opt_idx)
                    self._consecutive_nonfinite = 0
                    stepped = True
            finally:
                if multi:
                    self._toggle.untoggle(module)
        self._after_batch(module, outputs, batch, batch_idx)
        return stepped

    def _loss_is_nonfinite(self, loss: torch.Tensor) -> bool:
        """All ranks decide together: one all-gather of every rank's flag, so every rank sees the
        same verdict and which ranks went bad. The gather (not a rank-indexed write) keeps the
        step's program identical on every replica, which XLA needs: a ``flags[rank] = ...`` bakes
        the rank into each replica's graph and their collectives never meet."""
        if self.on_nonfinite_loss == "off":
            return False
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        flags = self.strategy.collective.all_gather(flag, grad=False) if self.world_size > 1 else flag
        bad = [int(r) for r in flags.nonzero().flatten().tolist()]
        if bad:
            self._nonfinite_ranks = sorted(set(self._nonfinite_ranks) | set(bad))
        return bool(bad)

    def _note_nonfinite_on_device(self, loss: torch.Tensor) -> None:
        """Deferred check (XLA): count non-finite losses on the device, no host read here."""
        if self.on_nonfinite_loss == "off":
            return
        if self.on_nonfinite_loss == "skip":
            raise ValueError(
                f"trainer.on_nonfinite_loss='skip' is not supported with strategy={self.strategy.name}: deciding per "
                "step needs a host read that splits the compiled step; use 'stop' (checked at each log interval) or 'off'"
            )
        flag = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self._deferred_nonfinite is None:
            self._deferred_since_step = self.global_step
            self._deferred_nonfinite = flag
        else:
            self._deferred_nonfinite = self._deferred_nonfinite + flag

    def _check_deferred_nonfinite(self) -> None:
        """Read the deferred count (every rank, at the same step: the gather is a collective)."""
        if self._deferred_nonfinite is None:
            return
        counts, self._deferred_nonfinite = self._deferred_nonfinite, None
        if self.world_size > 1:
            # This rank's slot of a world-sized vector, the rank entering as device data (one
            # program for every replica), then the same all-reduce the metrics use.
            collective = self.strategy.collective
            ranks = torch.arange(self.world_size, device=counts.device)
            mine = (ranks == collective.rank_offset(1, device=counts.device)).float()
            counts = self.strategy.reduce(mine * counts, op="sum")
        # A host list, then Python: nonzero() has a data-dependent shape that XLA cannot trace.
        bad = [rank for rank, count in enumerate(counts.cpu().tolist()) if count > 0]
        if bad:
            raise NonFiniteLossError(
                f"loss was NaN/inf on rank(s) {bad} between steps {self._deferred_since_step} and {self.global_step} "
                f"(strategy={self.strategy.name} checks at each log interval, trainer.log_every_n_steps="
                f"{self.log_every_n_steps}); the last checkpoint written is the last good state; lower the learning "
                "rate or check the data"
            )

    def _skip_nonfinite_step(self, optimizer, batch_idx: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        self._skip_window = False
        self._consecutive_nonfinite += 1
        self.nonfinite_steps_skipped += 1
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}); non-finite on "
                 f"rank(s) {self._nonfinite_ranks}")
        self._nonfinite_ranks = []
        if self.on_nonfinite_loss == "stop" and self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            path = None
            if self.enable_checkpointing:
                # Skipped steps changed no weight: this is the last good state. Resume starts after
                # the bad batches.
                self._batch_in_epoch = batch_idx + 1
                path = os.path.join(self.checkpoint_dir, "last.ckpt")
                self.save_checkpoint(path)
            raise NonFiniteLossError(
                f"loss was NaN/inf for {self._consecutive_nonfinite} consecutive steps, the last at {where}; "
                + (f"the last good state is in {path}" if path else "checkpointing is off, nothing was saved")
                + "; lower the learning rate or check the data, or set trainer.on_nonfinite_loss=skip"
            )
        if self.is_global_zero:
            warnings.warn(f"non-finite loss at {where}: step skipped on every rank", stacklevel=3)

    def _run_step(self, module: SSLModule, batch, batch_idx: int, opt_idx: int | None):
        args = (batch, batch_idx) if opt_idx is None else (batch, batch_idx, opt_idx)
        with self.precision.autocast():
            outputs = self.wrapped(*args)
        return module.training_step_end(outputs)

    def _optimizer_step(self, module: SSLModule, optimizer, opt_idx: int) -> None:
        self._clip_gradients(optimizer)
        module.on_before_optimizer_step(optimizer)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self, module, optimizer)
        self.precision.step(optimizer, lambda: self.strategy.optimizer_step(optimizer))
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._step_schedulers_of(opt_idx)

    def _lbfgs_step(self, module: SSLModule, optimizer, opt_idx: int, batch, batch_idx: int):
        """LBFGS evaluates the loss several times per step: the trainer builds that closure."""
        holder = {}

        def closure():
            optimizer.zero_grad(set_to_none=True)
            outputs = self._run_step(module, batch, batch_idx, opt_idx if len(self.optimizers) > 1 else None)
            loss = _extract_loss(outputs)
            self.strategy.backward(loss)
            holder["outputs"] = outputs
            return loss.detach()

        module.on_before_optimizer_step(optimizer)
        self.strategy.optimizer_step(optimizer, closure)
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._step_schedulers_of(opt_idx)
        return holder.get("outputs")

    def _step_schedulers_of(self, opt_idx: int) -> None:
        for config in self.lr_scheduler_configs:
            if config.optimizer_idx == opt_idx and config.interval == "step":
                steps_of_this_optimizer = getattr(config, "_steps", 0) + 1
                config._steps = steps_of_this_optimizer
                if steps_of_this_optimizer % config.frequency == 0:
                    self._step_scheduler(config)

    def _after_batch(self, module: SSLModule, outputs, batch, batch_idx: int) -> None:
        # After the optimizer step, as in Lightning: EMA targets and queues see the new weights.
        module.on_train_batch_end(outputs, batch, batch_idx)
        for cb in self.callbacks:
            cb.on_train_batch_end(self, module, outputs, batch, batch_idx)

    # -- manual optimization ---------------------------------------------------------------
    _manual_stepped = False

    def _manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        self.strategy.backward(self.precision.scale(loss), *args, **kwargs)

    def _manual_optimizer_step(self, wrapped: WrappedOptimizer, closure=None, **kwargs):
        optimizer = wrapped.optimizer
        self.module.on_before_optimizer_step(optimizer)
        if closure is not None:
            result = self.strategy.optimizer_step(optimizer, closure)
        else:
            result = self.precision.step(optimizer, lambda: self.strategy.optimizer_step(optimizer))
        self.global_step += 1
        self._manual_stepped = True
        return result

    def _optimizer_index(self, optimizer) -> int:
        raw = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
        for idx, opt in enumerate(self.optimizers):
            if opt is raw:
                return idx
        raise ValueError("toggle_optimizer: this optimizer was not returned by configure_optimizers")

    # -- gradients -------------------------------------------------------------------------
    def _clip_gradients(self, optimizer) -> None:
        if self.gradient_clip_val is not None:
            self._clip(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def _clip(self, optimizer, value: float, algorithm: str) -> None:
        raw = optimizer.optimizer if isinstance(optimizer, WrappedOptimizer) else optimizer
        if algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={algorithm!r}; use 'norm' or 'value'")
        self.precision.unscale(raw)
        self.strategy.clip_gradients(raw, value, algorithm)

    def _step_scheduler(self, config: SchedulerConfig) -> None:
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.callback_metrics.get(config.monitor)
            if value is None:
                message = (
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; available: "
                    f"{sorted(self.callback_metrics)}; log it with self.log({config.monitor!r}, ...) or set strict=False"
                )
                if config.strict:
                    raise ValueError(message)
                warnings.warn(message + " (skipping this scheduler step)", stacklevel=2)
                return
            config.scheduler.step(value)
        else:
            config.scheduler.step()

    # -- validation / test -----------------------------------------------------------------
    def _has_validation(self, module: SSLModule) -> bool:
        return bool(self.val_dataloaders) and type(module).validation_step is not SSLModule.validation_step

    def _val_check_batches(self, num_batches: int | None) -> int | None:
        """Validate inside the epoch every this many batches (``val_check_interval``), on the
        epochs ``check_val_every_n_epoch`` selects."""
        interval = self.val_check_interval
        if interval is None or not self._has_validation(self.module):
            return None
        every_n = self.check_val_every_n_epoch
        if every_n is not None and (self.current_epoch + 1) % every_n != 0:
            return None
        if isinstance(interval, float):
            if num_batches is None:
                raise ValueError("trainer.val_check_interval as a fraction needs a training loader with a length")
            return max(1, int(num_batches * interval))
        return interval

    def _validation_due(self) -> bool:
        """End-of-epoch validation (when no in-epoch ``val_check_interval`` is set)."""
        if not self._has_validation(self.module) or self.check_val_every_n_epoch is None:
            return False
        if self.val_check_interval is not None:
            return False
        return (self.current_epoch + 1) % self.check_val_every_n_epoch == 0

    def _sanity_check(self, module: SSLModule) -> None:
        self.sanity_checking = True
        try:
            limit = None if self.num_sanity_val_steps < 0 else self.num_sanity_val_steps
            self._run_eval_loop(module, "validate", self.val_dataloaders, limit_override=limit, log=False)
        finally:
            self.sanity_checking = False
            self.callback_metrics = {k: v for k, v in self.callback_metrics.items() if not k.startswith("val")}

    def _validation_run(self, module: SSLModule) -> None:
        self._run_eval_loop(module, "validate", self.val_dataloaders)
        for cb in self.callbacks:
            cb.on_validation_end(self, module)

    def _evaluate(self, model, stage: str, dataloaders, datamodule, ckpt_path) -> list[dict]:
        self.state = stage
        module = self._attach(model, stage, datamodule)
        hook = "val_dataloader" if stage == "validate" else "test_dataloader"
        loaders = self._loaders(dataloaders, hook, datamodule)
        if not loaders:
            raise ValueError(f"no {stage} data: pass dataloaders to {stage}() or implement {hook}()")
        if ckpt_path is not None:
            module.load_state_dict(self.strategy.load_checkpoint(self._resolve_ckpt_path(ckpt_path))["state_dict"])
        module.to(self.strategy.root_device)
        if self.logger is None and self._logger_arg is not None and self._logger_arg is not False:
            self.logger = self._logger_arg
        try:
            return self._run_eval_loop(module, stage, loaders)
        finally:
            self._teardown(module, stage)

    def _run_eval_loop(self, module: SSLModule, stage: str, loaders: list, limit_override: int | None = None,
                       log: bool = True) -> list[dict]:
        """Eval mode, no grad, each loader once; ``*_step_end`` and ``*_epoch_end(outputs)`` called;
        epoch-logged metrics averaged (and reduced over ranks) into ``callback_metrics``."""
        prefix = "validation" if stage == "validate" else "test"
        step_end = getattr(module, f"{prefix}_step_end")
        limit_setting = self.limit_val_batches if prefix == "validation" else self.limit_test_batches
        was_training = module.training
        previous_stage = module._stage
        module._stage = prefix
        module.eval()
        self._call(f"on_{prefix}_epoch_start")
        all_outputs = []
        per_loader_metrics = []
        try:
            with torch.no_grad():
                for dl_idx, loader in enumerate(loaders):
                    limit = limit_override if limit_override is not None else _limited_length(loader, limit_setting)
                    outputs = []
                    for batch_idx, batch in enumerate(loader):
                        if limit is not None and batch_idx >= limit:
                            break
                        batch = self.strategy.batch_to_device(batch)
                        module._batch_size_hint = batch_size_of(batch)
                        batch = module.on_after_batch_transfer(batch, dl_idx)
                        args = (batch, batch_idx, dl_idx) if len(loaders) > 1 else (batch, batch_idx)
                        with self.precision.autocast():
                            out = step_end(self.strategy.eval_step(module, f"{prefix}_step", args))
                        if out is not None:
                            outputs.append(out)
                        for cb in self.callbacks:
                            getattr(cb, f"on_{prefix}_batch_end")(self, module, out, batch, batch_idx)
                    all_outputs.append(outputs)
            epoch_end = getattr(module, f"{prefix}_epoch_end", None)
            if callable(epoch_end):  # the older Lightning form, with every step's outputs
                epoch_end(all_outputs[0] if len(loaders) == 1 else all_outputs)
            self._call(f"on_{prefix}_epoch_end")
            values = reduce_epoch_and_fetch(module._metrics.pop_epoch(), self.strategy)
            values.update(reduce_and_fetch(module._metrics.pop_step(), self.strategy))
            self.callback_metrics.update(values)
            if log and self.logger is not None and values:
                self.logger.log_metrics(values, step=self.global_step)
            per_loader_metrics.append(values)
        finally:
            module._stage = previous_stage
            module.train(was_training)
        return per_loader_metrics

    def _call(self, hook: str) -> None:
        getattr(self.module, hook)()
        for cb in self.callbacks:
            getattr(cb, hook)(self, self.module)

    # -- metrics ---------------------------------------------------------------------------
    def _log_step_metrics(self, module: SSLModule) -> None:
        """Reduce and fetch the module's logged values. Every rank reaches this at the same step,
        so the ``sync_dist`` all-reduce cannot deadlock."""
        step_values = module._metrics.pop_step()
        values = reduce_and_fetch(step_values, self.strategy)
        for i, opt in enumerate(self.optimizers):
            values[f"lr-{i}" if len(self.optimizers) > 1 else "lr"] = float(opt.param_groups[0]["lr"])
        start, images = self._window
        values["images_per_s"] = images / max(time.perf_counter() - start, 1e-9)
        self._window = [time.perf_counter(), 0]
        values["epoch"] = float(self.current_epoch)
        self._publish(values, shown=[n for n, (_, o) in step_values.items() if o.prog_bar])

    def _log_epoch_metrics(self, module: SSLModule) -> None:
        epoch_values = module._metrics.pop_epoch()
        if not epoch_values:
            return
        values = reduce_epoch_and_fetch(epoch_values, self.strategy)
        self._publish(values, shown=[n for n, (_, _, o) in epoch_values.items() if o.prog_bar])

    def _log_data_stats(self) -> None:
        """The stream's per-epoch counts (dropped, corrupt skipped, re-seen after resume) to the
        progress bar and the logger, when the loader reports them (``epoch_stats()``)."""
        stats = getattr(self.train_dataloader, "epoch_stats", None)
        if not callable(stats):
            return
        numbers = {f"data/{k}": float(v) for k, v in stats().items() if isinstance(v, (int, float))}
        if numbers:
            # samples_lost (undecodable + missing from damaged or short shards) is the one figure shown.
            self._publish(numbers, shown=[k for k in numbers if k in ("data/samples_lost", "data/samples_dropped")])

    def log_metrics(self, values: dict[str, float]) -> None:
        """For callbacks: publish host floats to the logger and ``callback_metrics``."""
        self._publish(dict(values), shown=[])

    def _publish(self, values: dict[str, float], shown: list[str]) -> None:
        self.callback_metrics.update(values)
        self.logged_metrics.update(values)
        self.history.append({"step": self.global_step, **values})
        if self.logger is not None:
            self.logger.log_metrics(values, step=self.global_step)
        bar = {n: values[n] for n in shown if n in values}
        if "images_per_s" in values:
            bar["img/s"] = values["images_per_s"]
        self.progress_bar_metrics.update(bar)
        self._progress.update(self.global_step, bar or None)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Called on every rank (states are gathered); rank zero writes atomically."""
        module = self.module
        checkpoint = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "module_class": type(module).__name__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "optimizer_states": self.strategy.optimizer_state_dicts(self.optimizers),
            "lr_scheduler_states": [c.scheduler.state_dict() for c in self.lr_scheduler_configs],
            "lr_scheduler_step_counts": [getattr(c, "_steps", 0) for c in self.lr_scheduler_configs],
            "precision_state": self.precision.state_dict(),
            "global_step": self.global_step,
            "epoch": self.current_epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "world_size": self.world_size,
            "planned_steps": self._planned_steps,
            "rng_states": self.strategy.all_gather_object(rng_state()),
            "callbacks": {},
            "mlflow_run_id": self.logger.run_id if self.logger is not None else None,
            "config": self.run_config,
        }
        for cb in self.callbacks:
            checkpoint["callbacks"][cb.state_key] = cb.state_dict()
            cb.on_save_checkpoint(self, module, checkpoint)
        if hasattr(self.train_dataloader, "state_dict"):
            checkpoint["data_state"] = self.train_dataloader.state_dict()
        module.on_save_checkpoint(checkpoint)
        self.strategy.save_checkpoint(checkpoint, path)
        if os.path.basename(path) == "last.ckpt":
            self._last_saved = (self.global_step, self.current_epoch)

    def _load_fit_checkpoint(self, ckpt_path: str) -> dict | None:
        """The checkpoint to resume from. ``"last"``: rank zero picks the newest that verifies
        (``last.ckpt``, else ``last.ckpt.prev``) and tells every rank, so all load the same one;
        ``None`` (start from scratch) when no checkpoint exists yet."""
        if ckpt_path != "last":
            return self.strategy.load_checkpoint(self._resolve_ckpt_path(ckpt_path))
        choice = None
        if self.is_global_zero:
            choice = _newest_good_checkpoint(self._resolve_ckpt_path("last"))
        kind, value = self.strategy.broadcast_object(choice or ("none", None), src=0)
        if kind == "error":
            raise CorruptCheckpointError(value)
        if kind == "none":
            if self.is_global_zero:
                warnings.warn(f"ckpt_path='last': no checkpoint in {self.checkpoint_dir!r} yet; training starts from scratch",
                              stacklevel=3)
            return None
        checkpoint = self.strategy.load_checkpoint(value)
        if self.is_global_zero:
            print(f"scale_ssl: resuming from {value} at global step {checkpoint.get('global_step')} (restart "
                  f"{elastic_restart_count()}; the newest checkpoint that passed its checksum)", flush=True)
        return checkpoint

    def _steps_planned_for_this_fit(self) -> int | None:
        """``estimated_stepping_batches`` (what schedules are laid over), or None when unknown."""
        try:
            return self.estimated_stepping_batches
        except ValueError:
            return None

    def _resolve_ckpt_path(self, ckpt_path: str) -> str:
        if ckpt_path == "last":
            return os.path.join(self.checkpoint_dir, "last.ckpt")
        if ckpt_path == "best":
            for cb in self.callbacks:
                if getattr(cb, "best_model_path", None):
                    return cb.best_model_path
            raise ValueError("ckpt_path='best' needs a ModelCheckpoint callback that has saved a best model")
        return ckpt_path

    def _restore(self, checkpoint: dict) -> None:
        module = self.module
        if checkpoint.get("state_dict") is not None:  # None: the strategy's engine loaded the weights
            module.load_state_dict(checkpoint["state_dict"])
        self.strategy.load_optimizer_states(self.optimizers, checkpoint["optimizer_states"])
        old_plan = checkpoint.get("planned_steps")
        replan = old_plan is not None and self._planned_steps is not None and old_plan != self._planned_steps
        lr_before = [group["lr"] for opt in self.optimizers for group in opt.param_groups]
        for config, state, count in zip(self.lr_scheduler_configs, checkpoint["lr_scheduler_states"],
                                        checkpoint.get("lr_scheduler_step_counts", [0] * len(self.lr_scheduler_configs))):
            if replan and not isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                _fast_forward(config.scheduler, int(state.get("last_epoch", 0)))
            else:
                config.scheduler.load_state_dict(state)
            config._steps = count
        self.precision.load_state_dict(checkpoint.get("precision_state", {}))
        self.global_step = int(checkpoint["global_step"])
        self.current_epoch = int(checkpoint["epoch"])
        if replan and self.lr_scheduler_configs and self.is_global_zero:
            lr_now = [group["lr"] for opt in self.optimizers for group in opt.param_groups]
            print(f"scale_ssl: resuming at global step {self.global_step} of a run planned for {old_plan} optimizer "
                  f"steps; this run is planned for {self._planned_steps} (max_steps/max_epochs or the steps per "
                  f"epoch changed). The learning-rate schedule is re-planned over {self._planned_steps} steps and "
                  f"continues at step {self.global_step} of that plan: lr {_format_lrs(lr_before)} (the old plan's) -> "
                  f"{_format_lrs(lr_now)}. The steps already taken followed the old plan, so the run differs from one "
                  f"planned for {self._planned_steps} steps from the start.", flush=True)
        self._batches_to_skip = int(checkpoint.get("batch_in_epoch", 0))
        self._batch_in_epoch = self._batches_to_skip
        states = checkpoint.get("rng_states") or []
        if checkpoint.get("world_size") == self.world_size and len(states) == self.world_size:
            set_rng_state(states[self.strategy.global_rank])
        for cb in self.callbacks:
            if cb.state_key in checkpoint.get("callbacks", {}):
                cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
            cb.on_load_checkpoint(self, module, checkpoint)
        if "data_state" in checkpoint and hasattr(self.train_dataloader, "load_state_dict"):
            self.train_dataloader.load_state_dict(checkpoint["data_state"])
        module.on_load_checkpoint(checkpoint)

    # -- logger ----------------------------------------------------------------------------
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

    def _finish_logger(self, status: str) -> None:
        if self.logger is None:
            return
        if status == "FINISHED":
            keys = _curve_keys(self.history)
            if keys:
                self.logger.log_metric_curves(keys=keys)
        self.logger.finalize(status)

    def _params_to_log(self, module: SSLModule) -> dict:
        """The run config as given (flattened by the logger), plus what only the trainer knows."""
        params = dict(self.run_config or {})
        params["module"] = {"class": type(module).__name__, **module.hparams}
        params["strategy"] = {"name": self.strategy.name, "world_size": self.world_size}
        return params


NONFINITE_POLICIES = ("stop", "skip", "off")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for ``max_consecutive_nonfinite`` steps (on_nonfinite_loss="stop")."""


def elastic_restart_count() -> int:
    """How often torchrun's elastic agent has restarted this worker group (0 on the first start)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _fast_forward(scheduler, steps: int) -> None:
    """Bring a freshly built scheduler (laid over this run's length) to where the checkpoint's
    scheduler stood, ``steps`` calls of ``step()`` in: closed form for ``LambdaLR`` (its lr is a
    function of the step count), step by step for chained schedulers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": no step is taken here
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.last_epoch = steps - 1
            scheduler.step()
        else:
            for _ in range(steps):
                scheduler.step()


def _format_lrs(lrs: list[float]) -> str:
    distinct = list(dict.fromkeys(f"{lr:.4g}" for lr in lrs))
    return distinct[0] if len(distinct) == 1 else "[" + ", ".join(distinct) + "]"


def _newest_good_checkpoint(last: str) -> tuple[str, str | None]:
    """(kind, value) for the broadcast: ("path", p) of the newest candidate that verifies,
    ("none", None) when none exists, ("error", message) when all that exist are damaged."""
    errors = []
    for candidate in checkpoint_candidates(last):
        if not os.path.exists(candidate):
            continue
        if os.path.isdir(candidate):  # a DeepSpeed checkpoint: its engine verifies its own shards
            return ("path", candidate)
        try:
            load_checkpoint_file(candidate)
            return ("path", candidate)
        except CorruptCheckpointError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=3)
            errors.append(str(err))
    if errors:
        return ("error", f"no readable checkpoint to resume from: {' | '.join(errors)}")
    return ("none", None)


def _extract_loss(outputs) -> torch.Tensor | None:
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


def _is_loader(obj) -> bool:
    """A loader (DataLoader, stream, list of batches) as opposed to one batch (tuple, tensor, dict):
    ``[loader_a, loader_b]`` means several loaders, ``[(x, y), ...]`` is one in-memory loader."""
    return hasattr(obj, "__iter__") and not isinstance(obj, (tuple, torch.Tensor, dict, str))


def _limited_length(loader, limit) -> int | None:
    if loader is None:
        return None
    try:
        n = len(loader)
    except TypeError:
        n = None
    if limit is None:
        return n
    if isinstance(limit, float):
        if n is None:
            raise ValueError("a fractional limit_*_batches needs a loader with a length; give an int batch count")
        return int(n * limit)
    return limit if n is None else min(n, limit)


def _curve_keys(history: list[dict]) -> tuple[str, ...]:
    return tuple(sorted({k for row in history for k in row if "loss" in k}))


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_limit(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (batches) or a float fraction in [0, 1], got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} as a float is a fraction and must be in [0, 1]; use an int for a batch count")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
