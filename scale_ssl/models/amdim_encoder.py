"""The AMDIM encoder: one conv trunk, embedded feature maps at 1x1, 5x5 and 7x7.

Bachman, Hjelm, Buchwalter. "Learning Representations by Maximizing Mutual Information Across
Views", NeurIPS 2019 (arXiv:1906.00910), sec. 3.5 and appendix (the encoder without padding,
so that each location of a 5x5 / 7x7 map sees a limited patch of the image).

Layout, for a width w = ``encoder_feature_dim`` and an H-px image (H >= 28):

    3x3 conv (C -> w), ReLU                               H x H
    residual 4x4/2 block (w -> 2w)                        H/2
    residual 4x4/2 block (2w -> 4w)                       H/4 (adaptive average pooling to 7 if larger)
    ``conv_block_depth`` residual 1x1 blocks (4w)         7 x 7   -> embed -> map 2 (7x7)
    residual 3x3 block without padding (4w)               5 x 5   -> embed -> map 1 (5x5)
    residual 5x5 block without padding (4w)               1 x 1   -> embed -> map 0 (1x1)

Each embedding is AMDIM's "NIN" head: a linear 1x1 conv plus a 1x1 conv -> ReLU -> 1x1 conv branch,
to ``embedding_fx_dim`` channels. ``encoder(x)`` returns the trunk's 1x1 features (N, 4w), which
kNN, linear probes and the online evaluator use; ``encoder.feature_maps(x)`` returns the embedded
maps ``(m0, m1, m2)`` that ``FeatureMapContrastiveTask`` compares ("01" = 1x1 vs 5x5, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.checks import check_int
from scale_ssl.models.adaptive_pool import adaptive_avg_pool2d

MAP_SIZES = (1, 5, 7)
MIN_IMAGE_SIZE = 28


def _norm(channels: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class ResidualConvBlock(nn.Module):
    """relu(norm(conv_k(x))) -> 1x1 conv, plus a shortcut: average-pooled to the output size and
    1x1-projected when the channels change."""

    is_shard_block = True  # a unit of peak memory for sharding backends (strategies/fsdp_units.py)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, use_bn: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not use_bn)
        self.norm = _norm(out_channels, use_bn)
        self.mix = nn.Conv2d(out_channels, out_channels, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mix(F.relu(self.norm(self.conv(x))))
        return F.relu(out + self.shortcut(adaptive_avg_pool2d(x, out.shape[-2:])))


class EmbeddingHead(nn.Module):
    """AMDIM's NIN embedding: W x + W_2 relu(W_1 x), all 1x1 convs."""

    def __init__(self, in_channels: int, out_channels: int, use_bn: bool):
        super().__init__()
        self.linear = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.hidden = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), _norm(out_channels, use_bn), nn.ReLU(),
                                    nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.hidden(x)


class AMDIMEncoder(nn.Module):
    """See the module docstring. ``feature_dim`` is the width of ``encoder(x)``; ``map_sizes``
    the sides of ``feature_maps(x)`` in order."""

    def __init__(
        self,
        image_channels: int = 3,
        image_height: int = 32,
        encoder_feature_dim: int = 320,
        embedding_fx_dim: int = 1280,
        conv_block_depth: int = 10,
        use_bn: bool = False,
    ):
        super().__init__()
        check_int("AMDIMEncoder", "image_channels", image_channels, 1)
        check_int("AMDIMEncoder", "encoder_feature_dim", encoder_feature_dim, 1)
        check_int("AMDIMEncoder", "embedding_fx_dim", embedding_fx_dim, 1)
        check_int("AMDIMEncoder", "conv_block_depth", conv_block_depth, 0)
        check_int("AMDIMEncoder", "image_height", image_height, 1)
        if image_height < MIN_IMAGE_SIZE:
            raise ValueError(
                f"AMDIMEncoder: image_height={image_height} is too small: the 7x7 map needs images of at least "
                f"{MIN_IMAGE_SIZE} px; resize the images or use a ResNet encoder"
            )
        if not isinstance(use_bn, bool):
            raise TypeError(f"AMDIMEncoder: use_bn must be True or False, got {use_bn!r}")
        w = encoder_feature_dim
        self.image_height = image_height
        self.stem = nn.Sequential(nn.Conv2d(image_channels, w, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(ResidualConvBlock(w, 2 * w, 4, 2, 1, use_bn), ResidualConvBlock(2 * w, 4 * w, 4, 2, 1, use_bn))
        self.blocks7 = nn.Sequential(*[ResidualConvBlock(4 * w, 4 * w, 1, 1, 0, use_bn) for _ in range(conv_block_depth)])
        self.to5 = ResidualConvBlock(4 * w, 4 * w, 3, 1, 0, use_bn)
        self.to1 = ResidualConvBlock(4 * w, 4 * w, 5, 1, 0, use_bn)
        self.embed = nn.ModuleList(EmbeddingHead(4 * w, embedding_fx_dim, use_bn) for _ in MAP_SIZES)
        self.feature_dim = 4 * w
        self.embedding_dim = embedding_fx_dim
        self.map_sizes = MAP_SIZES

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[-1] != self.image_height or x.shape[-2] != self.image_height:
            raise ValueError(
                f"AMDIMEncoder: expected images (N, C, {self.image_height}, {self.image_height}), got {tuple(x.shape)}; "
                f"set image_height to the images' side"
            )
        h = self.down(self.stem(x))
        if h.shape[-1] != 7:
            h = adaptive_avg_pool2d(h, 7)
        h7 = self.blocks7(h)
        h5 = self.to5(h7)
        h1 = self.to1(h5)
        return h1, h5, h7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's 1x1 features (N, feature_dim): what downstream evaluation uses."""
        return self._trunk(x)[0].flatten(start_dim=1)

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embedded maps (1x1, 5x5, 7x7), each (N, embedding_fx_dim, s, s)."""
        return tuple(head(h) for head, h in zip(self.embed, self._trunk(x)))
