"""Resolve a run config at its intended scale without launching anything: ``scale-ssl plan``.

Design contract 1 says the global batch is the unit and everything else is derived from it and
checked at start-up. This module does the same derivation *before* a 64-GPU or 128-core job is
queued, from the config alone, so that a config which cannot run at its stated scale fails here
(and in ``tests/test_config_plans.py``, which resolves every config under ``configs/``):

* per-device batch = ``trainer.global_batch_size / (world_size x trainer.accumulate_grad_batches)``
  (``per_device_batch_size``, the same function ``fit`` uses);
* the strategy's own options are checked by building it (``build_strategy_from_config``), and a
  DeepSpeed JSON is merged against the trainer settings exactly as the engine would be;
* the method's own figures (negatives per anchor, queue length, Sinkhorn rows) come from its
  ``derived_run_figures`` hook, which also checks that a queue is a multiple of the global batch;
* a SwAV-style sharded queue must split evenly over the ranks;
* steps per epoch come from the shard index when it is readable here (the same epoch plan the
  stream uses), else from ``plan.num_samples``;
* the learning rate must follow the rule the config states (``plan.lr_rule``): linear
  ``base x B / base_batch_size`` or sqrt ``base x sqrt(B / base_batch_size)``, B the global batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scale_ssl.cli.assembly import build_strategy_from_config
from scale_ssl.config import ConfigError, per_device_batch_size
from scale_ssl.methods import METHODS
from scale_ssl.strategies.step_settings import StepSettings

LR_RULES = ("linear", "sqrt", "none")
# Relative tolerance when checking a written lr against its rule (configs round to 4-5 digits).
LR_RELATIVE_TOLERANCE = 1e-3
SINGLE_PROCESS_STRATEGIES = ("single", "dp")


@dataclass
class RunPlan:
    """Everything ``scale-ssl plan`` derives from a config at one world size."""

    config_path: str | None
    method: str
    strategy: str
    world_size: int
    devices_per_node: int | None
    global_batch_size: int
    accumulate_grad_batches: int
    per_device_batch_size: int
    num_samples: int
    samples_source: str
    steps_per_epoch: int
    samples_dropped_per_epoch: int
    total_steps: int
    learning_rate: float | None
    lr_rule: str
    negatives_per_anchor: int
    queue_length: int = 0
    queue_rows_per_rank: int = 0
    method_figures: dict[str, Any] = field(default_factory=dict)
    deepspeed_config: dict | None = None

    @property
    def num_nodes(self) -> int | None:
        if not self.devices_per_node:
            return None
        return math.ceil(self.world_size / self.devices_per_node)


def resolve_plan(config: DictConfig, world_size: int | None = None, config_path: str | None = None) -> RunPlan:
    """Derive and check ``config`` at ``world_size`` (default: ``plan.world_size``). Raises
    ``ConfigError`` naming the key and the fix for anything that could not run at that scale."""
    t, p = config.trainer, config.plan
    world = world_size if world_size is not None else p.world_size
    if world is None:
        raise ConfigError(
            "no world size to plan for: pass --world-size N or state plan.world_size in the config "
            "(the number of GPUs, or XLA devices, the config is written for)"
        )
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be an int >= 1, got {world!r}")
    if t.strategy in SINGLE_PROCESS_STRATEGIES and world != 1:
        raise ConfigError(
            f"trainer.strategy={t.strategy} runs one process, but the plan asks for {world} ranks; "
            "use trainer.strategy=ddp (or deepspeed/xla) or plan.world_size=1"
        )
    if p.devices_per_node is not None and (p.devices_per_node < 1 or (world > p.devices_per_node and world % p.devices_per_node)):
        raise ConfigError(
            f"plan.devices_per_node={p.devices_per_node} does not divide plan.world_size={world}; "
            "every node must run the same number of ranks"
        )

    batch = per_device_batch_size(t.global_batch_size, world, t.accumulate_grad_batches)
    if t.strategy == "dp" and t.devices and batch % t.devices:
        raise ConfigError(
            f"trainer.strategy=dp splits each batch of {batch} into trainer.devices={t.devices} parts; "
            f"pick a global batch that is a multiple of {t.devices * t.accumulate_grad_batches}"
        )

    strategy = _check_strategy(config)
    ds_config = _deepspeed_config(strategy, config, batch, world) if t.strategy == "deepspeed" else None

    model = OmegaConf.to_container(config.model, resolve=True)
    step_batch = t.global_batch_size // t.accumulate_grad_batches
    figures = {"negatives_per_anchor": 2 * step_batch - 2}
    hook = getattr(METHODS[config.method], "derived_run_figures", None)
    if hook is not None:
        try:
            figures.update(hook(model, step_batch))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    queue_length = int(figures.get("queue_length", 0))
    queue_rows = _queue_rows_per_rank(config.method, queue_length, world)

    num_samples, source, steps, dropped = _steps_per_epoch(config, batch, world)
    total = t.max_steps if t.max_steps > 0 else steps * int(t.max_epochs)
    if t.max_steps > 0 and t.max_epochs is not None:
        total = min(total, steps * int(t.max_epochs))

    lr = _learning_rate(config, model)
    rule = _check_lr_rule(config, lr)
    return RunPlan(
        config_path=config_path, method=config.method, strategy=t.strategy, world_size=world,
        devices_per_node=p.devices_per_node, global_batch_size=t.global_batch_size,
        accumulate_grad_batches=t.accumulate_grad_batches, per_device_batch_size=batch,
        num_samples=num_samples, samples_source=source, steps_per_epoch=steps,
        samples_dropped_per_epoch=dropped, total_steps=total, learning_rate=lr, lr_rule=rule,
        negatives_per_anchor=int(figures["negatives_per_anchor"]), queue_length=queue_length,
        queue_rows_per_rank=queue_rows, method_figures=figures, deepspeed_config=ds_config,
    )


def _check_strategy(config: DictConfig):
    """Build the strategy object as ``fit`` does (no process group, no device): its constructor
    checks the strategy's own options."""
    try:
        return build_strategy_from_config(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _deepspeed_config(strategy, config: DictConfig, batch: int, world: int) -> dict:
    """The DeepSpeed config the engine would get at this world size: our batch, accumulation,
    precision and clipping merged with (and checked against) ``trainer.deepspeed_config``."""
    t = config.trainer
    strategy.micro_batch_size = batch
    strategy.configure_step(StepSettings(
        precision=str(t.precision), accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val, gradient_clip_algorithm=t.gradient_clip_algorithm,
    ))
    try:
        return strategy.build_config(world_size=world)  # the world the launcher will start
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None


def _queue_rows_per_rank(method: str, queue_length: int, world: int) -> int:
    """SwAV shards its queue over the ranks (``SwAVQueue``: queue_length / world rows each); MoCo
    keeps the whole queue, identical, on every rank (``MoCoQueue``)."""
    if not queue_length:
        return 0
    sharded = method == "swav"
    if sharded and queue_length % world:
        raise ConfigError(
            f"model.queue_length={queue_length} does not split over {world} ranks; use a multiple of the global batch"
        )
    return queue_length // world if sharded else queue_length


def _steps_per_epoch(config: DictConfig, batch: int, world: int) -> tuple[int, str, int, int]:
    """(num_samples, where it came from, steps per epoch, samples dropped per epoch)."""
    d, p = config.data, config.plan
    index = _local_shard_index(d.train_shards)
    if index is not None:
        from scale_ssl.data.stream import EpochShardPlan, ResampledShardPlan

        sizes = [shard.num_samples for shard in index.shards]
        common = dict(epoch=0, seed=config.trainer.seed, world_size=world, num_workers=max(1, d.num_workers), batch_size=batch)
        plan = EpochShardPlan(sizes, **common) if d.mode == "exact" else ResampledShardPlan(sizes, **common)
        source = f"shard index {d.train_shards} ({len(sizes)} shards, {d.mode} mode)"
        steps, dropped, total = plan.steps_per_epoch, plan.samples_dropped, sum(sizes)
    elif p.num_samples is not None:
        if p.num_samples < 1:
            raise ConfigError(f"plan.num_samples must be >= 1, got {p.num_samples}")
        total = int(p.num_samples)
        steps = total // (batch * world)
        dropped = total - steps * batch * world
        source = f"plan.num_samples (shard index at {d.train_shards} not readable here; exact mode drops the same remainder)"
    else:
        raise ConfigError(
            f"cannot count steps per epoch: data.train_shards={d.train_shards!r} has no readable shards.json here "
            "and plan.num_samples is not set; state the training set size (ImageNet-1k: 1281167)"
        )
    if steps < 1:
        raise ConfigError(
            f"{total} samples make no full global batch of {batch * world}; lower trainer.global_batch_size"
        )
    return total, source, steps, dropped


def _local_shard_index(train_shards: str):
    if "://" in str(train_shards) or str(train_shards).startswith("pipe:"):
        return None
    from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex

    path = str(train_shards)
    index_path = path if path.endswith(".json") else os.path.join(path, INDEX_FILENAME)
    if not os.path.isfile(index_path):
        return None
    return ShardIndex.load(index_path)


def _learning_rate(config: DictConfig, model: dict) -> float | None:
    """The peak lr the run will use: from an ``optim`` recipe if the config has one, else the
    method's ``learning_rate`` argument (its default when the config leaves it out)."""
    optim = config.get("optim") if "optim" in config else None
    if optim is not None and "lr" in optim:
        from scale_ssl.optim import effective_lr

        return float(effective_lr(OmegaConf.to_container(optim, resolve=True)["lr"], config.trainer.global_batch_size))
    if "learning_rate" in model:
        return float(model["learning_rate"])
    import inspect

    default = inspect.signature(METHODS[config.method].__init__).parameters.get("learning_rate")
    return None if default is None else float(default.default)


def _check_lr_rule(config: DictConfig, lr: float | None) -> str:
    p = config.plan
    optim = config.get("optim") if "optim" in config else None
    optim_lr = None if optim is None else OmegaConf.to_container(optim, resolve=True).get("lr")
    if isinstance(optim_lr, dict):
        # The recipe scales its own lr from the global batch: that rule is the one the run follows.
        scale, reference = optim_lr.get("scale", "linear"), optim_lr.get("reference_batch", 256)
        return (f"optim.lr: {optim_lr['base']:g} x {scale}({config.trainer.global_batch_size} / {reference}) = {lr:.6g}, "
                "from the global batch")
    lr_key = "optim.lr" if optim_lr is not None else "model.learning_rate"
    rule = p.lr_rule or "none"
    if rule not in LR_RULES:
        raise ConfigError(f"plan.lr_rule={p.lr_rule!r} is not known; use one of {LR_RULES} (or null)")
    if rule == "none":
        return "none stated (lr taken as written)"
    if p.base_learning_rate is None or p.base_batch_size < 1:
        raise ConfigError(f"plan.lr_rule={rule} needs plan.base_learning_rate and plan.base_batch_size >= 1")
    ratio = config.trainer.global_batch_size / p.base_batch_size
    expected = p.base_learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))
    text = (f"{rule}: {p.base_learning_rate:g} x {'' if rule == 'linear' else 'sqrt'}"
            f"({config.trainer.global_batch_size} / {p.base_batch_size}) = {expected:.6g}")
    if lr is None or not math.isclose(lr, expected, rel_tol=LR_RELATIVE_TOLERANCE):
        raise ConfigError(
            f"{lr_key}={lr} does not follow plan.lr_rule ({text}) at trainer.global_batch_size="
            f"{config.trainer.global_batch_size}; set {lr_key}={expected:.6g} or fix the rule"
        )
    return text
