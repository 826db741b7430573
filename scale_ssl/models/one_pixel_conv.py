"""Convolutions whose output is one pixel, computed as the matrix product they are.

When a convolution's output is 1 x 1, its single output position reads one window of the zero-padded
input: input rows ``0..H-1`` meet kernel rows ``p..p+H-1`` (p = padding), as long as the input fits
inside the window (``H <= k - p``, likewise for the width). Every other tap multiplies padding. So,
exactly (stride and all),

    conv2d(x, W, stride=s, padding=p)  ==  x.flatten(1) @ W[:, :, p:p+H, p:p+W].flatten(1).T + b

for x of shape (N, C, H, W), reshaped to (N, O, 1, 1); the gradient of every tap outside the window
is 0 in both forms. Small-image encoders reach this case: a ResNet on 28-32 px images with the
ImageNet stem (stride-2 conv and max-pool) enters its last stage at 2 x 2 and runs it at 1 x 1.
There oneDNN's convolution kernels are far from the arithmetic's cost (measured on this project's
2-core AVX2 CPU, torch 2.14.1, one thread, ResNet-10 ``layer4``, batch 256, forward + backward):

- 3 x 3, 512 -> 512 on a 1 x 1 map: 584 ms as a convolution (the backward alone ~15x the forward,
  a third of the whole SimCLR step), 32 ms as the matrix product;
- 3 x 3 stride 2, 256 -> 512 from a 2 x 2 map: 113 ms against 19 ms.

``OnePixelConv2d`` is an ``nn.Conv2d`` with the same parameters, the same ``state_dict`` and the
same initialisation; only its forward takes the matrix-product form when the output is one pixel,
so checkpoints and exports stay plain torchvision weights. The shape test is static, so traced
backends (XLA, torch.compile) see one graph per input shape, as they do for ``nn.Conv2d``. The two
forms differ only by the order of floating-point summation (~1e-7 relative in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnePixelConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a one-pixel output as a matrix product (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self._one_pixel_window(x.shape[-2], x.shape[-1])
        if window is None:
            return super().forward(x)
        (top, height), (left, width) = window
        weight = self.weight[:, :, top : top + height, left : left + width]
        return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]

    def _one_pixel_window(self, height: int, width: int):
        """``((first kernel row, rows), (first kernel column, columns))`` the input meets when the
        output is 1 x 1 and the input lies inside one kernel window; None otherwise."""
        window = []
        for size, k, s, p in zip((height, width), self.kernel_size, self.stride, self.padding):
            if (size + 2 * p - k) // s + 1 != 1 or size > k - p:
                return None
            window.append((p, size))
        return tuple(window)


def _can_take_matrix_form(module: nn.Module) -> bool:
    # Grouped, dilated, non-zero-padded or "same"-padded (a string) convolutions are not one matrix
    # product of the window; subclasses keep their own forward.
    return (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


def use_one_pixel_convs(module: nn.Module) -> int:
    """Turn every eligible ``nn.Conv2d`` inside ``module`` into a :class:`OnePixelConv2d` in place
    (parameters, buffers and hooks untouched); returns how many were turned."""
    turned = 0
    for child in module.modules():
        if _can_take_matrix_form(child):
            child.__class__ = OnePixelConv2d
            turned += 1
    return turned


def use_plain_convs(module: nn.Module) -> int:
    """The inverse of :func:`use_one_pixel_convs`: turn every ``OnePixelConv2d`` inside ``module``
    back into ``nn.Conv2d`` in place (what torchvision builds; for comparisons and benchmarks);
    returns how many were turned."""
    turned = 0
    for child in module.modules():
        if type(child) is OnePixelConv2d:
            child.__class__ = nn.Conv2d
            turned += 1
    return turned
