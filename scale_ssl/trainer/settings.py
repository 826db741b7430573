"""The trainer's settings, checked once and then frozen: what every component of the loop reads.

``TrainerSettings.from_arguments`` takes the ``Trainer`` constructor's keywords, gives each bad
value one clear error naming the ``trainer.*`` key, and applies ``fast_dev_run`` (as in
Lightning: n batches of each stage, one epoch, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass

NONFINITE_POLICIES = ("stop", "skip", "off")
# Strategies under which trainer.compile is supported (see Trainer's ``compile_model``).
COMPILE_STRATEGIES = ("single", "ddp")
# Strategies under which the module may be converted to channels_last (see ``channels_last``).
CHANNELS_LAST_STRATEGIES = ("single", "ddp")


@dataclass(frozen=True)
class TrainerSettings:
    """One field per ``Trainer`` argument of the same name (see ``Trainer``), after
    ``fast_dev_run`` and the defaults are applied: ``max_epochs`` is 1 when neither it nor
    ``max_steps`` is set; ``min_epochs``/``min_steps`` are 0 when not set; ``fast_dev_run`` is the
    number of batches (0: off); ``channels_last`` is as given (None: decided by ``fit``)."""

    max_epochs: int | None = None
    min_epochs: int = 0
    max_steps: int = -1
    min_steps: int = 0
    precision_name: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    check_val_every_n_epoch: int | None = 1
    val_check_interval: int | float | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    num_sanity_val_steps: int = 2
    fast_dev_run: int = 0
    log_every_n_steps: int = 50
    logger_enabled: bool = True
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    checkpoint_every_n_steps: int = 0
    default_root_dir: str = "runs"
    seed: int | None = 0
    deterministic: bool = False
    on_nonfinite_loss: str = "stop"
    max_consecutive_nonfinite: int = 3
    compile_model: bool = False
    channels_last: bool | None = None
    use_distributed_sampler: bool = True

    @classmethod
    def from_arguments(
        cls,
        *,
        max_epochs, min_epochs, max_steps, min_steps, precision, accumulate_grad_batches, gradient_clip_val,
        gradient_clip_algorithm, check_val_every_n_epoch, val_check_interval, limit_train_batches,
        limit_val_batches, limit_test_batches, limit_predict_batches, num_sanity_val_steps, fast_dev_run,
        log_every_n_steps, logger_enabled, enable_progress_bar, enable_checkpointing, checkpoint_every_n_steps,
        default_root_dir, seed, deterministic, on_nonfinite_loss, max_consecutive_nonfinite, compile_model,
        channels_last, use_distributed_sampler,
    ) -> "TrainerSettings":
        check_int("trainer.max_steps", max_steps, minimum=-1)
        if not isinstance(compile_model, bool):
            raise TypeError(f"trainer.compile must be true or false, got {compile_model!r}")
        if channels_last not in (None, True, False):
            raise TypeError(f"trainer.channels_last must be true, false or null (automatic), got {channels_last!r}")
        if on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.on_nonfinite_loss={on_nonfinite_loss!r}; use one of {NONFINITE_POLICIES}")
        check_int("trainer.max_consecutive_nonfinite", max_consecutive_nonfinite, minimum=1)
        for name, value in (("max_epochs", max_epochs), ("min_epochs", min_epochs), ("min_steps", min_steps)):
            if value is not None:
                check_int(f"trainer.{name}", value, minimum=0)
        check_int("trainer.accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        check_int("trainer.log_every_n_steps", log_every_n_steps, minimum=1)
        check_int("trainer.checkpoint_every_n_steps", checkpoint_every_n_steps, minimum=0)
        check_int("trainer.num_sanity_val_steps", num_sanity_val_steps, minimum=-1)
        if check_val_every_n_epoch is not None:
            check_int("trainer.check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}; use 'norm' or 'value'")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"trainer.gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}")
        for name, value in (("limit_train_batches", limit_train_batches), ("limit_val_batches", limit_val_batches),
                            ("limit_test_batches", limit_test_batches), ("limit_predict_batches", limit_predict_batches)):
            check_limit(f"trainer.{name}", value)
        if val_check_interval is not None:
            check_limit("trainer.val_check_interval", val_check_interval)
            if val_check_interval == 0:
                raise ValueError("trainer.val_check_interval must be > 0 (an int batch count or a fraction in (0, 1])")
        if isinstance(fast_dev_run, bool) or fast_dev_run is None:
            fast_dev_batches = 1 if fast_dev_run else 0
        else:
            check_int("trainer.fast_dev_run", fast_dev_run, minimum=0)
            fast_dev_batches = fast_dev_run
        if not isinstance(use_distributed_sampler, bool):
            raise TypeError(f"use_distributed_sampler must be True or False, got {use_distributed_sampler!r}")
        if fast_dev_batches:
            # As in Lightning: n batches of each stage, one epoch, nothing written.
            max_steps, max_epochs = fast_dev_batches, 1
            limit_train_batches = limit_val_batches = limit_test_batches = limit_predict_batches = fast_dev_batches
            num_sanity_val_steps, val_check_interval, check_val_every_n_epoch = 0, None, 1
            logger_enabled, enable_checkpointing = False, False
        return cls(
            max_epochs=max_epochs if max_epochs is not None else (1 if max_steps == -1 else None),
            min_epochs=min_epochs or 0, max_steps=max_steps, min_steps=min_steps or 0,
            precision_name=str(precision), accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
            check_val_every_n_epoch=check_val_every_n_epoch, val_check_interval=val_check_interval,
            limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
            num_sanity_val_steps=num_sanity_val_steps, fast_dev_run=fast_dev_batches,
            log_every_n_steps=log_every_n_steps, logger_enabled=logger_enabled,
            enable_progress_bar=enable_progress_bar, enable_checkpointing=enable_checkpointing,
            checkpoint_every_n_steps=checkpoint_every_n_steps, default_root_dir=default_root_dir, seed=seed,
            deterministic=deterministic, on_nonfinite_loss=on_nonfinite_loss,
            max_consecutive_nonfinite=max_consecutive_nonfinite, compile_model=compile_model,
            channels_last=channels_last, use_distributed_sampler=use_distributed_sampler,
        )

    def check_strategy(self, strategy_name: str) -> None:
        """Settings that only some engines support, refused with the fix for the others."""
        if self.compile_model and strategy_name not in COMPILE_STRATEGIES:
            raise ValueError(
                f"trainer.compile=true is supported with trainer.strategy in {COMPILE_STRATEGIES}, not "
                f"{strategy_name!r} (its engine replicates or traces the model itself); set trainer.compile=false"
            )
        if self.channels_last and strategy_name not in CHANNELS_LAST_STRATEGIES:
            raise ValueError(
                f"trainer.channels_last=true is supported with trainer.strategy in {CHANNELS_LAST_STRATEGIES}, not "
                f"{strategy_name!r} (its engine lays out or flattens the parameters itself); set it to null or false"
            )


def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_limit(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (batches) or a float fraction in [0, 1], got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} as a float is a fraction and must be in [0, 1]; use an int for a batch count")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
