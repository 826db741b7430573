"""DataParallel: one process, the batch split over devices, ``training_step_end`` sees every part.

This is the mode Lightning 2 removed (#16748) and our users still ask for: a softmax/NCE loss
computed in ``training_step_end`` has the *whole* batch in its denominator, although each device
only ran ``training_step`` on its part. The contract, as in Lightning 1.x / ``nn.DataParallel``:

* the batch is split along dim 0 into ``devices`` parts (nested tuples/lists/dicts follow);
* ``training_step(part, batch_idx)`` runs once per part;
* the outputs are gathered with the same structure, tensors **concatenated along dim 0**, and
  0-dim tensors (a per-part loss) stacked into a vector of length ``devices``;
* ``training_step_end(gathered)`` then computes the loss. A module without ``training_step_end``
  gets the mean of the per-part losses, with one warning (that loss is *not* the full-batch loss
  of an NCE objective).

On GPUs the parts run on replicas (``torch.nn.parallel.replicate/scatter`` and one thread per
device). Without GPUs the same split/apply/gather runs on CPU "devices" (threads over the one
module), so the semantics are testable anywhere.

BatchNorm: with ``sync_batchnorm=True`` every BatchNorm layer becomes a ``GlobalBatchNorm`` over
the parts (``PartsCollective``): each part is normalised with the statistics of the whole batch,
so a dp step equals one device on the whole batch, BatchNorm included. Without it statistics are
per part, as with ``nn.DataParallel``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from scale_ssl.collectives import Collective, LocalCollective, convert_to_global_batchnorm
from scale_ssl.collectives.parts import PartsCollective
from scale_ssl.strategies.base import Strategy


def split_batch(batch: Any, parts: int) -> list:
    """Split every tensor of a (nested) batch along dim 0 into ``parts`` equal-as-possible parts."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] < parts:
            raise ValueError(
                f"strategy=dp with devices={parts}: a batch tensor of shape {tuple(batch.shape)} cannot be split "
                f"into {parts} parts; use a per-step batch of at least {parts} samples"
            )
        return list(torch.tensor_split(batch, parts, dim=0))
    if isinstance(batch, (list, tuple)):
        columns = [split_batch(item, parts) for item in batch]
        rows = [[column[i] for column in columns] for i in range(parts)]
        return [type(batch)(row) if isinstance(batch, tuple) else row for row in rows]
    if isinstance(batch, dict):
        columns = {key: split_batch(value, parts) for key, value in batch.items()}
        return [{key: columns[key][i] for key in batch} for i in range(parts)]
    return [batch] * parts  # ints, strings: every part gets the same value


def gather_outputs(outputs: list, where: str = "training_step") -> Any:
    """Inverse of ``split_batch`` for step outputs: concatenate tensors along dim 0, stack scalars."""
    first = outputs[0]
    if first is None:
        if any(o is not None for o in outputs):
            raise ValueError(f"{where} returned None on some dp parts but not others")
        return None
    if isinstance(first, torch.Tensor):
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError(f"{where} returned a tensor on some dp parts and something else on others")
        if first.dim() == 0:
            return torch.stack(list(outputs))
        return torch.cat(list(outputs), dim=0)
    if isinstance(first, dict):
        return {key: gather_outputs([o[key] for o in outputs], f"{where}[{key!r}]") for key in first}
    if isinstance(first, (list, tuple)):
        gathered = [gather_outputs([o[i] for o in outputs], f"{where}[{i}]") for i in range(len(first))]
        return type(first)(gathered) if isinstance(first, tuple) else gathered
    raise TypeError(
        f"{where} returned {type(first).__name__} from a dp part; return tensors (or dicts/tuples of tensors) "
        "so the parts can be gathered, e.g. {'loss': loss_tensor}"
    )


def _check_part_output(output: Any) -> None:
    if isinstance(output, dict) and "loss" in output and not isinstance(output["loss"], torch.Tensor):
        raise TypeError(
            f"training_step returned a non-tensor loss ({type(output['loss']).__name__}) from a dp part; "
            "return the loss tensor itself (not .item()) so gradients can flow back through every part"
        )
    if isinstance(output, (int, float)):
        raise TypeError(
            f"training_step returned a Python {type(output).__name__} from a dp part; return the loss tensor "
            "(not .item()) so gradients can flow back through every part"
        )


class _DataParallelSteps(nn.Module):
    """Wraps the trainer's step adapter: split -> run ``training_step`` on each part -> gather."""

    def __init__(self, adapter: nn.Module, strategy: "DPStrategy"):
        super().__init__()
        self.adapter = adapter
        self.strategy = strategy

    def forward(self, batch, *rest):
        module = self.adapter.module
        return self.strategy._run_parts(self.adapter, batch, rest, "training_step", averaging_for=module)


class DPStrategy(Strategy):
    """Args:
        devices: number of parts (GPUs when CUDA is available, else CPU threads).
        sync_batchnorm: normalise every part with the whole batch's BatchNorm statistics
            (``GlobalBatchNorm`` over the parts); False keeps ``nn.DataParallel``'s per-part ones.
    """

    name = "dp"

    def __init__(self, accelerator: str = "auto", devices: int = 2, sync_batchnorm: bool = True):
        super().__init__(accelerator)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise ValueError(f"trainer.devices must be an int >= 1 for strategy=dp, got {devices!r}")
        self.devices = devices
        self.sync_batchnorm = sync_batchnorm
        self._collective = LocalCollective()
        self._parts = PartsCollective(devices)
        self._warned_no_step_end = False
        self._pool: ThreadPoolExecutor | None = None

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda" and torch.cuda.device_count() < self.devices:
            raise ValueError(
                f"trainer.devices={self.devices} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        self.device_ids = list(range(self.devices)) if self.root_device.type == "cuda" else None
        # Threads run the CPU parts; on GPUs they run the evaluation parts.
        self._pool = ThreadPoolExecutor(max_workers=self.devices, thread_name_prefix="dp-part")

    @property
    def collective(self) -> Collective:
        # One process: a loss in training_step_end already sees the gathered, global batch.
        return self._collective

    @property
    def root_device(self) -> torch.device:
        if self.accelerator == "cuda" or (self.accelerator == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.sync_batchnorm and self.devices > 1:
            module = convert_to_global_batchnorm(module, self._parts)
        return _DataParallelSteps(module.to(self.root_device), self)

    def eval_step(self, module, step_name: str, args: tuple):
        return self._run_parts(getattr(module, step_name), args[0], args[1:], step_name, averaging_for=None)

    def _run_parts(self, fn, batch, rest: tuple, where: str, averaging_for):
        parts = split_batch(batch, self.devices)
        if self.device_ids is not None and isinstance(fn, nn.Module):
            outputs = self._run_on_gpus(fn, parts, rest)
        else:
            outputs = self._run_on_threads(fn, parts, rest)
        for output in outputs:
            _check_part_output(output)
        gathered = gather_outputs(outputs, where)
        if averaging_for is not None and getattr(type(averaging_for).training_step_end, "is_default_hook", False):
            gathered = self._average_part_losses(gathered)
        return gathered

    def _run_on_threads(self, fn, parts: list, rest: tuple) -> list:
        return self._run_parts_in_threads([fn] * len(parts), parts, rest, devices=None)

    def _run_on_gpus(self, adapter: nn.Module, parts: list, rest: tuple) -> list:
        """One replica per GPU (``replicate`` keeps the gradient path to the root parameters)."""
        from torch.nn.parallel import replicate
        from torch.nn.parallel.scatter_gather import scatter

        inputs = [scatter(part, [device])[0] for part, device in zip(parts, self.device_ids)]
        replicas = replicate(adapter, self.device_ids)
        outputs = self._run_parts_in_threads(replicas, inputs, rest, devices=self.device_ids)
        return [_to_device(o, self.root_device) for o in outputs]

    def _run_parts_in_threads(self, fns: list, parts: list, rest: tuple, devices: list | None) -> list:
        # Grad mode and autocast are per thread: carry the caller's into every part. Each part
        # tells the parts collective which one it is, so GlobalBatchNorm can meet its peers.
        device_type = self.root_device.type
        grad = torch.is_grad_enabled()
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
        errors: list[BaseException] = []
        collective = self._parts
        collective.reset()

        def one(index: int):
            collective.enter_part(index)
            try:
                device = torch.cuda.device(devices[index]) if devices is not None else contextlib.nullcontext()
                with device, torch.set_grad_enabled(grad), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                    return fns[index](parts[index], *rest)
            except BaseException as err:  # re-raised in the caller
                errors.append(err)
                collective.abort()  # peers waiting in a GlobalBatchNorm gather raise instead of hanging
                return None
            finally:
                collective.leave_part()

        outputs = list(self._pool.map(one, range(len(parts))))
        if errors:
            # The part that failed first, not a peer released from the barrier by its abort.
            real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
            raise (real or errors)[0]
        return outputs

    def _average_part_losses(self, gathered):
        if not self._warned_no_step_end:
            warnings.warn(
                "strategy=dp: the module has no training_step_end, so the loss is the mean of the per-part losses; "
                "a contrastive loss computed in training_step then only sees each part's samples. Compute it in "
                "training_step_end from the gathered outputs to use the full batch.",
                stacklevel=3,
            )
            self._warned_no_step_end = True
        if isinstance(gathered, torch.Tensor):
            return gathered.mean() if gathered.dim() == 1 else gathered
        if isinstance(gathered, dict) and isinstance(gathered.get("loss"), torch.Tensor) and gathered["loss"].dim() == 1:
            return {**gathered, "loss": gathered["loss"].mean()}
        return gathered

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _to_device(output, device):
    if isinstance(output, torch.Tensor):
        return output.to(device)
    if isinstance(output, dict):
        return {k: _to_device(v, device) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        moved = [_to_device(v, device) for v in output]
        return type(output)(moved) if isinstance(output, tuple) else moved
    return output
