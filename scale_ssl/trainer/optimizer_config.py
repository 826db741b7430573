"""Parse what ``configure_optimizers`` returns into optimizers and scheduler configs.

Accepted forms (as in Lightning): a single optimizer; a list/tuple of optimizers; a pair of lists
``([optimizers], [schedulers or scheduler configs])``; a dict with ``"optimizer"`` and optional
``"lr_scheduler"``; a list/tuple of such dicts; ``None`` (no optimizer).
A scheduler config is a dict with ``scheduler`` and optional ``interval`` ("step"|"epoch"),
``frequency``, ``monitor``, ``strict``, ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SCHEDULER_KEYS = {"scheduler", "interval", "frequency", "monitor", "strict", "name"}


@dataclass
class SchedulerConfig:
    scheduler: object
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    optimizer_idx: int = 0


def _scheduler_config(item, optimizers: list) -> SchedulerConfig:
    if isinstance(item, dict):
        unknown = set(item) - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(
                f"configure_optimizers: lr scheduler config has unknown keys {sorted(unknown)}; "
                f"valid keys are {sorted(_SCHEDULER_KEYS)}"
            )
        if "scheduler" not in item:
            raise ValueError("configure_optimizers: an lr scheduler config dict needs a 'scheduler' key")
        config = SchedulerConfig(**item)
    else:
        config = SchedulerConfig(scheduler=item)
    if config.interval not in ("step", "epoch"):
        raise ValueError(
            f"configure_optimizers: lr scheduler interval={config.interval!r}; use 'step' or 'epoch'"
        )
    if not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"configure_optimizers: lr scheduler frequency must be an int >= 1, got {config.frequency!r}")
    if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and config.monitor is None:
        raise ValueError(
            "configure_optimizers: ReduceLROnPlateau needs a 'monitor' key naming the logged metric to watch"
        )
    scheduler_optimizer = getattr(config.scheduler, "optimizer", None)
    for idx, opt in enumerate(optimizers):
        if opt is scheduler_optimizer:
            config.optimizer_idx = idx
            break
    else:
        raise ValueError("configure_optimizers: a scheduler is attached to an optimizer that was not returned")
    return config


def parse_optimizer_config(returned) -> tuple[list, list[SchedulerConfig], list[int]]:
    """-> (optimizers, scheduler configs, optimizer frequencies or [])."""
    if returned is None:
        return [], [], []
    if isinstance(returned, torch.optim.Optimizer):
        return [returned], [], []
    if isinstance(returned, dict):
        return parse_optimizer_config([returned])
    if isinstance(returned, (list, tuple)):
        items = list(returned)
        if len(items) == 2 and isinstance(items[0], (list, tuple)) and isinstance(items[1], (list, tuple)):
            optimizers = list(items[0])
            _check_optimizers(optimizers)
            return optimizers, [_scheduler_config(s, optimizers) for s in items[1]], []
        if items and all(isinstance(i, dict) for i in items):
            return _parse_dicts(items)
        _check_optimizers(items)
        return items, [], []
    raise TypeError(
        f"configure_optimizers returned {type(returned).__name__}; return an optimizer, a list of "
        "optimizers, ([optimizers], [schedulers]), a dict with 'optimizer' (and 'lr_scheduler'), or None"
    )


_DICT_KEYS = {"optimizer", "lr_scheduler", "frequency"}


def _parse_dicts(items: list[dict]) -> tuple[list, list[SchedulerConfig], list[int]]:
    optimizers, raw, frequencies = [], [], []
    for position, entry in enumerate(items):
        unknown = set(entry) - _DICT_KEYS
        if unknown:
            raise ValueError(
                f"configure_optimizers: dict {position} has unknown keys {sorted(unknown)}; valid keys are {sorted(_DICT_KEYS)}"
            )
        if "optimizer" not in entry:
            raise ValueError(f"configure_optimizers: dict {position} needs an 'optimizer' key")
        optimizers.append(entry["optimizer"])
        if entry.get("lr_scheduler") is not None:
            raw.append(entry["lr_scheduler"])
        frequencies.append(entry.get("frequency"))
    _check_optimizers(optimizers)
    given = [f for f in frequencies if f is not None]
    if given and len(given) != len(frequencies):
        raise ValueError(
            "configure_optimizers: 'frequency' is given for some optimizers but not all; give every dict a "
            "'frequency' (optimizers take turns) or none (each batch trains every optimizer)"
        )
    for f in given:
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise ValueError(f"configure_optimizers: 'frequency' must be an int >= 1, got {f!r}")
    return optimizers, [_scheduler_config(s, optimizers) for s in raw], given


def _check_optimizers(optimizers: list) -> None:
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"configure_optimizers: expected torch.optim.Optimizer instances, got {type(opt).__name__}"
            )
