"""Write labelled images as webdataset tar shards with a ``shards.json`` index.

Each sample becomes two tar members, ``<key>.<image_format>`` (the encoded image) and
``<key>.cls`` (the integer label as text), written by webdataset's ``TarWriter`` so any webdataset
reader can stream the result. Two sources are packed: Fashion-MNIST (lossless PNG) and any
torchvision ``ImageFolder`` tree (``make_imagefolder_shards``: the original file bytes, never
re-encoded).

The directory appears atomically: everything is written into a hidden sibling directory that is
renamed to ``out_dir`` only once every shard and the index are complete. A crash or Ctrl-C leaves
at most a ``.<name>.incomplete-*`` directory behind, never an ``out_dir`` that looks finished but
holds a truncated shard.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import numbers
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import PIL.Image
import webdataset as wds

from scale_ssl.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_fashion_mnist
from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex, ShardInfo

# Formats webdataset's TarWriter can encode from a PIL image (encoded bytes pass through as-is).
SUPPORTED_IMAGE_FORMATS = ("png", "jpg", "jpeg", "ppm", "pgm", "tiff")

# Tar member extension for each format PIL detects in an ImageFolder file.
_PIL_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tiff"}
_TAR_BLOCK = 512


class EncodedImage(NamedTuple):
    """Image bytes kept as they are, stored under the member extension ``extension``."""

    data: bytes
    extension: str


ImageLike = Union[PIL.Image.Image, bytes, EncodedImage]


def write_image_shards(
    samples: Iterable[tuple[str, ImageLike, int]],
    out_dir: str | os.PathLike,
    shard_size: int,
    classes: Sequence[str],
    image_format: str = "png",
    overwrite: bool = False,
    prefix: str = "shard",
    source: str | Callable[[], str] = "",
    max_shard_bytes: int | None = None,
) -> ShardIndex:
    """Write ``(key, image, label)`` samples into ``out_dir/<prefix>-000000.tar``, ... and index them.

    ``image`` is a PIL image (encoded here as ``image_format``; ``png`` is lossless), bytes
    already encoded in that format, or an ``EncodedImage`` (bytes stored under their own
    extension). ``key`` names the sample in every tar and must be unique and free of dots
    (webdataset splits a member name into key and extension at the first dot). A shard is closed
    at ``shard_size`` samples or before its members would pass ``max_shard_bytes`` bytes (tar
    headers and padding counted; a lone sample larger than that still gets its shard). Returns
    the written index, whose ``directory`` is ``out_dir``. The index's ``image_key`` is
    ``image_format``, or the most common extension when ``EncodedImage`` samples were given;
    ``source`` may be a callable, asked once every sample has been consumed.
    """
    out_dir = Path(out_dir)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if max_shard_bytes is not None and (
        isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1
    ):
        raise ValueError(f"max_shard_bytes must be None or a positive integer, got {max_shard_bytes!r}")
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
        shards, extensions = _write_tars(
            samples, staging, shard_size, len(classes), image_format, prefix, max_shard_bytes
        )
        source = source() if callable(source) else source
        index = ShardIndex(
            shards=shards,
            classes=list(classes),
            image_key=extensions.most_common(1)[0][0],
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


def _write_tars(samples, staging: Path, shard_size, num_classes, image_format, prefix, max_shard_bytes=None):
    shards: list[ShardInfo] = []
    seen_keys: set[str] = set()
    extensions: Counter = Counter()
    writer, name, count, size, offsets = None, "", 0, 0, []
    # An integer mtime: with a float one, tarfile puts a PAX header before every member, which
    # doubled the tar size and the write time of Fashion-MNIST.
    mtime = int(time.time())

    def finish_shard():
        writer.close()
        shards.append(ShardInfo(name, count, os.path.getsize(staging / name), tuple(offsets)))

    try:
        for position, sample in enumerate(samples):
            key, image, label = _checked_sample(sample, position, num_classes, seen_keys)
            extension = image_format
            if isinstance(image, EncodedImage):
                image, extension = image.data, image.extension
            sample_bytes = _tar_bytes(image) + _tar_bytes(str(label).encode())
            if writer is not None and max_shard_bytes is not None and size + sample_bytes > max_shard_bytes:
                finish_shard()
                writer = None
            if writer is None:
                name, count, size, offsets = f"{prefix}-{len(shards):06d}.tar", 0, 0, []
                writer = wds.TarWriter(str(staging / name), mtime=mtime)
            # Where this sample's first tar record starts: readers that own part of the shard
            # open it there (the index's "offsets").
            offsets.append(writer.tarstream.offset)
            writer.write({"__key__": key, extension: image, "cls": label})
            extensions[extension] += 1
            count += 1
            size += sample_bytes
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
    return shards, extensions


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
    if not isinstance(image, (PIL.Image.Image, bytes, EncodedImage)):
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


def _tar_bytes(payload) -> int:
    """Bytes one member takes in a tar: a header block plus the payload padded to whole blocks
    (a PIL image not yet encoded is counted by its raw pixels, an upper bound for PNG)."""
    length = len(payload) if isinstance(payload, (bytes, bytearray)) else len(payload.tobytes())
    return _TAR_BLOCK + -(-length // _TAR_BLOCK) * _TAR_BLOCK


@dataclass
class ImageFolderShards:
    """What ``make_imagefolder_shards`` wrote: the index, and every file it skipped with why."""

    index: ShardIndex
    skipped: list[tuple[str, str]] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)


def make_imagefolder_shards(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int,
    *,
    max_shard_bytes: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    shuffle_seed: int | None = 0,
    prefix: str = "shard",
) -> ImageFolderShards:
    """Pack a torchvision ``ImageFolder`` tree (``src_dir/<class>/<image>``) into shards.

    Classes and files are found exactly as ``torchvision.datasets.ImageFolder`` finds them
    (sorted class folders, its image extensions), so labels match an ``ImageFolder`` of the same
    tree. Each file's bytes are stored unchanged under the extension of the format PIL detects
    (ImageNet has PNG and CMYK files named ``.JPEG``; they are kept, correctly named); the
    index's ``image_key`` is the most common one. Each file is decoded once to check it: a file
    PIL cannot fully decode is skipped and reported with its path. ``workers`` processes read
    and check files in parallel; the result does not depend on their number.

    The key of a sample is its path below ``src_dir`` without the extension, other characters
    than letters, digits, ``_``, ``-`` and ``/`` replaced by ``_`` (plus a hash of the path if
    that collides), so it is stable across re-packs. ``shuffle_seed`` fixes the order in which
    files are spread over the shards (``None`` keeps the sorted order, which puts one class per
    shard: poor batches for a shuffle buffer smaller than a class).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"ImageFolder source {src_dir} is not a directory")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    _check_replaceable(Path(out_dir), overwrite)  # before reading a single image
    try:
        classes, class_to_idx = find_classes(src_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{src_dir} is not an ImageFolder tree (one sub-folder per class): {error}"
        ) from None
    files = make_dataset(src_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) below {src_dir}")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    keys = _stable_keys([os.path.relpath(path, src_dir) for path, _ in files])
    skipped: list[tuple[str, str]] = []
    formats: Counter = Counter()

    def samples() -> Iterator[tuple[str, EncodedImage, int]]:
        paths = [path for path, _ in files]
        if workers > 0:
            with multiprocessing.get_context().Pool(workers) as pool:
                yield from _checked_samples(pool.imap(_read_checked_image, paths, chunksize=16))
        else:
            yield from _checked_samples(map(_read_checked_image, paths))

    def _checked_samples(results):
        for (path, label), key, (data, extension, problem) in zip(files, keys, results):
            if problem is not None:
                skipped.append((path, problem))
                continue
            formats[extension] += 1
            yield key, EncodedImage(data, extension), label

    index = write_image_shards(
        samples(),
        out_dir,
        shard_size=shard_size,
        classes=classes,
        overwrite=overwrite,
        prefix=prefix,
        source=lambda: (
            f"ImageFolder {src_dir}: {sum(formats.values())} images of {len(files)} files "
            f"({len(skipped)} unreadable, skipped), formats {dict(formats)}, shuffle_seed={shuffle_seed}"
        ),
        max_shard_bytes=max_shard_bytes,
    )
    return ImageFolderShards(index, skipped, dict(formats))


def _read_checked_image(path: str) -> tuple[bytes | None, str, str | None]:
    """``(bytes, member extension, None)`` for a file PIL decodes fully, else ``(None, "", why)``."""
    try:
        with open(path, "rb") as file:
            data = file.read()
        with PIL.Image.open(io.BytesIO(data)) as image:
            detected = image.format
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        return None, "", f"{type(error).__name__}: {error}"
    extension = _PIL_FORMAT_EXTENSIONS.get(detected)
    if extension is None:
        return None, "", f"format {detected} is not one of {sorted(_PIL_FORMAT_EXTENSIONS)}"
    return data, extension, None


def _stable_keys(relative_paths: Sequence[str]) -> list[str]:
    keys = [re.sub(r"[^A-Za-z0-9_/-]", "_", os.path.splitext(path.replace(os.sep, "/"))[0]) for path in relative_paths]
    counts = Counter(keys)
    return [
        f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:8]}" if counts[key] > 1 else key
        for key, path in zip(keys, relative_paths)
    ]
