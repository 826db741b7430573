"""Run configuration: schema, loading with overrides, and validation with clear errors."""

from scale_ssl.config.load import ConfigError, check_kwargs, load_config, per_device_batch_size, validate_config
from scale_ssl.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "check_kwargs", "load_config", "per_device_batch_size", "validate_config"]
