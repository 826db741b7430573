"""The distribution one augmented view is drawn from, and the draw itself.

A ``ViewRecipe`` holds the published parameters of one view (SimCLR, Chen et al. 2020,
arXiv:2002.05709, appendix A, and the methods that reuse it):

* random resized crop: area fraction ``s ~ U(crop_scale)`` of the image, aspect ratio
  ``r = exp(U(log ratio_low, log ratio_high))`` (3/4 to 4/3), up to 10 attempts to fit the
  image, else the whole image (its aspect clamped into the range), centred; resized to
  ``size`` x ``size``;
* horizontal flip with ``flip_p``;
* colour jitter with probability ``jitter_p``: brightness, contrast and saturation factors
  ``U(max(0, 1 - x), 1 + x)`` and a hue shift ``U(-h, h)`` of the colour circle, the four
  applied in a uniformly random order (SimCLR: x = 0.8 s for b/c/s, h = 0.2 s, p = 0.8);
* grayscale with ``grayscale_p`` (0.2);
* gaussian blur with ``blur_p``, ``sigma ~ U(blur_sigma)`` = U(0.1, 2.0), kernel side 10 % of the
  view's side (odd);
* solarisation (pixels >= 128 of 255 inverted) with ``solarize_p`` (BYOL).

``sample_view_params`` draws every random choice of one view as a vector of ``NUM_PARAMS`` floats
(index names below) from torch's global generator, which the shard stream seeds per sample
(so batches, and a resumed run, are reproducible). The same vector drives the CPU path
(``cpu_augment``) and the batched device path (``device_augment``): the two apply one
distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

# Positions in a view's parameter vector.
TOP, LEFT, HEIGHT, WIDTH = 0, 1, 2, 3  # crop box in source pixels
FLIP = 4  # 1: mirror left-right
JITTER = 5  # 1: colour jitter applied
BRIGHTNESS, CONTRAST, SATURATION, HUE = 6, 7, 8, 9  # factors; hue is a shift in turns, in [-0.5, 0.5]
ORDER = slice(10, 14)  # the jitter ops' ids (JITTER_OPS) in the order they are applied
GRAYSCALE = 14
BLUR, SIGMA = 15, 16
SOLARIZE = 17
NUM_PARAMS = 18
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

CROP_ATTEMPTS = 10
# Uniform draws per view: two per crop attempt, two for the crop position, four for the jitter
# order, and one each for flip, jitter coin, the four jitter factors, grayscale, blur coin, sigma,
# solarize. Always the same number, whatever is applied.
_DRAWS = 2 * CROP_ATTEMPTS + 2 + 4 + 10


@dataclass(frozen=True)
class ViewRecipe:
    """Parameters of one view's distribution (defaults: SimCLR at jitter strength s = 1)."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ViewRecipe: size must be a positive integer (pixels), got {self.size!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale!r}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {p!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} jitter must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5] (a shift of at most half the colour circle), got {self.hue!r}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma!r}")

    @property
    def blur_kernel(self) -> int:
        """Kernel side: 10 % of the view's side, odd, at least 3 (SimCLR appendix A)."""
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    def for_channels(self, channels: int) -> "ViewRecipe":
        """One channel has no colour: saturation, hue and grayscale do nothing and are dropped."""
        return self if channels == 3 else replace(self, saturation=0.0, hue=0.0, grayscale_p=0.0)

    def short_repr(self) -> str:
        defaults = ViewRecipe(self.size)
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if f.name == "size" or getattr(self, f.name) != getattr(defaults, f.name)]
        return f"ViewRecipe({', '.join(changed)})"


def simclr_recipe(size: int, strength: float = 1.0, *, crop_scale=(0.08, 1.0), blur: bool = True) -> ViewRecipe:
    """SimCLR's view at colour strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale
    p=0.2, blur p=0.5. MoCo v2 (arXiv:2003.04297) and SimSiam (arXiv:2011.10566) use s=0.5 and
    crop scale (0.2, 1); SwAV (arXiv:2006.09882) s=1 with its multi-crop scales."""
    if strength < 0:
        raise ValueError(f"jitter_strength must be >= 0, got {strength!r}")
    return ViewRecipe(size, crop_scale=tuple(crop_scale), brightness=0.8 * strength, contrast=0.8 * strength,
                      saturation=0.8 * strength, hue=min(0.2 * strength, 0.5), blur_p=0.5 if blur else 0.0)


def byol_recipes(size: int, strength: float = 0.5, *, crop_scale=(0.08, 1.0), blur: bool = True) -> tuple[ViewRecipe, ViewRecipe]:
    """BYOL's two asymmetric views (Grill et al. 2020, arXiv:2006.07733, appendix B, table 6):
    jitter (0.4, 0.4, 0.2, 0.1) with p=0.8 (``strength`` 0.5 of SimCLR's scale, saturation
    halved), grayscale p=0.2; blur p=1.0 on the first view and 0.1 on the second; solarisation
    p=0 on the first and 0.2 on the second."""
    base = simclr_recipe(size, strength, crop_scale=crop_scale, blur=blur)
    base = replace(base, saturation=0.4 * strength)
    return (replace(base, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
            replace(base, blur_p=0.1 if blur else 0.0, solarize_p=0.2))


def sample_view_params(recipe: ViewRecipe, height: int, width: int) -> torch.Tensor:
    """Every random choice of one view of a ``height`` x ``width`` image, from torch's global
    generator: a float32 vector indexed by the module's constants."""
    u = torch.rand(_DRAWS, dtype=torch.float64).tolist()
    params = [0.0] * NUM_PARAMS
    params[TOP:WIDTH + 1] = _crop_box(recipe, height, width, u[: 2 * CROP_ATTEMPTS + 2])
    rest = iter(u[2 * CROP_ATTEMPTS + 2:])
    order = sorted(range(4), key=[next(rest) for _ in range(4)].__getitem__)  # a uniform random permutation
    params[ORDER] = order
    params[FLIP] = float(next(rest) < recipe.flip_p)
    params[JITTER] = float(next(rest) < recipe.jitter_p)
    for index, name in ((BRIGHTNESS, "brightness"), (CONTRAST, "contrast"), (SATURATION, "saturation")):
        spread = getattr(recipe, name)
        low, high = max(0.0, 1.0 - spread), 1.0 + spread
        params[index] = low + (high - low) * next(rest)
    params[HUE] = recipe.hue * (2.0 * next(rest) - 1.0)
    params[GRAYSCALE] = float(next(rest) < recipe.grayscale_p)
    params[BLUR] = float(next(rest) < recipe.blur_p)
    sigma_low, sigma_high = recipe.blur_sigma
    params[SIGMA] = sigma_low + (sigma_high - sigma_low) * next(rest)
    params[SOLARIZE] = float(next(rest) < recipe.solarize_p)
    return torch.tensor(params, dtype=torch.float32)


def _crop_box(recipe: ViewRecipe, height: int, width: int, u: list[float]) -> list[float]:
    """torchvision's ``RandomResizedCrop.get_params`` algorithm (the published one), on
    pre-drawn uniforms: (top, left, crop height, crop width)."""
    area = height * width
    scale_low, scale_high = recipe.crop_scale
    log_low, log_high = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        target = area * (scale_low + (scale_high - scale_low) * u[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[-2] * (height - h + 1)), height - h)
            left = min(int(u[-1] * (width - w + 1)), width - w)
            return [float(top), float(left), float(h), float(w)]
    # No attempt fitted: the whole image, its aspect clamped into the ratio range, centred.
    ratio = width / height
    if ratio < recipe.crop_ratio[0]:
        w, h = width, int(round(width / recipe.crop_ratio[0]))
    elif ratio > recipe.crop_ratio[1]:
        h, w = height, int(round(height * recipe.crop_ratio[1]))
    else:
        w, h = width, height
    return [float((height - h) // 2), float((width - w) // 2), float(h), float(w)]
