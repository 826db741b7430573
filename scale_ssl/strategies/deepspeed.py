"""DeepSpeed: the ZeRO engine (stages 0-3, optional CPU offload) behind the same trainer.

The engine is real: ``deepspeed.initialize`` with a config built from the trainer's settings
(micro batch per device, gradient accumulation, clipping, bf16) or from a user's
``ds_config.json``, whose values are checked against those settings (a mismatch is an error, not
a silent override). Backward and step go through the engine; micro-batches before an
accumulation boundary are marked with ``set_gradient_accumulation_boundary(False)``, so ZeRO
reduces gradients once per optimizer step. Checkpoints are DeepSpeed checkpoint *directories*
(sharded optimizer state) whose ``client_state`` carries our own state (global step, RNG, data
position, MLflow run id, queues); ``consolidate_checkpoint`` turns one into a plain scale_ssl
checkpoint for ``load_from_checkpoint`` / feature extraction.

Gathers for global losses use our ``TorchDistributedCollective`` on the same process group.
On a machine without GPUs DeepSpeed picks its CPU accelerator (gloo): fp32 and bf16 work, fp16
does not. Pass a torch optimizer (as ``configure_optimizers`` does) so DeepSpeed does not compile
its own CPU Adam.

What N ranks must share with one process, and how it is kept here:

* Global BatchNorm (``sync_batchnorm``): every BatchNorm layer becomes our ``GlobalBatchNorm``
  (statistics of the global batch, computed in fp32 whatever the engine's dtype); under bf16 the
  running statistics stay fp32 beside the engine's bf16 weights.
* The optimizer steps fp32 master copies flattened (and from stage 1 partitioned) by DeepSpeed:
  ``ZeroMasterWeights`` maps them, so reads and writes of weights outside forward
  (``master_parameters`` / ``write_master_parameters``: EMA, SwAV's prototype normalisation), a
  parameter held out of a step (``skip_update``: SwAV's prototype freeze, bitwise), and LARS's
  per-parameter trust ratio (norms summed over a parameter's pieces across partitions) all act
  on what the optimizer really holds.
* EMA targets (``module.ema_target_modules()``: BYOL's target, MoCo's momentum encoder) are held
  whole in fp32 beside the engine and updated there from the online network's fp32 masters; the
  module keeps a working copy like every other parameter (bf16 under bf16, a shard under ZeRO-3)
  that each update rewrites, and checkpoints carry the fp32 values.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch
from torch import nn

from scale_ssl.collectives.global_batchnorm import convert_to_global_batchnorm
from scale_ssl.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    DirectoryReader,
    register_directory_reader,
    save_checkpoint_file,
    weights_only_loads,
)
from scale_ssl.strategies.ddp import DDPStrategy
from scale_ssl.strategies.zero_masters import ZeroMasterWeights

CHECKPOINT_TAG = "state"
EMA_TARGETS_KEY = "ema_targets_fp32"


class DeepSpeedStrategy(DDPStrategy):
    """Args:
        zero_stage: 0, 1, 2 or 3.
        offload_optimizer / offload_parameters: ZeRO-Offload of optimizer state (stage >= 1) or
            parameters (stage 3) to CPU memory.
        config: a DeepSpeed config (dict or path to JSON) to start from; our trainer settings
            fill what it leaves out and must agree with what it sets.
        micro_batch_size: per-device batch (the CLI passes the one derived from the global batch).
        sync_batchnorm: normalise with global-batch statistics (``GlobalBatchNorm``), as
            ``strategy=ddp`` does; False keeps per-device statistics.
    """

    name = "deepspeed"

    def __init__(self, accelerator: str = "auto", zero_stage: int = 2, offload_optimizer: bool = False,
                 offload_parameters: bool = False, config: dict | str | None = None, micro_batch_size: int | None = None,
                 timeout_s: float = 1800.0, sync_batchnorm: bool = True):
        super().__init__(accelerator=accelerator, timeout_s=timeout_s, sync_batchnorm=sync_batchnorm)
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        if offload_parameters and zero_stage != 3:
            raise ValueError("offload_parameters needs zero_stage=3 (only ZeRO-3 partitions parameters)")
        if offload_optimizer and zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (stage 0 keeps no partitioned optimizer state)")
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        self.offload_parameters = offload_parameters
        self.user_config = _read_config(config)
        self.micro_batch_size = micro_batch_size
        self.engine = None
        self.bf16 = False
        self.masters: ZeroMasterWeights | None = None
        self._ema_params: dict[str, nn.Parameter] = {}
        self._held: dict[int, nn.Parameter] = {}

    # -- set-up ----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        super().setup_environment()  # torchrun/SLURM env -> process group (gloo on CPU)

    def setup_module(self, module: nn.Module) -> nn.Module:
        # The engine wraps model and optimizer together: it is built in connect_optimizers. Every
        # BatchNorm becomes our GlobalBatchNorm (without a collective where statistics stay per
        # rank): it computes its statistics in fp32 whatever the engine's dtype, and it runs the
        # engine's bf16 weights beside running statistics kept in fp32 (below).
        collective = self.collective if self.sync_batchnorm and self.world_size > 1 else None
        module = convert_to_global_batchnorm(module, collective)
        return module.to(self.root_device)

    def connect_optimizers(self, wrapped: nn.Module, optimizers: list):
        import deepspeed

        if len(optimizers) != 1:
            raise ValueError(
                f"strategy=deepspeed trains with exactly one optimizer; configure_optimizers returned {len(optimizers)}"
            )
        config = self.build_config()
        self.bf16 = bool(config.get("bf16", {}).get("enabled"))
        module = getattr(wrapped, "module", wrapped)
        # EMA targets: their fp32 values, whole, taken before the engine casts or partitions them.
        targets = list(module.ema_target_modules()) if hasattr(module, "ema_target_modules") else []
        names = {id(p): n for n, p in module.named_parameters()}
        self._ema_params = {names[id(p)]: p for target in targets for p in target.parameters()}
        ema_fp32 = {n: self.collective.broadcast(p.detach().float().clone(), src=0) for n, p in self._ema_params.items()}
        engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizers[0], config=config,
                                               dist_init_required=False)
        if self.bf16:
            # The engine casts parameters, not buffers. BatchNorm's running statistics stay fp32:
            # they are averages over many steps, and a bf16 average (3 significant digits) is
            # rounded again at every update (GlobalBatchNorm runs bf16 weights beside them). Other
            # floating buffers follow the weights' dtype, as the engine's own kernels expect.
            running = {id(b) for m in wrapped.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for b in (m.running_mean, m.running_var) if b is not None}
            for buffer in wrapped.buffers():
                if buffer.is_floating_point() and id(buffer) not in running:
                    buffer.data = buffer.data.to(torch.bfloat16)
        self.engine = engine
        self._map_masters(ema_fp32)
        return engine, optimizers

    def _map_masters(self, ema_fp32: dict[str, torch.Tensor]) -> None:
        self.masters = ZeroMasterWeights(self.engine, lambda t: self.collective.all_reduce(t, op="sum"))
        self.masters.configure_lars()
        self.masters.keep_fp32([self._ema_params[n] for n in ema_fp32], list(ema_fp32.values()))

    def build_config(self, world_size: int | None = None) -> dict:
        """Our settings (``step_settings``, the micro-batch, the world) as a DeepSpeed config,
        merged with (and checked against) the user's. ``world_size``: the world to plan for
        before the process group exists (the CLI checking a config before launch); after
        set-up the group's."""
        settings = self.step_settings
        precision = str(settings.precision)
        accumulate = settings.accumulate_grad_batches
        clip = settings.gradient_clip_val
        if clip is not None and settings.gradient_clip_algorithm != "norm":
            raise ValueError("strategy=deepspeed clips by global norm only: set trainer.gradient_clip_algorithm=norm")
        if precision == "16-mixed" and not torch.cuda.is_available():
            raise ValueError(
                "trainer.precision='16-mixed' with strategy=deepspeed needs a GPU: DeepSpeed's CPU accelerator has "
                "no fp16; use 'bf16-mixed' or '32'"
            )
        micro = self.micro_batch_size or 1
        if self._collective is not None:
            world = self._collective.world_size
        elif world_size is not None:
            world = world_size
        else:  # before set-up, without a world given: the launcher's
            world = int(os.environ.get("WORLD_SIZE", 1))
        ours: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulate,
            "train_batch_size": micro * accumulate * world,
            "zero_optimization": {"stage": self.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            # Any torch optimizer from configure_optimizers (SGD, LARS, ...), not only DeepSpeed's own.
            "zero_allow_untested_optimizer": True,
        }
        # Always set: DeepSpeed's own default clips every step at global norm 1.0, which no other
        # strategy does (a silent difference from one process; found by the equivalence matrix).
        ours["gradient_clipping"] = float(clip) if clip is not None else 0.0
        if precision == "bf16-mixed":
            ours["bf16"] = {"enabled": True}
        elif precision == "16-mixed":
            ours["fp16"] = {"enabled": True}
        if self.offload_optimizer:
            ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if self.offload_parameters:
            ours["zero_optimization"]["offload_param"] = {"device": "cpu"}
        return _merge_checked(self.user_config, ours)

    # -- training --------------------------------------------------------------------------
    @property
    def autocast_enabled(self) -> bool:
        return False  # the engine holds bf16 weights itself

    def no_backward_sync(self, wrapped: nn.Module, enabled: bool):
        # ZeRO reduces gradients at the accumulation boundary only.
        self.engine.set_gradient_accumulation_boundary(not enabled)
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divided the loss by the accumulation count.
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, optimizer, closure=None):
        if closure is not None:
            raise ValueError("strategy=deepspeed does not run closure-based optimizers (LBFGS)")
        held = self.masters.hold(list(self._held.values())) if self._held else None
        self._held = {}
        self.engine.step()
        if held is not None:
            self.masters.restore(held)

    # -- the optimizer's weights -----------------------------------------------------------
    def master_parameters(self, params):
        return self.masters.full(list(params)) if self.masters is not None else super().master_parameters(params)

    def write_master_parameters(self, params, values) -> None:
        if self.masters is None:
            return super().write_master_parameters(params, values)
        self.masters.write(list(params), list(values))

    def skip_update(self, params) -> None:
        if self.masters is None or self.masters.kind == "module":
            return super().skip_update(params)  # stage 0 fp32: the torch optimizer skips grad=None
        self.masters.check_can_hold()
        self._held.update({id(p): p for p in params})

    def clip_gradients(self, optimizer, value: float, algorithm: str) -> None:
        """Done by the engine (``gradient_clipping`` in its config) on the partitioned gradients."""

    def batch_to_device(self, batch: Any) -> Any:
        batch = super().batch_to_device(batch)
        return _cast_floats(batch, torch.bfloat16) if self.bf16 else batch

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, path: str) -> None:
        """A DeepSpeed checkpoint directory at ``path``; every rank writes its shards."""
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        client["deepspeed"] = {"zero_stage": self.zero_stage, "world_size": self.world_size}
        if self._ema_params:  # the engine saves their bf16 / partitioned working copies only
            values = self.masters.full(list(self._ema_params.values()))
            client[EMA_TARGETS_KEY] = {n: v.detach().cpu().clone() for n, v in zip(self._ema_params, values)}
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG, client_state=client)
        self.barrier()

    def load_checkpoint(self, path: str) -> dict:
        if not os.path.isdir(path):
            raise ValueError(
                f"strategy=deepspeed resumes from a DeepSpeed checkpoint directory; {path!r} is not one "
                "(a plain .ckpt file can be loaded with trainer.strategy=single/ddp)"
            )
        with weights_only_loads(deepspeed_checkpoint_types()):  # as every checkpoint read (checkpoint/files.py)
            _, client = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if client is None:
            raise ValueError(f"{path!r} holds no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r}")
        # Loading may have re-created the flat partitions; the EMA targets come back in fp32.
        saved = client.get(EMA_TARGETS_KEY) or {}
        if set(saved) != set(self._ema_params):
            raise ValueError(
                f"{path!r} holds fp32 EMA targets for {sorted(saved)[:3]}... but this module has {sorted(self._ema_params)[:3]}...; "
                "resume with the method and settings of the run that wrote it"
            )
        self._map_masters({n: saved[n].to(self.root_device) for n in self._ema_params})
        self.masters.write(list(self._ema_params.values()), [saved[n] for n in self._ema_params])
        client["state_dict"] = None  # the engine has loaded the weights (sharded under ZeRO-3)
        client["optimizer_states"] = []
        return client

    def optimizer_state_dicts(self, optimizers: list) -> list:
        """None here: the engine saves its partitioned optimizer state in the checkpoint directory
        (and under ZeRO-3 the torch optimizer's groups hold no parameters between steps, so its
        own ``state_dict()`` cannot even be taken)."""
        return []

    def load_optimizer_states(self, optimizers: list, states: list) -> None:
        """The engine restored the (partitioned) optimizer state in ``load_checkpoint``."""

    def full_state_dict(self, module: nn.Module) -> dict:
        """The module's complete fp32-or-bf16 state dict on every rank (gathers ZeRO-3 shards)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def read_deepspeed_checkpoint(checkpoint_dir: str) -> dict:
    """A scale_ssl DeepSpeed checkpoint directory as one plain checkpoint dict, in memory.

    The weights come from DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (it merges
    the ZeRO partitions, so the result is fp32 whatever the stage or precision); our client state
    (hyper-parameters, step, config, MLflow run id) from the engine's model-states file. Optimizer
    and scheduler states are left out: they are sharded per rank and only the engine reads them.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, CHECKPOINT_TAG)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{checkpoint_dir!r} is not a scale_ssl DeepSpeed checkpoint (no {CHECKPOINT_TAG}/ inside)")
    model_states = sorted(f for f in os.listdir(tag_dir) if f.endswith("model_states.pt"))
    if not model_states:
        raise ValueError(f"DeepSpeed checkpoint {checkpoint_dir!r} has no *model_states.pt in {CHECKPOINT_TAG}/: it is incomplete")
    # Every file, DeepSpeed's shards included, is read with weights_only=True (checkpoint/files.py).
    try:
        with weights_only_loads(deepspeed_checkpoint_types()):
            weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
            client = torch.load(os.path.join(tag_dir, model_states[0]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"DeepSpeed checkpoint {checkpoint_dir!r} holds objects other than tensors, plain data and DeepSpeed's "
            f"own data classes; it is refused rather than unpickled ({str(err).strip().splitlines()[0][:200]})"
        ) from None
    # The engine wrapped the trainer's step adapter, whose child is the module.
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    ours = {k: v for k, v in client.items() if k in _CLIENT_KEYS}
    # EMA targets: the fp32 values we keep, not the engine's bf16 working copies.
    state_dict.update(client.get(EMA_TARGETS_KEY) or {})
    ours.update({"format_version": CHECKPOINT_FORMAT_VERSION, "state_dict": state_dict, "optimizer_states": [],
                 "lr_scheduler_states": []})
    return ours


def _read_registered(checkpoint_dir: str) -> dict:
    """The reader registered with ``scale_ssl.checkpoint``: DeepSpeed itself is needed to merge
    the ZeRO shards, so its absence is said here, with the way out."""
    try:
        import deepspeed  # noqa: F401  (the shards are merged with DeepSpeed's own reader)
    except ImportError as err:
        raise ValueError(
            f"checkpoint {checkpoint_dir!r} is a DeepSpeed checkpoint directory and DeepSpeed is not installed here; "
            "install it (pip install deepspeed) or consolidate the checkpoint where it is "
            "(scale_ssl.strategies.deepspeed.consolidate_checkpoint)"
        ) from err
    return read_deepspeed_checkpoint(checkpoint_dir)


register_directory_reader(DirectoryReader(
    name="deepspeed",
    recognises=lambda path: os.path.isdir(os.path.join(path, CHECKPOINT_TAG)),
    read=_read_registered,
    describe=f"DeepSpeed (a {CHECKPOINT_TAG}/ directory of ZeRO shards inside)",
))


def consolidate_checkpoint(checkpoint_dir: str, out_path: str) -> str:
    """DeepSpeed checkpoint directory -> one plain scale_ssl ``.ckpt`` (fp32 weights, our state)
    that loads with ``<Method>.load_from_checkpoint`` and ``scale-ssl eval``/``export``, without
    DeepSpeed installed (see :func:`read_deepspeed_checkpoint`)."""
    save_checkpoint_file(read_deepspeed_checkpoint(checkpoint_dir), out_path)
    return out_path


def deepspeed_checkpoint_types() -> tuple:
    """The classes DeepSpeed pickles into a checkpoint's shards besides tensors and plain types
    (found by loading stage 0-3, fp32 and bf16 checkpoints with ``weights_only=True``): plain data,
    rebuilt from their fields, with no code of the file's choosing run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, ZeroStageEnum, fragment_address)


_CLIENT_KEYS = ("module_class", "hyper_parameters", "global_step", "epoch", "batch_in_epoch", "world_size",
                "mlflow_run_id", "mlflow_tracking_uri", "config", "callbacks")


def _read_config(config: dict | str | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    if not os.path.isfile(config):
        raise FileNotFoundError(f"trainer.deepspeed_config {config!r} does not exist; pass a DeepSpeed JSON config path")
    with open(config) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"trainer.deepspeed_config {config!r} is not valid JSON: {err}") from None


def _merge_checked(user: dict, ours: dict, prefix: str = "") -> dict:
    """User values win where they agree with ours; a disagreement is an error naming both."""
    merged = dict(user)
    for key, value in ours.items():
        if key not in user:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            merged[key] = _merge_checked(user[key], value, f"{prefix}{key}.")
        elif user[key] != value and key not in ("steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer"):
            raise ValueError(
                f"DeepSpeed config sets {prefix}{key}={user[key]!r} but the trainer settings give {value!r}; "
                "change one of them (scale_ssl derives batch sizes, accumulation, clipping and precision from its own config)"
            )
    return merged


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        cast = [_cast_floats(b, dtype) for b in batch]
        return tuple(cast) if isinstance(batch, tuple) else cast
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    return batch
