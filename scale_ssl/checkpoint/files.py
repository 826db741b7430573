"""Checkpoint files: atomic writes, a content checksum, safe reads.

Writing: the checkpoint goes to a temporary file in the same directory, is flushed and fsynced,
and only then renamed over the target (``os.replace`` is atomic on POSIX), so a crash or a
``kill -9`` mid-write never leaves a truncated file under the final name. The checkpoint it
replaces is kept beside it as ``<name>.prev`` (a hard link taken before the rename), so one good
checkpoint survives even a file that was later damaged on disk.

Integrity: every checkpoint carries ``format_version`` and ``content_sha256``, a SHA-256 over
its keys, plain values and tensor bytes (:func:`content_digest`). Reading recomputes it; a
truncated, bit-flipped or half-copied file fails with :class:`CorruptCheckpointError` naming the
file, and the trainer's ``ckpt_path="last"`` falls back to the previous good one.

Trust: files are read with ``torch.load(weights_only=True)``. Our checkpoints hold only tensors
and plain Python types, so loading one never unpickles arbitrary objects; a file that needs
arbitrary unpickling is refused rather than executed (docs/RELIABILITY.md, "Trust model").
DeepSpeed checkpoint directories are read the same way: :func:`weights_only_loads` forces
``weights_only=True`` on DeepSpeed's own shard readers too, allowing only the few plain data
classes DeepSpeed pickles into its shards (``strategies/deepspeed.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile

import torch

CHECKPOINT_FORMAT_VERSION = 1
PREVIOUS_SUFFIX = ".prev"
_TEMP_PREFIX = ".tmp-"


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be trusted: truncated, corrupt, wrong checksum, or not ours."""


def content_digest(obj) -> str:
    """SHA-256 over a checkpoint's structure: keys in order, plain values by ``repr``, tensors by
    dtype, shape and raw bytes. Stable across ``torch.save``/``torch.load``."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"V{type(obj).__name__}:{obj!r};".encode())


def save_checkpoint_file(checkpoint: dict, path: str) -> None:
    """Write ``checkpoint`` to ``path`` atomically, stamped with format version and checksum;
    the file it replaces becomes ``path + '.prev'``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stamped = {key: value for key, value in checkpoint.items() if key != "content_sha256"}
    stamped.setdefault("format_version", CHECKPOINT_FORMAT_VERSION)
    stamped["content_sha256"] = content_digest(stamped)
    fd, tmp_path = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(stamped, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.isfile(path):
            _keep_previous(path)
        os.replace(tmp_path, path)
        _fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def _keep_previous(path: str) -> None:
    """``path`` -> ``path.prev`` without a moment where ``path`` is missing: hard-link it under a
    temporary name, then rename that over the old ``.prev``."""
    directory = os.path.dirname(os.path.abspath(path))
    link = os.path.join(directory, f"{_TEMP_PREFIX}prev-{os.getpid()}-{os.path.basename(path)}")
    try:
        if os.path.lexists(link):
            os.unlink(link)
        os.link(path, link)
    except OSError:  # a filesystem without hard links: the previous file is simply not kept
        return
    os.replace(link, path + PREVIOUS_SUFFIX)


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: str) -> dict:
    """Read and verify a checkpoint; :class:`CorruptCheckpointError` if it cannot be trusted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass an existing .ckpt file or ckpt_path='last'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt/untrusted files
        raise CorruptCheckpointError(
            f"checkpoint {path!r} could not be read ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}); "
            "it is truncated, corrupt, or not a scale_ssl checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CorruptCheckpointError(f"checkpoint {path!r} is not a scale_ssl checkpoint (no 'state_dict' entry)")
    version = checkpoint.get("format_version")
    if isinstance(version, int) and version > CHECKPOINT_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"checkpoint {path!r} has format_version {version}; this scale_ssl reads up to "
            f"{CHECKPOINT_FORMAT_VERSION}: upgrade scale_ssl to load it"
        )
    expected = checkpoint.pop("content_sha256", None)
    if expected is not None and content_digest(checkpoint) != expected:
        raise CorruptCheckpointError(
            f"checkpoint {path!r} failed its content checksum (stored sha256 {expected[:12]}..., the "
            "contents hash differently): the file was damaged after it was written"
        )
    return checkpoint


@contextlib.contextmanager
def weights_only_loads(allowed_types: tuple = ()):
    """Inside, every ``torch.load`` runs with ``weights_only=True``, also in libraries that pass
    ``weights_only=False`` themselves (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, set only for the
    duration), with ``allowed_types`` rebuilt from their data besides tensors and plain types.
    Anything else in a file is refused (``pickle.UnpicklingError``), never executed."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed_types)):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def checkpoint_candidates(path: str) -> list[str]:
    """Where a checkpoint named ``path`` may be found, newest first: the file, then the one it replaced."""
    return [path, path + PREVIOUS_SUFFIX]
