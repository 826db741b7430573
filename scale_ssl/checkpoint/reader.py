"""Read any checkpoint scale_ssl writes, whichever strategy wrote it.

Single/DDP/DP/XLA runs write one ``.ckpt`` file (read with ``weights_only=True``, verified by its
checksum: ``files.py``). An engine that writes a *directory* of shards (DeepSpeed's ZeRO
checkpoints) registers a :class:`DirectoryReader` here when its strategy module is imported
(``scale_ssl.strategies`` imports every backend, and ``import scale_ssl`` imports the trainer and
so the strategies); the reader merges the shards into the same plain dict in memory. Every reader
of finished checkpoints (``load_from_checkpoint``, ``scale-ssl eval``, ``scale-ssl export``) goes
through :func:`read_checkpoint`, so a user never consolidates a ZeRO checkpoint first, and this
package never imports an engine: the arrow points from the backend to the format, not back.
Resuming a DeepSpeed run is different: the engine reads its own shards (``DeepSpeedStrategy``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from scale_ssl.checkpoint.files import load_checkpoint_file


@dataclass(frozen=True)
class DirectoryReader:
    """How to recognise and read one engine's checkpoint directory.

    ``recognises(path)`` must be cheap and must not import the engine (it only looks at the
    directory's layout); ``read(path)`` returns the plain checkpoint dict (``state_dict``,
    ``hyper_parameters``, ``global_step``, ...)."""

    name: str
    recognises: Callable[[str], bool]
    read: Callable[[str], dict]
    describe: str = ""


_DIRECTORY_READERS: dict[str, DirectoryReader] = {}


def register_directory_reader(reader: DirectoryReader) -> None:
    """Called by a backend at import time; registering the same name again replaces it."""
    _DIRECTORY_READERS[reader.name] = reader


def directory_readers() -> tuple[DirectoryReader, ...]:
    return tuple(_DIRECTORY_READERS.values())


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` as a dict with ``state_dict``, ``hyper_parameters``, ... ."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for reader in _DIRECTORY_READERS.values():
            if reader.recognises(path):
                return reader.read(path)
        known = "; ".join(r.describe or r.name for r in _DIRECTORY_READERS.values()) or (
            "none registered: import scale_ssl.strategies, whose DeepSpeed backend registers its reader")
        raise ValueError(
            f"checkpoint {path!r} is a directory but not a DeepSpeed checkpoint (or other checkpoint directory) "
            f"written by scale_ssl (known layouts: {known}); pass a .ckpt file or a DeepSpeed or FSDP checkpoint directory"
        )
    return load_checkpoint_file(path)
