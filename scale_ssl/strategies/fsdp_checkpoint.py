"""Sharded checkpoints of ``strategy=fsdp`` through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a *directory* (named like a file checkpoint, e.g. ``last.ckpt/``)::

    fsdp_meta.ckpt     our plain checkpoint file (checksummed, read with weights_only=True):
                       step, epoch, data position, RNG states, schedulers, queues, callbacks,
                       MLflow run id, config, and the optimizers' param groups
    shards/            DCP's files: every rank writes its own shards of the parameters (fp32,
                       EMA targets included), of the buffers (once) and of the per-parameter
                       optimizer state (momentum buffers, Adam moments: sharded like their
                       parameters)

Resuming on the same world size reads each rank's shards back bitwise. On another world size
DCP re-shards on load (each rank reads the pieces of the saved shards that make up its new
shard), so a run saved on 2 ranks resumes on 1, 3 or 4. Optimizer state is keyed by the
parameter's index in the optimizer (the order of ``configure_optimizers``, the same on every
world size). :func:`read_fsdp_checkpoint` rebuilds full tensors without a process group, so
``load_from_checkpoint``, ``scale-ssl eval`` and ``scale-ssl export`` read these directories, and
:func:`consolidate_fsdp_checkpoint` writes one plain ``.ckpt``.

Writing is atomic at the directory level: everything goes to ``<path>.tmp-fsdp/``; once every
rank has finished, rank zero moves the previous checkpoint to ``<path>.prev`` and renames the
new one into place.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
from torch import nn

from scale_ssl.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    DirectoryReader,
    load_checkpoint_file,
    register_directory_reader,
    save_checkpoint_file,
)

META_FILE = "fsdp_meta.ckpt"
SHARDS_DIR = "shards"
FSDP_KEY = "fsdp"


def is_fsdp_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def _flat_params(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_sharded_checkpoint(checkpoint: dict, path: str, optimizers: list, is_zero: bool,
                            barrier: Callable[[], None]) -> None:
    """Every rank calls this with the trainer's checkpoint dict, whose ``state_dict`` holds the
    module's sharded DTensors (and replicated buffers)."""
    import torch.distributed.checkpoint as dcp

    tensors: dict = {"model": dict(checkpoint["state_dict"]), "optim": {}}
    groups, scalars = [], []
    for i, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        tensors["optim"][str(i)] = {str(index): {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
                                    for index, entry in state["state"].items()}
        scalars.append({str(index): {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
                        for index, entry in state["state"].items()})
        groups.append(state["param_groups"])
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    meta.update(state_dict={}, optimizer_states=[],
                **{FSDP_KEY: {"world_size": checkpoint.get("world_size"), "param_groups": groups, "scalar_state": scalars}})
    staging = path.rstrip("/") + ".tmp-fsdp"
    if is_zero:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    barrier()
    dcp.save(tensors, checkpoint_id=os.path.join(staging, SHARDS_DIR))
    if is_zero:
        save_checkpoint_file(meta, os.path.join(staging, META_FILE))
    barrier()
    if is_zero:
        if os.path.isdir(path):
            previous = path.rstrip("/") + ".prev"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        elif os.path.exists(path):
            os.unlink(path)
        os.replace(staging, path)
    barrier()


def load_sharded_checkpoint(path: str, module: nn.Module, optimizers: list) -> dict:
    """Load ``path`` into the sharded ``module`` and ``optimizers`` (every rank, any world size);
    returns the rest of the checkpoint with ``state_dict=None`` (already loaded)."""
    import torch.distributed.checkpoint as dcp

    if not is_fsdp_checkpoint(path):
        raise ValueError(
            f"strategy=fsdp resumes from an FSDP checkpoint directory (with {META_FILE} inside); {path!r} is not one. "
            "A plain .ckpt file resumes with trainer.strategy=single/ddp; to start FSDP from its weights, load them "
            "into the module before fit (Method.load_from_checkpoint)"
        )
    meta = load_checkpoint_file(os.path.join(path, META_FILE))
    saved = _saved_keys(path)
    model = module.state_dict()
    expected = {f"model.{k}" for k in model}
    have = {k for k in saved if k.startswith("model.")}
    if expected != have:
        missing, extra = sorted(expected - have), sorted(have - expected)
        raise ValueError(
            f"FSDP checkpoint {path!r} does not match this module: missing {missing[:4]}, unexpected {extra[:4]}; "
            "resume with the method and settings of the run that wrote it"
        )
    groups = meta[FSDP_KEY]["param_groups"]
    if len(groups) != len(optimizers):
        raise ValueError(f"FSDP checkpoint {path!r} has {len(groups)} optimizers but configure_optimizers returned "
                         f"{len(optimizers)}; resume with the same optimizer configuration")
    tensors: dict = {"model": model, "optim": {}}
    for key, md in saved.items():
        if not key.startswith("optim."):
            continue
        _, i, index, name = key.split(".", 3)
        params = _flat_params(optimizers[int(i)])
        param = params[int(index)]
        if tuple(md.size) == tuple(param.shape) and hasattr(param, "placements"):
            value = torch.empty_like(param, dtype=md.properties.dtype)  # sharded like the parameter
        else:
            value = torch.empty(tuple(md.size), dtype=md.properties.dtype, device=_local_device(param))
        tensors["optim"].setdefault(i, {}).setdefault(index, {})[name] = value
    dcp.load(tensors, checkpoint_id=os.path.join(path, SHARDS_DIR))
    module.load_state_dict(model)
    for i, optimizer in enumerate(optimizers):
        state = {int(index): dict(entry) for index, entry in tensors["optim"].get(str(i), {}).items()}
        for index, entry in meta[FSDP_KEY]["scalar_state"][i].items():
            state.setdefault(int(index), {}).update(entry)
        optimizer.load_state_dict({"state": state, "param_groups": groups[i]})
    meta["state_dict"] = None  # loaded into the shards above
    meta["optimizer_states"] = []
    return meta


def _local_device(param: torch.Tensor) -> torch.device:
    return param.to_local().device if hasattr(param, "to_local") else param.device


def _saved_keys(path: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(os.path.join(path, SHARDS_DIR)).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_fsdp_checkpoint(path: str | os.PathLike) -> dict:
    """An FSDP checkpoint directory as one plain checkpoint dict with full fp32 tensors, in
    memory, in one process (no process group). Optimizer states are left out (they stay sharded
    in the directory; resuming reads them there)."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    meta = load_checkpoint_file(os.path.join(path, META_FILE))
    saved = _saved_keys(path)
    model = {k[len("model."):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for k, md in saved.items() if k.startswith("model.")}
    dcp.load({"model": model}, checkpoint_id=os.path.join(path, SHARDS_DIR), no_dist=True)
    meta.pop(FSDP_KEY, None)
    meta.update(format_version=CHECKPOINT_FORMAT_VERSION, state_dict=model, optimizer_states=[], lr_scheduler_states=[])
    return meta


def consolidate_fsdp_checkpoint(checkpoint_dir: str, out_path: str) -> str:
    """FSDP checkpoint directory -> one plain scale_ssl ``.ckpt`` (full fp32 weights, our state)."""
    save_checkpoint_file(read_fsdp_checkpoint(checkpoint_dir), out_path)
    return out_path


# Finished FSDP checkpoints are read by `load_from_checkpoint`, `scale-ssl eval` and `export`
# through the ground-floor reader, which knows this layout only by this registration.
register_directory_reader(DirectoryReader(
    name="fsdp",
    recognises=is_fsdp_checkpoint,
    read=read_fsdp_checkpoint,
    describe=f"FSDP (a {META_FILE} and a {SHARDS_DIR}/ directory of torch.distributed.checkpoint shards inside)",
))
