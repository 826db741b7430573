"""The checkpoint format, at the ground floor: files, atomic writes, checksums, the reader.

Everything above may import this package (strategies write and read through it, the module API,
eval and export read finished checkpoints with it); it imports nothing of scale_ssl's above it,
no strategy and no engine (``docs/parts.toml``). Engines with their own on-disk layout register
a reader (:func:`register_directory_reader`).
"""

from scale_ssl.checkpoint.files import (
    CHECKPOINT_FORMAT_VERSION,
    PREVIOUS_SUFFIX,
    CorruptCheckpointError,
    checkpoint_candidates,
    content_digest,
    load_checkpoint_file,
    save_checkpoint_file,
    weights_only_loads,
)
from scale_ssl.checkpoint.reader import DirectoryReader, directory_readers, read_checkpoint, register_directory_reader

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "PREVIOUS_SUFFIX",
    "CorruptCheckpointError",
    "DirectoryReader",
    "checkpoint_candidates",
    "content_digest",
    "directory_readers",
    "load_checkpoint_file",
    "read_checkpoint",
    "register_directory_reader",
    "save_checkpoint_file",
    "weights_only_loads",
]
