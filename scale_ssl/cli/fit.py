"""``scale-ssl fit``: assemble strategy, data stream, method, logger and trainer from a config."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from scale_ssl.cli.assembly import build_strategy_from_config, build_train_stream, set_cpu_threads
from scale_ssl.cli.fit_summary import FitClock
from scale_ssl.config import ConfigError, per_device_batch_size
from scale_ssl.data.shard_source import ShardSourceError
from scale_ssl.methods import METHODS
from scale_ssl.optim import OptimRecipe, effective_lr
from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.seed import seed_everything


def batchnorm_line(config: DictConfig, module, world_size: int, per_device: int) -> str:
    """What the run's BatchNorm layers normalise over, for the start-up banner."""
    t = config.trainer
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return "BatchNorm: none in this model"
    step_batch = t.global_batch_size // t.accumulate_grad_batches
    if t.strategy == "dp":
        return (f"BatchNorm: per dp part (trainer.sync_batchnorm=false): each of the {t.devices} parts is normalised "
                "with its own statistics")
    if world_size == 1:
        return f"BatchNorm: over the whole batch of {step_batch} (one process)"
    if not t.sync_batchnorm and (config.model or {}).get("sync_bn"):
        return "BatchNorm: global over the ranks, by the model's own model.sync_bn=true"
    if t.sync_batchnorm:
        return (f"BatchNorm: global over the {world_size} ranks' {step_batch} samples (trainer.sync_batchnorm=true): "
                f"{world_size} x {per_device} trains as one process on {step_batch}")
    return (f"BatchNorm: PER RANK (trainer.sync_batchnorm=false): each rank normalises with the statistics of its own "
            f"{per_device} samples, so {world_size} x {per_device} is not one process on {step_batch}, and a contrastive "
            "model can tell the ranks' samples apart by them (google-research/simclr #114)")


def run_fit(config: DictConfig):
    t = config.trainer
    # Build the module first (seeded: the same initial weights on every rank and every rerun),
    # so a bad model argument fails before any process group or data stream exists.
    resolved = OmegaConf.to_container(config, resolve=True)
    seed_everything(t.seed)
    module = METHODS[config.method](**resolved["model"])
    strategy = build_strategy_from_config(config)
    strategy.setup_environment()
    set_cpu_threads(config, strategy)
    batch_size = per_device_batch_size(t.global_batch_size, strategy.world_size, t.accumulate_grad_batches)
    if hasattr(strategy, "micro_batch_size"):  # DeepSpeed's config names the per-device batch
        strategy.micro_batch_size = batch_size
    try:
        stream = build_train_stream(config, strategy, batch_size)
    except ShardSourceError as err:  # unreachable/mistyped shard URL at start-up: a one-line input error
        raise ConfigError(f"data.train_shards={config.data.train_shards!r}: {err}") from None

    # data.augment_on=device: the loader's views are uint8 crops + parameters; the module finishes
    # them on its device (SSLModule.on_after_batch_transfer runs this submodule; it holds no state).
    device_augmentation = getattr(stream.transform, "device_augmentation", lambda: None)()
    if device_augmentation is not None:
        module.batch_augmentation = device_augmentation

    resolved["derived"] = {
        "world_size": strategy.world_size,
        "per_device_batch_size": batch_size,
        "steps_per_epoch": stream.steps_per_epoch,
        "samples_per_epoch": stream.num_samples,
        "samples_dropped_per_epoch": stream.samples_dropped_per_epoch,
        "negatives_per_anchor": 2 * t.global_batch_size // t.accumulate_grad_batches - 2,
    }
    # Optional classmethod hook: a method reports its own figures (queue length, negatives incl.
    # a queue, ...) for the global batch of one optimizer micro-step, and checks they divide.
    method_figures = getattr(METHODS[config.method], "derived_run_figures", None)
    if method_figures is not None:
        resolved["derived"].update(method_figures(resolved["model"], t.global_batch_size // t.accumulate_grad_batches))
    if resolved.get("optim"):
        resolved["derived"]["effective_lr"] = effective_lr(resolved["optim"].get("lr", 1e-3), t.global_batch_size)
    clock = FitClock()
    logger = False
    if config.tracking.enabled:
        logger = MLflowLogger(
            tracking_uri=config.tracking.tracking_uri,
            experiment_name=config.tracking.experiment_name,
            run_name=config.tracking.run_name,
            default_root_dir=t.default_root_dir,
            rank=strategy.global_rank,
        )
    trainer = Trainer(
        strategy=strategy,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm,
        log_every_n_steps=t.log_every_n_steps,
        checkpoint_every_n_steps=t.checkpoint_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=t.default_root_dir,
        seed=t.seed,
        logger=logger,
        run_config=resolved,
        optim_recipe=OptimRecipe(resolved["optim"], t.global_batch_size) if resolved.get("optim") else None,
        on_nonfinite_loss=t.on_nonfinite_loss,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        compile_model=t.compile,
        channels_last=t.channels_last,
        callbacks=[clock],
    )
    if strategy.is_global_zero:
        d = resolved["derived"]
        per_process = d["per_device_batch_size"]
        if t.strategy == "dp":  # one process whose batch is split into parts, one per device
            parts = t.devices
            split = f"{per_process} split into {parts} dp parts of ~{per_process // parts}"
        else:
            split = f"{per_process}/device x {d['world_size']}"
        print(
            f"scale_ssl fit: {config.method} on {strategy.name} x{d['world_size']}, global batch "
            f"{t.global_batch_size} = {split} x "
            f"{t.accumulate_grad_batches} accum; {d['steps_per_epoch']} steps/epoch over {d['samples_per_epoch']} "
            f"samples ({d['samples_dropped_per_epoch']} dropped per epoch so every rank runs equal steps); "
            f"{d['negatives_per_anchor']} negatives per anchor",
            flush=True,
        )
        print("scale_ssl fit: " + batchnorm_line(config, module, d["world_size"], per_process), flush=True)
    trainer.fit(module, stream, ckpt_path=t.ckpt_path)
    # Nothing after fit needs the group. After an error the strategy's exit hook destroys it
    # instead, once the traceback holding DDP's frames is released (strategies/ddp.py).
    strategy.teardown()
    clock.print_summary(trainer, t.global_batch_size)
    return trainer, module
