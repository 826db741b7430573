"""Write labelled images as webdataset tar shards with a ``shards.json`` index.

Each sample becomes three tar members, ``<key>.<image_format>`` (the encoded image),
``<key>.cls`` (the integer label as text) and the key itself in the member names, written by
webdataset's ``TarWriter`` so any webdataset reader can stream the result.

The directory appears atomically: everything is written into a hidden sibling directory that is
renamed to ``out_dir`` only once every shard and the index are complete. A crash or Ctrl-C leaves
at most a ``.<name>.incomplete-*`` directory behind, never an ``out_dir`` that looks finished but
holds a truncated shard.
"""

from __future__ import annotations

import numbers
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import PIL.Image
import webdataset as wds

from scale_ssl.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_fashion_mnist
from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex, ShardInfo

# Formats webdataset's TarWriter can encode from a PIL image (encoded bytes pass through as-is).
SUPPORTED_IMAGE_FORMATS = ("png", "jpg", "jpeg", "ppm", "pgm", "tiff")

ImageLike = Union[PIL.Image.Image, bytes]


def write_image_shards(
    samples: Iterable[tuple[str, ImageLike, int]],
    out_dir: str | os.PathLike,
    shard_size: int,
    classes: Sequence[str],
    image_format: str = "png",
    overwrite: bool = False,
    prefix: str = "shard",
    source: str = "",
) -> ShardIndex:
    """Write ``(key, image, label)`` samples into ``out_dir/<prefix>-000000.tar``, ... and index them.

    ``image`` is a PIL image (encoded here as ``image_format``; ``png`` is lossless) or bytes
    already encoded in that format. ``key`` names the sample in every tar and must be unique and
    free of dots (webdataset splits a member name into key and extension at the first dot).
    Every shard holds ``shard_size`` samples except possibly the last. Returns the written index,
    whose ``directory`` is ``out_dir``.
    """
    out_dir = Path(out_dir)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if isinstance(classes, str) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a non-empty sequence of class names, got {classes!r}")
    if image_format not in SUPPORTED_IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {SUPPORTED_IMAGE_FORMATS}, got {image_format!r}"
        )
    if not prefix or "." in prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty file name stem without '.' or '/', got {prefix!r}")
    _check_replaceable(out_dir, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: that makes the directory private (0700) and it becomes out_dir.
    staging = out_dir.parent / f".{out_dir.name}.incomplete-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        shards = _write_tars(samples, staging, shard_size, len(classes), image_format, prefix)
        index = ShardIndex(
            shards=shards,
            classes=list(classes),
            image_key=image_format,
            source=source or f"write_image_shards({image_format}, shard_size={shard_size})",
        )
        index.save(staging)
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    index.directory = out_dir
    return index


def make_fashion_mnist_shards(
    out_dir: str | os.PathLike,
    shard_size: int = 5000,
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    overwrite: bool = False,
    limit: int | None = None,
) -> dict[str, ShardIndex]:
    """Write Fashion-MNIST as lossless PNG shards into ``out_dir/train`` and ``out_dir/test``.

    ``limit`` keeps only the first ``limit`` images of each split (for quick runs and tests).
    Prints nothing; returns ``{"train": index, "test": index}`` for the caller to report.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all images) or a positive integer, got {limit!r}")
    out_dir = Path(out_dir)
    splits = ("train", "test")
    # Both checked before either is written, so a refusal never leaves a half-made pair.
    for split in splits:
        _check_replaceable(out_dir / split, overwrite)
    indexes = {}
    for split in splits:
        images, labels = load_fashion_mnist(split, root)
        count = len(images) if limit is None else min(limit, len(images))
        indexes[split] = write_image_shards(
            _fashion_mnist_samples(split, images[:count], labels[:count]),
            out_dir / split,
            shard_size=shard_size,
            classes=FASHION_MNIST_CLASSES,
            image_format="png",
            overwrite=overwrite,
            source=f"Fashion-MNIST {split} split, images 0..{count - 1} of {len(images)}, from {root}",
        )
    return indexes


def _fashion_mnist_samples(split, images, labels) -> Iterator[tuple[str, PIL.Image.Image, int]]:
    for position, (pixels, label) in enumerate(zip(images, labels)):
        yield f"fmnist-{split}-{position:06d}", PIL.Image.fromarray(pixels), int(label)


def _write_tars(samples, staging: Path, shard_size, num_classes, image_format, prefix):
    shards: list[ShardInfo] = []
    seen_keys: set[str] = set()
    writer, name, count = None, "", 0
    # An integer mtime: with a float one, tarfile puts a PAX header before every member, which
    # doubled the tar size and the write time of Fashion-MNIST.
    mtime = int(time.time())

    def finish_shard():
        writer.close()
        shards.append(ShardInfo(name, count, os.path.getsize(staging / name)))

    try:
        for position, sample in enumerate(samples):
            key, image, label = _checked_sample(sample, position, num_classes, seen_keys)
            if writer is None:
                name, count = f"{prefix}-{len(shards):06d}.tar", 0
                writer = wds.TarWriter(str(staging / name), mtime=mtime)
            writer.write({"__key__": key, image_format: image, "cls": label})
            count += 1
            if count == shard_size:
                finish_shard()
                writer = None
        if writer is not None:
            finish_shard()
            writer = None
    finally:
        if writer is not None:
            writer.close()
    if not shards:
        raise ValueError("samples is empty: there is nothing to write")
    return shards


def _checked_sample(sample, position, num_classes, seen_keys) -> tuple[str, ImageLike, int]:
    if not isinstance(sample, tuple) or len(sample) != 3:
        raise TypeError(f"sample {position} must be a (key, image, label) tuple, got {type(sample)}")
    key, image, label = sample
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(
            f"sample {position}: key must be a non-empty string without '.', got {key!r} "
            f"(webdataset splits member names into key and extension at the first dot)"
        )
    if key in seen_keys:
        raise ValueError(f"sample {position}: key {key!r} was already used; keys must be unique")
    seen_keys.add(key)
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    if not isinstance(image, (PIL.Image.Image, bytes)):
        raise TypeError(
            f"sample {position} ({key}): image must be a PIL image or encoded bytes, got {type(image)}"
        )
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(f"sample {position} ({key}): label must be an integer, got {label!r}")
    if not 0 <= label < num_classes:
        raise ValueError(
            f"sample {position} ({key}): label {label} is outside 0..{num_classes - 1} "
            f"(there are {num_classes} classes)"
        )
    return key, image, int(label)


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse early, before any work, if writing would destroy something it should not."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pass overwrite=True to replace it, or choose another out_dir"
        )
    # overwrite=True replaces a shard directory, never an arbitrary folder given by mistake.
    if not out_dir.is_dir() or not (
        (out_dir / INDEX_FILENAME).is_file() or not any(out_dir.iterdir())
    ):
        raise FileExistsError(
            f"{out_dir} exists and is not a shard directory (no {INDEX_FILENAME}); overwrite=True "
            f"only replaces shard directories or empty ones, so remove it yourself if you mean it"
        )


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    _check_replaceable(out_dir, overwrite)  # something may have appeared while we wrote
    retired = out_dir.parent / f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, retired)
    os.rename(staging, out_dir)
    shutil.rmtree(retired)
