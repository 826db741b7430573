"""Load a run config: schema defaults <- YAML file <- ``key=value`` overrides, then validate.

Every problem becomes one ``ConfigError`` whose message names the key and says how to fix it;
the CLI prints that line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from scale_ssl.config.schema import RunConfig
from scale_ssl.runtime.precision_choice import AUTO, resolve_precision


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> DictConfig:
    """Schema defaults <- ``base`` (e.g. the config stored in a checkpoint) <- YAML <- overrides."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if base is not None:
        layers.append(OmegaConf.create(base))
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path!r}: no such file; pass the path of a YAML config such as configs/simclr/fmnist_cpu.yaml")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:
            raise ConfigError(f"--config {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. trainer.max_steps=50")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except Exception as err:  # OmegaConf's own errors, and YAML's for values it cannot parse
            raise ConfigError(f"overrides {list(overrides)}: {_first_line(err)}") from None
    try:
        config = OmegaConf.merge(*layers)
    except ConfigKeyError as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key {key!r} is not known; {_valid_keys_hint(key)}") from None
    except ValidationError as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key {key!r}: {_first_line(err)}") from None
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # e.g. a mapping where a list belongs
        raise ConfigError(f"config: {_first_line(err)}; compare with the schema in scale_ssl/config/schema.py") from None
    validate_config(config)
    # `auto` becomes the concrete precision here, once, so everything that reads the config (the
    # strategies, feature extraction, the step-cost estimate, the checkpoint it is saved into, and
    # so a resume on other hardware) sees what this run trains in.
    config.trainer.precision = resolve_precision(config.trainer.precision, config.trainer.accelerator)
    return config


def validate_config(config: DictConfig) -> None:
    from scale_ssl.methods import METHODS
    from scale_ssl.strategies import STRATEGIES
    from scale_ssl.trainer.precision import PRECISIONS

    t = config.trainer
    if config.method not in METHODS:
        raise ConfigError(f"method={config.method!r} is not known; use one of {sorted(METHODS)}")
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy!r} is not known; use one of {sorted(STRATEGIES)}")
    if str(t.precision) not in (*PRECISIONS, AUTO):
        raise ConfigError(f"trainer.precision={t.precision!r} is not supported; use one of {(*PRECISIONS, AUTO)}")
    for key in ("global_batch_size", "accumulate_grad_batches", "log_every_n_steps"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {t[key]}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps must be -1 (bounded by max_epochs) or >= 1, got {t.max_steps}")
    if not t.collective_timeout_s > 0:
        raise ConfigError(f"trainer.collective_timeout_s must be > 0 seconds, got {t.collective_timeout_s}")
    if t.on_nonfinite_loss not in ("stop", "skip", "off"):
        raise ConfigError(f"trainer.on_nonfinite_loss must be 'stop', 'skip' or 'off', got {t.on_nonfinite_loss!r}")
    if t.max_consecutive_nonfinite < 1:
        raise ConfigError(f"trainer.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")
    if t.max_steps == -1 and t.max_epochs is None:
        raise ConfigError("set trainer.max_steps or trainer.max_epochs: with neither the run has no end")
    d = config.data
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels}")
    for key in ("mean", "std"):
        if len(d[key]) != d.channels:
            raise ConfigError(f"data.{key} has {len(d[key])} values but data.channels={d.channels}; give one per channel")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(d.crop_scale)}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.augment_on not in ("cpu", "device"):
        raise ConfigError(
            f"data.augment_on must be 'cpu' (every op in the loader) or 'device' (the loader crops, the training "
            f"device does the rest, batched), got {d.augment_on!r}"
        )
    if d.augment_on == "device" and t.strategy == "xla":
        raise ConfigError(
            "data.augment_on=device is not supported with trainer.strategy=xla: its per-op sample selections have "
            "data-dependent shapes, which XLA would recompile every step; use data.augment_on=cpu"
        )
    if d.mode not in ("exact", "resampled"):
        raise ConfigError(f"data.mode must be 'exact' (each sample at most once per epoch) or 'resampled', got {d.mode!r}")
    if not 0 <= d.max_corrupt_fraction <= 1:
        raise ConfigError(f"data.max_corrupt_fraction is a share in [0, 1] (0.001 = 0.1%), got {d.max_corrupt_fraction}")
    for key in ("retries", "retry_delay", "io_timeout"):
        if d[key] < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {d[key]}")
    from scale_ssl.data.sample_fields import check_label_key

    try:
        check_label_key(d.label_key, "data.label_key")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key in d.image_keys:
        if not key or not key.strip() or any(c in key for c in "./: "):
            raise ConfigError(f"data.image_keys holds {key!r}; give member extensions such as [jpg, png, webp]")
    check_kwargs(METHODS[config.method], OmegaConf.to_container(config.model, resolve=True), section="model")
    if config.optim is not None:
        from scale_ssl.optim import OptimRecipe, RecipeError

        try:
            OptimRecipe(OmegaConf.to_container(config.optim, resolve=True), t.global_batch_size)
        except RecipeError as err:
            raise ConfigError(str(err)) from None


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate: int) -> int:
    """Design contract 1: the global batch is what the config names; the device batch follows."""
    denominator = world_size * accumulate
    if global_batch_size < 1:
        raise ConfigError(f"trainer.global_batch_size={global_batch_size} must be >= 1 (a multiple of {denominator})")
    if global_batch_size % denominator != 0:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by world_size ({world_size}) x "
            f"trainer.accumulate_grad_batches ({accumulate}) = {denominator}; pick a multiple of {denominator}"
        )
    return global_batch_size // denominator


def check_kwargs(cls, kwargs: dict, section: str) -> None:
    """Check ``kwargs`` against ``cls.__init__``: unknown names and wrong simple types."""
    signature = inspect.signature(cls.__init__)
    params = {
        n: p for n, p in signature.parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    hints = typing.get_type_hints(cls.__init__)
    for name, value in kwargs.items():
        if name not in params:
            raise ConfigError(
                f"{section}.{name} is not an argument of {cls.__name__}; valid keys: {', '.join(sorted(params))}"
            )
        expected = hints.get(name)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(
                f"{section}.{name}={value!r} has type {type(value).__name__}, but {cls.__name__} expects {_type_name(expected)}"
            )


def _matches(value: Any, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _type_name(expected) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _valid_keys_hint(full_key: str) -> str:
    section = full_key.split(".")[0] if "." in full_key else None
    schema = OmegaConf.structured(RunConfig)
    if section and section in schema and isinstance(schema[section], DictConfig):
        return f"valid keys in {section!r}: {', '.join(sorted(schema[section].keys()))}"
    return f"valid top-level keys: {', '.join(sorted(schema.keys()))}"
