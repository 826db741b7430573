"""Read any checkpoint scale_ssl writes, whichever strategy wrote it.

Single/DDP/DP/XLA runs write one ``.ckpt`` file (read with ``weights_only=True``); DeepSpeed runs
write a *directory* of ZeRO shards, FSDP runs a directory of ``torch.distributed.checkpoint``
shards; either is merged into the same plain dict in memory. Every
reader of finished checkpoints (``load_from_checkpoint``, ``scale-ssl eval``, ``scale-ssl export``)
goes through :func:`read_checkpoint`, so a user never has to consolidate a ZeRO checkpoint first.
Resuming a DeepSpeed run is different: the engine reads its own shards (``DeepSpeedStrategy``).
"""

from __future__ import annotations

import os

from scale_ssl.strategies.checkpoint_io import load_checkpoint_file
from scale_ssl.strategies.fsdp_checkpoint import is_fsdp_checkpoint, read_fsdp_checkpoint


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` as a dict with ``state_dict``, ``hyper_parameters``, ... ."""
    path = os.fspath(path)
    if os.path.isdir(path) and is_fsdp_checkpoint(path):  # strategy=fsdp: torch.distributed.checkpoint shards
        return read_fsdp_checkpoint(path)
    if os.path.isdir(path):
        from scale_ssl.strategies.deepspeed import CHECKPOINT_TAG, read_deepspeed_checkpoint

        if not os.path.isdir(os.path.join(path, CHECKPOINT_TAG)):
            raise ValueError(
                f"checkpoint {path!r} is a directory but not a DeepSpeed checkpoint written by scale_ssl "
                f"(no {CHECKPOINT_TAG}/ inside) nor an FSDP one (no fsdp_meta.ckpt inside); pass a .ckpt file or a "
                f"DeepSpeed/FSDP checkpoint directory"
            )
        try:
            import deepspeed  # noqa: F401  (the shards are merged with DeepSpeed's own reader)
        except ImportError as err:
            raise ValueError(
                f"checkpoint {path!r} is a DeepSpeed checkpoint directory and DeepSpeed is not installed here; "
                "install it (pip install deepspeed) or consolidate the checkpoint where it is "
                "(scale_ssl.strategies.deepspeed.consolidate_checkpoint)"
            ) from err
        return read_deepspeed_checkpoint(path)
    return load_checkpoint_file(path)
