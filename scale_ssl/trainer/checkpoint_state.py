"""What a checkpoint of a run holds, and how a run resumes from one.

The keys (format ``CHECKPOINT_FORMAT_VERSION``, written through the strategy, atomically, by
``scale_ssl.checkpoint``): the module's ``state_dict`` and ``hyper_parameters``; optimizer,
scheduler and precision states; where the run stands (``global_step``, ``epoch``,
``batch_in_epoch``, ``planned_steps``, ``world_size``); every rank's RNG state; callback states;
the data stream's state; the MLflow run id and the resolved config. Resuming restores all of it,
so a run stopped and resumed ends with the same weights as one that never stopped (contract 6),
and a resume into a run of another length re-plans the learning-rate schedule and says so.
"""

from __future__ import annotations

import os
import warnings

import torch

from scale_ssl.checkpoint.files import (
    CHECKPOINT_FORMAT_VERSION,
    CorruptCheckpointError,
    checkpoint_candidates,
    load_checkpoint_file,
)
from scale_ssl.trainer.seed import rng_state, set_rng_state


class CheckpointState:
    def __init__(self, trainer):
        self.trainer = trainer
        self.last_saved: tuple[int, int] | None = None  # (global_step, epoch) of the last last.ckpt

    def save(self, path: str) -> None:
        """Called on every rank (states are gathered); rank zero writes atomically."""
        trainer = self.trainer
        module, strategy = trainer.module, trainer.strategy
        checkpoint = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "module_class": type(module).__name__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "optimizer_states": strategy.optimizer_state_dicts(trainer.optimizers),
            "lr_scheduler_states": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "lr_scheduler_step_counts": [getattr(c, "_steps", 0) for c in trainer.lr_scheduler_configs],
            "precision_state": trainer.precision.state_dict(),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_in_epoch": trainer.batch_in_epoch,
            "world_size": trainer.world_size,
            "planned_steps": trainer.planned_steps,
            "rng_states": strategy.all_gather_object(rng_state()),
            "callbacks": {},
            "mlflow_run_id": trainer.logger.run_id if trainer.logger is not None else None,
            # The store as resolved at fit time (an absolute path for the local sqlite default), so
            # an evaluation started from another directory finds the run.
            "mlflow_tracking_uri": getattr(trainer.logger, "tracking_uri", None),
            "config": trainer.run_config,
        }
        for cb in trainer.callbacks:
            checkpoint["callbacks"][cb.state_key] = cb.state_dict()
            cb.on_save_checkpoint(trainer, module, checkpoint)
        if hasattr(trainer.train_dataloader, "state_dict"):
            checkpoint["data_state"] = trainer.train_dataloader.state_dict()
        module.on_save_checkpoint(checkpoint)
        strategy.save_checkpoint(checkpoint, path)
        if os.path.basename(path) == "last.ckpt":
            self.last_saved = (trainer.global_step, trainer.current_epoch)

    def load_for_fit(self, ckpt_path: str) -> dict | None:
        """The checkpoint to resume from. ``"last"``: rank zero picks the newest that verifies
        (``last.ckpt``, else ``last.ckpt.prev``) and tells every rank, so all load the same one;
        ``None`` (start from scratch) when no checkpoint exists yet."""
        trainer = self.trainer
        strategy = trainer.strategy
        if ckpt_path != "last":
            return strategy.load_checkpoint(self.resolve_path(ckpt_path))
        choice = None
        if trainer.is_global_zero:
            choice = newest_good_checkpoint(self.resolve_path("last"))
        kind, value = strategy.broadcast_object(choice or ("none", None), src=0)
        if kind == "error":
            raise CorruptCheckpointError(value)
        if kind == "none":
            if trainer.is_global_zero:
                warnings.warn(f"ckpt_path='last': no checkpoint in {trainer.checkpoint_dir!r} yet; training starts "
                              "from scratch", stacklevel=4)
            return None
        checkpoint = strategy.load_checkpoint(value)
        if trainer.is_global_zero:
            print(f"scale_ssl: resuming from {value} at global step {checkpoint.get('global_step')} (restart "
                  f"{elastic_restart_count()}; the newest checkpoint that passed its checksum)", flush=True)
        return checkpoint

    def resolve_path(self, ckpt_path: str) -> str:
        trainer = self.trainer
        if ckpt_path == "last":
            return os.path.join(trainer.checkpoint_dir, "last.ckpt")
        if ckpt_path == "best":
            for cb in trainer.callbacks:
                if getattr(cb, "best_model_path", None):
                    return cb.best_model_path
            raise ValueError("ckpt_path='best' needs a ModelCheckpoint callback that has saved a best model")
        return ckpt_path

    def restore(self, checkpoint: dict) -> None:
        trainer = self.trainer
        module = trainer.module
        if checkpoint.get("state_dict") is not None:  # None: the strategy's engine loaded the weights
            module.load_state_dict(checkpoint["state_dict"])
        trainer.strategy.load_optimizer_states(trainer.optimizers, checkpoint["optimizer_states"])
        old_plan, new_plan = checkpoint.get("planned_steps"), trainer.planned_steps
        replan = old_plan is not None and new_plan is not None and old_plan != new_plan
        lr_before = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        configs = trainer.lr_scheduler_configs
        for config, state, count in zip(configs, checkpoint["lr_scheduler_states"],
                                        checkpoint.get("lr_scheduler_step_counts", [0] * len(configs))):
            if replan and not isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                fast_forward(config.scheduler, int(state.get("last_epoch", 0)))
            else:
                config.scheduler.load_state_dict(state)
            config._steps = count
        trainer.precision.load_state_dict(checkpoint.get("precision_state", {}))
        trainer.global_step = int(checkpoint["global_step"])
        trainer.current_epoch = int(checkpoint["epoch"])
        if replan and configs and trainer.is_global_zero:
            lr_now = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
            print(f"scale_ssl: resuming at global step {trainer.global_step} of a run planned for {old_plan} optimizer "
                  f"steps; this run is planned for {new_plan} (max_steps/max_epochs or the steps per "
                  f"epoch changed). The learning-rate schedule is re-planned over {new_plan} steps and "
                  f"continues at step {trainer.global_step} of that plan: lr {_format_lrs(lr_before)} (the old plan's) -> "
                  f"{_format_lrs(lr_now)}. The steps already taken followed the old plan, so the run differs from one "
                  f"planned for {new_plan} steps from the start.", flush=True)
        trainer.fit_loop.batches_to_skip = int(checkpoint.get("batch_in_epoch", 0))
        trainer.batch_in_epoch = trainer.fit_loop.batches_to_skip
        states = checkpoint.get("rng_states") or []
        if checkpoint.get("world_size") == trainer.world_size and len(states) == trainer.world_size:
            set_rng_state(states[trainer.strategy.global_rank])
        for cb in trainer.callbacks:
            if cb.state_key in checkpoint.get("callbacks", {}):
                cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
            cb.on_load_checkpoint(trainer, module, checkpoint)
        if "data_state" in checkpoint and hasattr(trainer.train_dataloader, "load_state_dict"):
            trainer.train_dataloader.load_state_dict(checkpoint["data_state"])
        module.on_load_checkpoint(checkpoint)


def elastic_restart_count() -> int:
    """How often torchrun's elastic agent has restarted this worker group (0 on the first start)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def fast_forward(scheduler, steps: int) -> None:
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


def newest_good_checkpoint(last: str) -> tuple[str, str | None]:
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
