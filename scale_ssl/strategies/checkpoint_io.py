"""Checkpoint files: atomic writes and safe reads.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the target, so a crash mid-write leaves the previous checkpoint intact and never a truncated
file under the final name. It is read with ``torch.load(weights_only=True)``: our checkpoints hold
only tensors and plain Python types, so loading one never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile

import torch

CHECKPOINT_FORMAT_VERSION = 1


def save_checkpoint_file(checkpoint: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def load_checkpoint_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass an existing .ckpt file or ckpt_path='last'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt/untrusted files
        raise ValueError(
            f"checkpoint {path!r} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it is truncated, corrupt, or not a scale_ssl checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path!r} is not a scale_ssl checkpoint (no 'state_dict' entry)")
    return checkpoint
