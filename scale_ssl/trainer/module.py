"""``SSLModule``: the module API our users know from Lightning and pl_bolts.

A method subclasses it and writes ``training_step``, ``configure_optimizers`` and, if it needs
them, the hooks below. It never asks which strategy it runs under: ``self.all_gather``,
``self.collective``, ``self.log`` and ``self.optimizers()`` are routed to the trainer's strategy.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from scale_ssl.collectives import Collective, default_collective
from scale_ssl.strategies.checkpoint_io import load_checkpoint_file


class SSLModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trainer = None  # set by Trainer.fit; plain attribute, not a submodule
        self.hparams: dict[str, Any] = {}
        self._logged: dict[str, tuple[torch.Tensor, dict]] = {}

    # -- hyper-parameters and checkpoints --------------------------------------------------
    def save_hyperparameters(self, *, ignore: tuple[str, ...] = ()) -> None:
        """Record the caller's ``__init__`` arguments in ``self.hparams`` (stored in checkpoints,
        logged to MLflow, and used by ``load_from_checkpoint`` to rebuild the module)."""
        frame = inspect.currentframe().f_back
        init_args = inspect.getargvalues(frame)
        params = {}
        for name in init_args.args[1:]:
            if name not in ignore:
                params[name] = init_args.locals[name]
        if init_args.keywords:
            params.update({k: v for k, v in init_args.locals[init_args.keywords].items() if k not in ignore})
        self.hparams = params

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, strict: bool = True, map_location=None, **overrides):
        """Rebuild the module from the hyper-parameters stored in a checkpoint and load its weights.

        ``strict=False`` tolerates missing/unexpected keys (e.g. loading only what a feature
        extractor needs); a checkpoint of another method is still an error.
        """
        checkpoint = load_checkpoint_file(checkpoint_path)
        stored_class = checkpoint.get("module_class")
        if stored_class is not None and stored_class != cls.__name__:
            raise ValueError(
                f"checkpoint {checkpoint_path!r} holds a {stored_class} module, not {cls.__name__}; "
                f"load it with {stored_class}.load_from_checkpoint"
            )
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.update(overrides)
        module = cls(**hparams)
        module.load_state_dict(checkpoint["state_dict"], strict=strict)
        if map_location is not None:
            module = module.to(map_location)
        module.on_load_checkpoint(checkpoint)
        return module

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add the module's extra state (queues, EMA targets, ...) to ``checkpoint``."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore what ``on_save_checkpoint`` added."""

    # -- routed to the trainer / strategy --------------------------------------------------
    @property
    def collective(self) -> Collective:
        if self.trainer is not None:
            return self.trainer.strategy.collective
        return default_collective()

    @property
    def global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank along dim 0; differentiable if ``sync_grads``."""
        return self.collective.all_gather(tensor, grad=sync_grads)

    def log(self, name: str, value, prog_bar: bool = False, sync_dist: bool = False, **_: Any) -> None:
        """Record a metric for this step. Values stay on the device (no host sync); the trainer
        reduces (``sync_dist``: mean over ranks) and fetches them only at logging intervals."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        self._logged[name] = (value.detach(), {"prog_bar": prog_bar, "sync_dist": sync_dist})

    def log_dict(self, metrics: dict, **kwargs: Any) -> None:
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    def optimizers(self):
        if self.trainer is None:
            raise RuntimeError("optimizers() is only available while a Trainer runs this module")
        opts = self.trainer.optimizers
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self):
        if self.trainer is None:
            raise RuntimeError("lr_schedulers() is only available while a Trainer runs this module")
        scheds = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        if not scheds:
            return None
        return scheds[0] if len(scheds) == 1 else scheds

    # -- data -----------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, data) -> Any:
        """The augmentation this method trains on, built from the config's ``data`` section
        (``image_size``, ``channels``, ``mean``, ``std``, ``crop_scale``, ..., and ``views`` for
        method-specific options). Returns a picklable callable on a PIL image."""
        raise NotImplementedError(f"{cls.__name__} must implement train_transform(data) to run from a config")

    # -- hooks a method may override -------------------------------------------------------
    def setup(self, stage: str) -> None: ...

    def configure_optimizers(self):
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers()")

    def training_step(self, batch, batch_idx: int):
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def training_step_end(self, outputs):
        return outputs

    def validation_step(self, batch, batch_idx: int):
        return None

    def train_dataloader(self):
        return None

    def val_dataloader(self):
        return None

    def on_fit_start(self) -> None: ...

    def on_train_start(self) -> None: ...

    def on_train_epoch_start(self) -> None: ...

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None: ...

    def on_train_epoch_end(self) -> None: ...

    def on_validation_epoch_end(self) -> None: ...

    def on_train_end(self) -> None: ...

