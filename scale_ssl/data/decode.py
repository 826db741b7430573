"""Image bytes -> uint8 pixels for the augmentations, as fast as the format allows.

JPEG (nearly every image in a web-scale or ImageNet shard) goes through OpenCV's libjpeg-turbo
decoder straight into a numpy array: it measured ~1.4x faster than PIL's decode plus the copy
into numpy (docs/BENCHMARKS.md, "Augmentation"), with bitwise the same pixels. When every view
that will be cut from the image needs at most 1/2, 1/4 or 1/8 of its resolution, the JPEG is
decoded at that reduced size (DCT scaling, the same as ``PIL.Image.draft``), which costs a
fraction of a full decode. Every other format, and any JPEG OpenCV does not take, is decoded by
PIL.

A JPEG that does not end with its end-of-image marker (a truncated file) goes to PIL too, which
raises on it: OpenCV would return the partial picture with grey rows, and the shard stream must
see the error to count the sample as corrupt.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import PIL.Image

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# OpenCV's reduced-size decode bit by factor (IMREAD_REDUCED_GRAYSCALE_n; OR-ed with the colour mode).
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def jpeg_size(encoded: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame marker, without decoding; None if not found."""
    position, end = 2, len(encoded)
    while position + 9 < end:
        if encoded[position] != 0xFF:
            return None
        marker = encoded[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(encoded[position + 2:position + 4], "big")
        # SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(encoded[position + 5:position + 7], "big")
            width = int.from_bytes(encoded[position + 7:position + 9], "big")
            return height, width
        position += 2 + length
    return None


def reduction_for(height: int, width: int, min_crop_side) -> int:
    """The largest JPEG reduction (1, 2, 4, 8) after which ``min_crop_side(h, w)`` (the smallest
    crop side any view may cut, in pixels of an ``h`` x ``w`` image, per output pixel) is still
    >= 1: no view then upsamples what a full decode would have given it."""
    factor = 1
    while factor < 8 and min_crop_side(height / (2 * factor), width / (2 * factor)) >= 1.0:
        factor *= 2
    return factor


def decode_image(encoded: bytes, channels: int, min_crop_side=None) -> np.ndarray:
    """``H x W x 3`` RGB (``channels=3``) or ``H x W`` grayscale (``channels=1``) uint8 pixels.

    ``min_crop_side``, if given, allows a reduced JPEG decode (see ``reduction_for``).
    Raises (PIL's errors) on undecodable data.
    """
    if encoded[:2] == _JPEG_START and encoded.rstrip(b"\x00")[-2:] == _JPEG_END:
        factor = 1
        if min_crop_side is not None:
            size = jpeg_size(encoded)
            if size is not None:
                factor = reduction_for(*size, min_crop_side)
        mode = cv2.IMREAD_COLOR_RGB if channels == 3 else cv2.IMREAD_GRAYSCALE
        flags = _REDUCED[factor] | mode | cv2.IMREAD_IGNORE_ORIENTATION
        pixels = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), flags)
        if pixels is not None:
            return pixels
    image = PIL.Image.open(io.BytesIO(encoded))
    image = image.convert("RGB" if channels == 3 else "L")
    return np.asarray(image)


def as_pixels(image, channels: int) -> np.ndarray:
    """A PIL image or an array (already decoded) as the uint8 layout ``decode_image`` returns."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got an array of {image.dtype}")
        if channels == 3 and image.ndim == 2:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        if channels == 1 and image.ndim == 3:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return image
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    return np.asarray(image.convert("RGB" if channels == 3 else "L"))
