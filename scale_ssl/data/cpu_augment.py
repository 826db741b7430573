"""One view's augmentation on the CPU: OpenCV on uint8 pixels, one op after another.

Applies a parameter vector drawn by ``view_recipe.sample_view_params`` to an ``H x W x C`` uint8
image (C = 3, RGB, or a 2-D grayscale array). Every op works on the small crop, in uint8, and
rounds back to uint8 after itself, as PIL and torchvision's uint8 ops do:

* crop + resize: bilinear (``INTER_LINEAR``, half-pixel centres as torchvision and PIL) when the
  crop is at most twice the output side, else area averaging (``INTER_AREA``), so large
  downscales do not alias;
* brightness ``clip(f x)``; contrast ``clip(f x + (1 - f) mean(gray(x)))``; saturation
  ``clip(f x + (1 - f) gray(x))``; hue: rotate H by ``h`` turns in float HSV; each clamped to
  [0, 255] like torchvision's ``adjust_*``;
* grayscale: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) in all three channels;
* gaussian blur: the sampled Gaussian with ``sigma`` and reflected borders, kernel side the
  recipe's (10 % of the view) but cut at 4 sigma when that is smaller (the weights beyond it add
  up to < 1e-4, below one grey level), which makes small sigmas several times cheaper;
* solarize: ``255 - x`` where ``x >= 128``.

Why OpenCV: per op on a 224 px crop it measured 2-8x faster than PIL and 10-40x faster than
torchvision's per-image tensor ops (docs/BENCHMARKS.md, "Augmentation"), and it keeps the
exact op definitions above. Workers set OpenCV to one thread: parallelism comes from
DataLoader workers, and a thread pool per worker only oversubscribes the cores.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from scale_ssl.data.view_recipe import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAYSCALE,
    HEIGHT,
    HUE,
    JITTER,
    LEFT,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
    TOP,
    WIDTH,
)

_SOLARIZE_LUT = np.array([v if v < 128 else 255 - v for v in range(256)], dtype=np.uint8)
_single_threaded = False


def use_one_thread() -> None:
    """OpenCV starts a thread pool per process; per-sample ops in DataLoader workers want none."""
    global _single_threaded
    if not _single_threaded:
        cv2.setNumThreads(1)
        _single_threaded = True


def crop_resize(image: np.ndarray, params, size: int) -> np.ndarray:
    """The crop box of ``params`` (in ``image``'s pixels) resized to ``size`` x ``size``."""
    top, left, h, w = (int(params[i]) for i in (TOP, LEFT, HEIGHT, WIDTH))
    crop = image[top:top + h, left:left + w]
    interpolation = cv2.INTER_AREA if max(h, w) > 2 * size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def augment_view(image: np.ndarray, params, size: int, blur_kernel: int) -> np.ndarray:
    """Crop, resize, flip, colour-jitter, grayscale, blur and solarize one view (uint8 in, uint8
    out, same channel layout). ``params`` is a sequence indexed by ``view_recipe``'s constants."""
    x = crop_resize(image, params, size)
    if params[FLIP]:
        x = cv2.flip(x, 1)
    if params[JITTER]:
        for op in params[ORDER]:
            x = _JITTER_FUNCTIONS[int(op)](x, float(params[(BRIGHTNESS, CONTRAST, SATURATION, HUE)[int(op)]]))
    if params[GRAYSCALE] and x.ndim == 3:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if params[BLUR]:
        x = gaussian_blur(x, float(params[SIGMA]), blur_kernel)
    if params[SOLARIZE]:
        x = cv2.LUT(x, _SOLARIZE_LUT)
    return x


def gaussian_blur(x: np.ndarray, sigma: float, kernel: int) -> np.ndarray:
    side = min(kernel, 2 * math.ceil(4 * sigma) + 1)
    return cv2.GaussianBlur(x, (side, side), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return cv2.convertScaleAbs(x, alpha=factor)  # factor >= 0: the absolute value never acts


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = float(_gray(x).mean())
    return cv2.addWeighted(x, factor, x, 0.0, (1.0 - factor) * mean)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    if x.ndim == 2:
        return x
    gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(x, factor, gray, 1.0 - factor, 0.0)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    if x.ndim == 2 or shift == 0.0:
        return x
    # Float HSV (H in degrees): exactly torchvision's adjust_hue; OpenCV's 8-bit HSV would quantise
    # H, S and V to 256 levels (up to 8 grey levels off on dark, unsaturated pixels) for 0.1 ms less.
    hsv = cv2.cvtColor(x.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)
    hue = hsv[..., 0]
    hue += np.float32(shift * 360.0)
    np.subtract(hue, np.float32(360.0), out=hue, where=hue >= 360.0)
    np.add(hue, np.float32(360.0), out=hue, where=hue < 0.0)
    return cv2.convertScaleAbs(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), alpha=255.0)


def _gray(x: np.ndarray) -> np.ndarray:
    return x if x.ndim == 2 else cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)


_JITTER_FUNCTIONS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class Normalizer:
    """uint8 ``H x W [x C]`` -> float32 ``C x H x W`` tensor, ``(x / 255 - mean) / std``."""

    def __init__(self, mean, std):
        self.scale = [float(1.0 / (255.0 * s)) for s in std]
        self.shift = [float(-m / s) for m, s in zip(mean, std)]

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        channels = [x] if x.ndim == 2 else cv2.split(x)
        out = np.empty((len(channels), *x.shape[:2]), dtype=np.float32)
        for c, plane in enumerate(channels):
            np.multiply(plane, np.float32(self.scale[c]), out=out[c])
            out[c] += np.float32(self.shift[c])
        return torch.from_numpy(out)
