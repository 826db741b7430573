"""Shards as a user brings them: written by ``webdataset.TarWriter`` itself (its defaults: a PAX
header per member for the float mtime), uneven sizes, images in jpg / png / webp, labels as a
``cls`` member, a field of a ``json`` member, or none; no ``shards.json``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import webdataset as wds

# The example: 7 shards of 3-40 samples (128 in all).
USER_SHARD_SIZES = [3, 40, 17, 9, 28, 5, 26]
FORMATS = ("jpg", "png", "webp")
CLASS_NAMES = ("cat", "dog", "emu")


def key_of(shard: int, i: int) -> str:
    return f"s{shard:03d}-{i:04d}"


def write_user_shards(directory: Path, sizes=USER_SHARD_SIZES, labels: str | None = "cls", side: int = 6) -> set[str]:
    """``directory/data-<n>.tar``; sample i of a shard is an RGB image in FORMATS[i % 3] with the
    label i % 10 (``cls``), or the class name CLASS_NAMES[i % 3] (``labels="json"``: field
    ``label`` of the json member, next to other metadata), or no label (``labels=None``).
    Returns the sample keys."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    keys = set()
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(directory / f"data-{shard:02d}.tar")) as writer:
            for i in range(size):
                image = PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                extension = FORMATS[i % len(FORMATS)]
                encoded = io.BytesIO()
                image.save(encoded, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension], lossless=True)
                sample = {"__key__": key_of(shard, i), extension: encoded.getvalue()}
                if labels == "cls":
                    sample["cls"] = i % 10
                elif labels == "json":
                    sample["json"] = json.dumps({"label": CLASS_NAMES[i % 3], "width": side}).encode()
                writer.write(sample)
                keys.add(key_of(shard, i))
    return keys
