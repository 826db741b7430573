"""The CPC v2 encoder: every patch of the image is encoded on its own into one vector.

Hénaff et al. "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020
(arXiv:1905.09272), sec. 3 and appendix A.2: the image is cut into overlapping patches
(``scale_ssl.data.patches``), a ResNet-style network maps each p x p patch to a vector z, and the
vectors form a g x g grid (N, D, g, g) that the contrastive task (CPC or AMDIM) works on. The paper
replaces BatchNorm by layer normalisation, because batch statistics over the patches of one image
let the network cheat; ``CPCPatchEncoder`` normalises each patch with GroupNorm(1, C) (layer norm
over channels and space).

``CPCEncoder(x)`` returns the grid averaged over patches (N, D): what kNN, linear probes and the
online evaluator use. ``CPCEncoder.feature_grid(x)`` is the (N, D, g, g) grid; ``feature_maps(x)``
is (1x1 mean, grid pooled to half its side, full grid), the maps an AMDIM task compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.data.patches import ImagePatches
from scale_ssl.models.adaptive_pool import adaptive_avg_pool2d


class _PatchResBlock(nn.Module):
    is_shard_block = True  # a unit of peak memory for sharding backends (strategies/fsdp_units.py)

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class CPCPatchEncoder(nn.Module):
    """(n, C, p, p) patches -> (n, 2 * width) vectors: 3x3 stem, ``depth`` residual blocks, a
    stride-2 3x3 conv to 2 * width, ``depth`` more blocks, global average pooling. Layer norm
    (GroupNorm with one group) everywhere, no BatchNorm."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 2):
        super().__init__()
        for name, value, minimum in (("in_channels", in_channels, 1), ("width", width, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"CPCPatchEncoder: {name} must be an int >= {minimum}, got {value!r}")
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(1, width), nn.ReLU(),
            *[_PatchResBlock(width) for _ in range(depth)],
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(1, 2 * width), nn.ReLU(),
            *[_PatchResBlock(2 * width) for _ in range(depth)],
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 2 * width

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layers(patches)


class CPCEncoder(nn.Module):
    """Images (N, C, H, H) -> patch grid -> pooled features. ``patch_encoder`` maps (n, C, p, p)
    to (n, D) (or (n, D, 1, 1)); ``feature_dim`` is D."""

    def __init__(self, patch_encoder: nn.Module, feature_dim: int, image_size: int, patch_size: int = 8, patch_overlap: int = 4):
        super().__init__()
        self.patches = ImagePatches(image_size, patch_size, patch_overlap)
        self.patch_encoder = patch_encoder
        self.feature_dim = feature_dim
        self.grid_size = self.patches.grid

    def feature_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, H) images -> (N, D, g, g): one vector per patch, in the patches' layout."""
        n, g = x.shape[0], self.grid_size
        patches = self.patches(x)  # (N, g, g, C, p, p)
        z = self.patch_encoder(patches.flatten(0, 2)).flatten(start_dim=1)  # (N*g*g, D)
        if z.shape[1] != self.feature_dim:
            raise ValueError(
                f"CPCEncoder: the patch encoder gave {z.shape[1]}-D vectors but feature_dim={self.feature_dim}"
            )
        # Contiguous NCHW: the task's convs then give gradients in the layout DDP's buckets expect.
        return z.view(n, g, g, self.feature_dim).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_grid(x).mean(dim=(2, 3))

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = self.feature_grid(x)
        return grid.mean(dim=(2, 3), keepdim=True), adaptive_avg_pool2d(grid, max(1, (self.grid_size + 1) // 2)), grid
