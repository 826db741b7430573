"""What every command assembles from a config the same way: the strategy (with its options
checked), the CPU threads of a rank, the training stream, the config of a checkpoint.

One home, so ``fit``, ``eval linear``/``finetune``, ``plan`` and the benchmarks build these alike
and no command imports another command's helpers.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from scale_ssl.config import ConfigError, load_config
from scale_ssl.data import ShardedImageStream
from scale_ssl.methods import METHODS
from scale_ssl.strategies import build_strategy


# Strategies that normalise BatchNorm over the global batch when trainer.sync_batchnorm is true (the
# default); a one-process run already normalises over its whole batch, so the flag changes nothing there.
GLOBAL_BATCHNORM_STRATEGIES = ("ddp", "xla", "dp", "deepspeed", "fsdp")


def build_strategy_from_config(config: DictConfig):
    t = config.trainer
    options = {"accelerator": t.accelerator}
    if t.strategy in GLOBAL_BATCHNORM_STRATEGIES:
        options["sync_batchnorm"] = t.sync_batchnorm
    if t.strategy == "ddp":
        options["timeout_s"] = t.collective_timeout_s
        options["static_graph"] = t.static_graph
    elif t.static_graph:
        raise ConfigError(f"trainer.static_graph=true is a DDP option and needs trainer.strategy=ddp (got {t.strategy!r})")
    elif t.strategy == "dp":
        if t.devices is None:
            raise ConfigError("trainer.strategy=dp needs trainer.devices (the number of parts per batch), e.g. trainer.devices=2")
        options["devices"] = t.devices
    elif t.strategy == "deepspeed":
        options.update(zero_stage=t.zero_stage, offload_optimizer=t.offload_optimizer,
                       offload_parameters=t.offload_parameters, config=t.deepspeed_config)
    elif t.strategy == "fsdp":
        options.update(precision=t.precision, reshard_after_forward=t.fsdp_reshard_after_forward,
                       cpu_offload=t.fsdp_cpu_offload, timeout_s=t.collective_timeout_s)
    if t.strategy != "fsdp" and (not t.fsdp_reshard_after_forward or t.fsdp_cpu_offload):
        raise ConfigError(
            f"trainer.fsdp_reshard_after_forward / trainer.fsdp_cpu_offload are FSDP options and need "
            f"trainer.strategy=fsdp (got {t.strategy!r}); remove them or set trainer.strategy=fsdp"
        )
    return build_strategy(t.strategy, **options)


def set_cpu_threads(config: DictConfig, strategy) -> None:
    """Ranks sharing a CPU must share its cores, or they oversubscribe and all slow down."""
    if config.trainer.num_threads is not None:
        torch.set_num_threads(config.trainer.num_threads)
    elif strategy.root_device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def build_train_stream(config: DictConfig, strategy, batch_size: int) -> ShardedImageStream:
    d = config.data
    return ShardedImageStream(
        d.train_shards,
        batch_size=batch_size,
        transform=METHODS[config.method].train_transform(d),
        rank=strategy.global_rank,
        world_size=strategy.world_size,
        num_workers=d.num_workers,
        seed=config.trainer.seed,
        shuffle_buffer=d.shuffle_buffer,
        mode=d.mode,
        max_corrupt_fraction=d.max_corrupt_fraction,
        retries=d.retries,
        retry_delay=d.retry_delay,
        io_timeout=d.io_timeout,
        image_keys=list(d.image_keys) or None,
        label_key=d.label_key,
    )


def config_for_checkpoint(args, checkpoint: dict):
    """The run config for ``eval``/``export`` of a checkpoint: ``--config`` when given, else the
    config the checkpoint stores, with the command's overrides applied."""
    if args.config is not None:
        return load_config(args.config, args.overrides)
    stored = checkpoint.get("config")
    if not stored:
        raise ConfigError(f"checkpoint {args.ckpt!r} stores no config; pass --config")
    # "derived" holds what fit computed (world size, steps per epoch), not settings.
    stored = {k: v for k, v in stored.items() if k != "derived"}
    return load_config(None, args.overrides, base=stored)


def pretraining_tracking_uri(config: DictConfig, checkpoint: dict) -> str | None:
    """Where an evaluation finds the checkpoint's pretraining run: ``tracking.tracking_uri`` when
    set, else the store the fit resolved and recorded in the checkpoint. The local default is
    ``sqlite:///<default_root_dir>/mlflow.db`` with ``default_root_dir`` relative to the fit's
    working directory; re-resolving it from another directory would open an empty store."""
    return config.tracking.tracking_uri or checkpoint.get("mlflow_tracking_uri")


def load_split(source, transform, batch_size: int, label_key: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode a split once; every encoder (and the raw-pixel baseline) then reads the same tensors."""
    from scale_ssl.data.full_pass import full_pass_batches

    return [(images, labels) for images, labels in
            full_pass_batches(source, transform, batch_size=batch_size, num_workers=1, label_key=label_key)]
