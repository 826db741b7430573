"""The device half of ``data.augment_on: device``: batched view augmentation on the training device.

The loader ships each view as ``(crops, params)``: the random resized crop already cut and resized
to uint8 pixels ``(B, C, S, S)`` (the only step that needs the whole decoded image), and every
other random choice of each sample as a parameter row ``(B, NUM_PARAMS)``
(``view_recipe.sample_view_params``, drawn in the loader under the stream's per-sample seeds, so
a batch and therefore a resumed run are exactly reproducible). ``DeviceViewAugment`` then applies,
on whatever device the batch is on and batched over the samples that draw each op:

    flip -> colour jitter (brightness, contrast, saturation, hue in each sample's own order)
         -> grayscale -> gaussian blur (per-sample sigma) -> solarize -> (x - mean) / std

with the definitions of torchvision's float ops (``adjust_brightness``: ``clip(f x)``;
``adjust_contrast``: blend with the mean of the luma; ``adjust_saturation``: blend with the luma;
``adjust_hue``: rotate H in HSV; luma 0.299 R + 0.587 G + 0.114 B; each op clamped to [0, 1]),
the blur a separable sampled Gaussian with the paper's kernel (10 % of the view's side) and
reflected borders. Pixels stay float from the first op to the last (the CPU path rounds to uint8
after each op; the two agree to a few grey levels, tests/test_augment_device.py).

Why by hand on torch ops: it measured faster on this CPU than kornia 0.9's ``kornia.augmentation``
modules and than an NVIDIA DALI 2.4 CPU pipeline given the same crops (docs/BENCHMARKS.md,
"Augmentation", (b)); neither reproduces the published jitter (kornia draws one op order per
batch; DALI has no random order and its hue/saturation are not torchvision's); it adds no
dependency; and one host read of the small parameter matrix per view is its only sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.data.view_recipe import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAYSCALE,
    HUE,
    JITTER,
    NUM_PARAMS,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
)

_LUMA = (0.299, 0.587, 0.114)
_FACTOR_COLUMN = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


class DeviceViewAugment(nn.Module):
    """Turns every ``(uint8 crops, params)`` pair of a batch into normalised float views.

    Args:
        mean, std: per-channel normalisation on the [0, 1] scale (as ``SimCLRViews``).
        blur_kernel_fraction: blur kernel side as a share of the view's side (SimCLR: 0.1).

    ``forward(batch)`` walks the batch structure the stream collates (``((views...), labels)``,
    views possibly nested) and replaces each pair; anything else passes through unchanged.
    """

    def __init__(self, mean, std, blur_kernel_fraction: float = 0.1):
        super().__init__()
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape or bool((std <= 0).any()):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean.tolist()} / {std.tolist()}")
        # Not persistent: the module carries no state a checkpoint needs.
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self.blur_kernel_fraction = blur_kernel_fraction

    def forward(self, batch):
        if _is_view_pair(batch):
            return self.augment(*batch)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.forward(item) for item in batch)
        return batch

    @torch.no_grad()
    def augment(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if crops.dtype != torch.uint8 or crops.ndim != 4 or params.shape != (crops.shape[0], NUM_PARAMS):
            raise ValueError(
                f"expected uint8 crops (B, C, H, W) and params (B, {NUM_PARAMS}), got {tuple(crops.shape)} "
                f"{crops.dtype} and {tuple(params.shape)}"
            )
        channels = crops.shape[1]
        if channels != self.mean.shape[1]:
            raise ValueError(f"crops have {channels} channels but mean/std have {self.mean.shape[1]}")
        # One host read of the small parameter matrix decides which samples each op touches.
        host = params.detach().to("cpu", torch.float64)
        x = crops.to(self.mean.dtype).div_(255.0)
        x = self._where(x, host[:, FLIP] > 0.5, lambda part, rows: part.flip(-1))
        jitter = host[:, JITTER] > 0.5
        for stage in range(4):
            for op in range(4):
                if channels == 1 and op >= 2:
                    continue  # one channel: no saturation or hue
                rows = jitter & (host[:, ORDER.start + stage] == op)
                factors = params[:, _FACTOR_COLUMN[op]].to(x.dtype)
                x = self._where(x, rows, lambda part, r, op=op, f=factors: _JITTER[op](self, part, f[r]))
        if channels == 3:
            x = self._where(x, host[:, GRAYSCALE] > 0.5, lambda part, rows: self._gray(part).expand_as(part).contiguous())
        kernel = max(3, int(self.blur_kernel_fraction * x.shape[-1]) // 2 * 2 + 1)
        sigmas = params[:, SIGMA].to(x.dtype)
        x = self._where(x, host[:, BLUR] > 0.5, lambda part, rows: _gaussian_blur(part, sigmas[rows], kernel))
        x = self._where(x, host[:, SOLARIZE] > 0.5, lambda part, rows: torch.where(part >= 0.5, 1.0 - part, part))
        return (x - self.mean) / self.std

    @staticmethod
    def _where(x: torch.Tensor, rows: torch.Tensor, op) -> torch.Tensor:
        """``op`` applied to the samples selected by the host mask ``rows`` only."""
        count = int(rows.sum())
        if count == 0:
            return x
        if count == len(rows):
            return op(x, torch.arange(len(rows), device=x.device))
        index = rows.nonzero().flatten().to(x.device)
        x = x.clone() if x.requires_grad else x
        x[index] = op(x[index], index)
        return x

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.luma).sum(1, keepdim=True)

    def _brightness(self, x, factor):
        return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def _contrast(self, x, factor):
        gray = self._gray(x) if x.shape[1] == 3 else x
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        f = factor.view(-1, 1, 1, 1)
        return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)

    def _saturation(self, x, factor):
        f = factor.view(-1, 1, 1, 1)
        return (f * x + (1.0 - f) * self._gray(x)).clamp_(0.0, 1.0)

    def _hue(self, x, shift):
        return _rotate_hue(x, shift)


_JITTER = (DeviceViewAugment._brightness, DeviceViewAugment._contrast, DeviceViewAugment._saturation,
           DeviceViewAugment._hue)


def _is_view_pair(item) -> bool:
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
            and isinstance(item[1], torch.Tensor) and item[0].dtype == torch.uint8 and item[0].ndim == 4
            and item[1].ndim == 2 and item[1].shape[-1] == NUM_PARAMS)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, H + shift turns, -> RGB) without building S:
    with value v = max, chroma c = max - min and the hue h6 in sixths of a turn (the sector
    formula), each channel k of the result is ``v - c clip(min(m_k, 4 - m_k), 0, 1)`` with
    ``m_k = (n_k + h6 + 6 shift) mod 6``, n = (5, 3, 1) for R, G, B (v s = c, so S cancels).
    About a fifth of the memory traffic of converting to HSV and back."""
    r, g, b = x.unbind(1)
    value = x.amax(1, keepdim=True)
    chroma = value - x.amin(1, keepdim=True)
    safe = chroma.clamp_min(1e-12).squeeze(1)  # where chroma is 0 every difference below is 0 too
    top = value.squeeze(1)
    h6 = torch.where(top == r, (g - b) / safe, torch.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = (h6 + 6.0 * shift.view(-1, 1, 1)).unsqueeze(1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    m = torch.remainder(offsets + h6, 6.0)
    return value - chroma * torch.minimum(m, 4.0 - m).clamp_(0.0, 1.0)


def _gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (grouped convolutions, reflected borders)."""
    n, c, h, w = x.shape
    radius = kernel // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (taps.view(1, -1) / sigmas.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, kernel)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weights.view(n * c, 1, 1, kernel),
                    groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weights.view(n * c, 1, kernel, 1),
                    groups=n * c)
    return flat.view(n, c, h, w)
