"""``SSLModule``: the module API our users know from Lightning and pl_bolts.

A method subclasses it and writes ``training_step``, ``configure_optimizers`` and, if it needs
them, the hooks below. It never asks which strategy it runs under: ``self.all_gather``,
``self.collective``, ``self.log`` and ``self.optimizers()`` are routed to the trainer's strategy.

Hook order of ``Trainer.fit`` (recorded in ``tests/test_trainer_api.py``):
``prepare_data`` (local rank 0 of each node) -> ``setup("fit")`` -> ``configure_optimizers`` ->
``train_dataloader`` -> ``val_dataloader`` -> ``on_fit_start`` -> [sanity validation] ->
``on_train_start`` -> per epoch ``on_train_epoch_start`` -> per batch ``on_after_batch_transfer``,
``on_train_batch_start``,
``training_step``, ``training_step_end``, ``on_before_optimizer_step``, ``on_train_batch_end``
-> [validation: ``on_validation_epoch_start``, ``validation_step``, ``validation_step_end``,
``validation_epoch_end(outputs)`` if overridden, ``on_validation_epoch_end``] ->
``on_train_epoch_end`` -> ``on_train_end`` -> ``on_fit_end`` -> ``teardown("fit")``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from scale_ssl.collectives import Collective, default_collective
from scale_ssl.checkpoint.reader import read_checkpoint
from scale_ssl.trainer.metrics import LoggedMetrics, LogOptions


class SSLModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trainer = None  # set by the Trainer; plain attribute, not a submodule
        self.hparams: dict[str, Any] = {}
        self.automatic_optimization = True
        self._metrics = LoggedMetrics()
        self._stage = "train"
        self._batch_size_hint = 1  # samples in the batch being stepped (set by the trainer)

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
        checkpoint = read_checkpoint(checkpoint_path)
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
        """Add the module's extra state (queues, EMA targets, ...) to ``checkpoint``. Called on
        every rank (only rank zero writes), so collectives are allowed here."""

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
    def global_rank(self) -> int:
        return self.trainer.strategy.global_rank if self.trainer is not None else 0

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank along dim 0; differentiable if ``sync_grads``."""
        return self.collective.all_gather(tensor, grad=sync_grads)

    def log(
        self,
        name: str,
        value,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        sync_dist: bool = False,
        batch_size: int | None = None,
        **_: Any,
    ) -> None:
        """Record a metric. Values stay on the device (no host sync); the trainer reduces
        (``sync_dist``: mean over ranks) and fetches them only at logging intervals / epoch end.
        Defaults: per step in training, per epoch (batch-size-weighted mean) in validation/test;
        ``batch_size`` defaults to the current batch's (the length of its first tensor)."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        training = self._stage == "train"
        options = LogOptions(
            prog_bar=prog_bar,
            logger=logger,
            on_step=training if on_step is None else on_step,
            on_epoch=(not training) if on_epoch is None else on_epoch,
            sync_dist=sync_dist,
        )
        self._metrics.add(name, value, options, batch_size if batch_size is not None else self._batch_size_hint)

    def log_dict(self, metrics: dict, **kwargs: Any) -> None:
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    # -- weights outside the forward pass --------------------------------------------------
    def ema_target_modules(self) -> list[nn.Module]:
        """Submodules that follow others by an exponential moving average instead of the
        optimizer (BYOL's target network, MoCo's momentum encoder). State that averages stays in
        fp32: strategies keep these whole and in fp32 whatever the engine's precision or sharding
        (DeepSpeed holds an fp32 copy beside its bf16 or ZeRO-3-sharded working copy);
        ``master_weights`` / ``set_master_weights`` read and write that copy."""
        return []

    def master_weights(self, params) -> list[torch.Tensor]:
        """Full fp32 values of ``params`` as the optimizer holds them. Under DeepSpeed these are
        its fp32 master copy gathered from the ZeRO partitions (the module holds bf16 copies, or
        empty ZeRO-3 shards outside forward), so this is a collective there: call it on every
        rank. Elsewhere the parameters themselves."""
        params = list(params)
        if self.trainer is None:
            return [p.detach() for p in params]
        return self.trainer.strategy.master_parameters(params)

    def set_master_weights(self, params, values) -> None:
        """Write full values (identical on every rank) into ``params`` where both the optimizer
        and the forward pass read them (under DeepSpeed: its fp32 master copy and the module's
        working copy), so the next optimizer step starts from them."""
        params, values = list(params), list(values)
        if self.trainer is None:
            with torch.no_grad():
                for p, value in zip(params, values):
                    if value.data_ptr() != p.data_ptr():
                        p.copy_(value.to(p.dtype))
            return
        self.trainer.strategy.write_master_parameters(params, values)

    def skip_update(self, params) -> None:
        """Leave ``params`` untouched by the coming optimizer step (no gradient step, weight decay
        or momentum; their optimizer state unchanged), on every strategy. Call it from
        ``on_before_optimizer_step``; setting ``p.grad = None`` there is not enough under
        DeepSpeed, whose ZeRO partitions hold their own reduced gradients."""
        params = list(params)
        if self.trainer is None:
            for p in params:
                p.grad = None
            return
        self.trainer.strategy.skip_update(params)

    # -- optimizers ------------------------------------------------------------------------
    def optimizers(self, use_pl_optimizer: bool = True):
        """The optimizers from ``configure_optimizers`` (wrapped; ``.optimizer`` is the raw one)."""
        if self.trainer is None:
            raise RuntimeError("optimizers() is only available while a Trainer runs this module")
        opts = self.trainer.wrapped_optimizers if use_pl_optimizer else self.trainer.optimizers
        return opts[0] if len(opts) == 1 else list(opts)

    def lr_schedulers(self):
        if self.trainer is None:
            raise RuntimeError("lr_schedulers() is only available while a Trainer runs this module")
        scheds = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        if not scheds:
            return None
        return scheds[0] if len(scheds) == 1 else scheds

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Backward for manual optimization, through the precision scaler and the strategy."""
        if self.trainer is None:
            loss.backward(*args, **kwargs)
            return
        self.trainer.manual_backward(loss, *args, **kwargs)

    def toggle_optimizer(self, optimizer) -> None:
        """Only ``optimizer``'s parameters require grad until ``untoggle_optimizer``."""
        self.trainer.toggle_optimizer(self, optimizer)

    def untoggle_optimizer(self, optimizer=None) -> None:
        self.trainer.untoggle_optimizer(self)

    def clip_gradients(self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm") -> None:
        if gradient_clip_val is None:
            return
        self.trainer.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- data ------------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, data) -> Any:
        """The augmentation this method trains on, built from the config's ``data`` section
        (``image_size``, ``channels``, ``mean``, ``std``, ``crop_scale``, ..., and ``views`` for
        method-specific options). Returns a picklable callable on a PIL image."""
        raise NotImplementedError(f"{cls.__name__} must implement train_transform(data) to run from a config")

    def prepare_data(self) -> None:
        """Download/pack data: runs once per node (local rank 0) before any dataloader."""

    def train_dataloader(self):
        return None

    def val_dataloader(self):
        return None

    def test_dataloader(self):
        return None

    def predict_dataloader(self):
        return None

    # -- steps -----------------------------------------------------------------------------
    def configure_optimizers(self):
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers()")

    def training_step(self, batch, batch_idx: int, *args):
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def training_step_end(self, outputs):
        """Receives the step's outputs; under ``strategy=dp`` those of every part, gathered (tensors
        concatenated along dim 0, per-part scalars stacked). Compute full-batch losses here."""
        return outputs

    training_step_end.is_default_hook = True  # dp averages part losses when this is not overridden

    def validation_step(self, batch, batch_idx: int, *args):
        return None

    def validation_step_end(self, outputs):
        return outputs

    def test_step(self, batch, batch_idx: int, *args):
        raise NotImplementedError(f"{type(self).__name__} must implement test_step(batch, batch_idx) to run trainer.test")

    def test_step_end(self, outputs):
        return outputs

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return self(batch[0])
        return self(batch)

    # -- lifecycle hooks -------------------------------------------------------------------
    def setup(self, stage: str) -> None: ...

    def teardown(self, stage: str) -> None: ...

    def on_fit_start(self) -> None: ...

    def on_fit_end(self) -> None: ...

    def on_train_start(self) -> None: ...

    def on_train_end(self) -> None: ...

    def on_train_epoch_start(self) -> None: ...

    def on_train_epoch_end(self) -> None: ...

    def on_train_batch_start(self, batch, batch_idx: int) -> None: ...

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook: change a batch once it is on the training device, before the step
        (training, validation, test and predict batches). Default: run the ``batch_augmentation``
        submodule on it if one is set (``data.augment_on: device`` sets
        ``data.device_augment.DeviceViewAugment``, which finishes the loader's uint8 crops and
        passes anything else through), else return the batch unchanged."""
        augment = self._modules.get("batch_augmentation")
        return augment(batch) if augment is not None else batch

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Runs after the optimizer step (EMA targets and queues see the updated weights)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients are final (synced, unscaled, clipped); the step has not happened yet."""

    def on_validation_epoch_start(self) -> None: ...

    def on_validation_epoch_end(self) -> None: ...

    def on_test_epoch_start(self) -> None: ...

    def on_test_epoch_end(self) -> None: ...
