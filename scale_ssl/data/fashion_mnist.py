"""Fashion-MNIST read from the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package.

This is the small real data set the project develops and tests on: it needs no network at run
time, only ``apt-get install -y dataset-fashion-mnist``. The IDX format is four big-endian bytes
of magic (two zero bytes, a dtype code, the number of dimensions), one big-endian uint32 per
dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX dtype codes (third magic byte) and the big-endian numpy dtype each one means.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) into an array of its shape.

    Raises ``ValueError`` naming the file when the magic number or the length is wrong, so a
    truncated download or a file of another format is caught here rather than as a reshape
    error later.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is {raw[:4].hex() or 'missing'}, expected "
            f"00 00 <dtype code in {sorted(_IDX_DTYPES)}> <ndim>; re-install the data "
            f"({_INSTALL_HINT})"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header_end + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} is truncated or padded: its header says shape {shape} ({expected} bytes) but "
            f"the file has {len(raw)} bytes; re-install the data ({_INSTALL_HINT})"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    split: str, root: str | os.PathLike = FASHION_MNIST_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of one split: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist: {_INSTALL_HINT}")
    image_file, label_file = (root / name for name in _SPLIT_FILES[split])
    for required in (image_file, label_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {required} is missing: re-install the data ({_INSTALL_HINT})"
            )
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{image_file} / {label_file} hold arrays of shape {images.shape} {images.dtype} / "
            f"{labels.shape}, expected uint8 (N, H, W) images and (N,) labels"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels"
        )
    return images, labels.astype(np.int64)
