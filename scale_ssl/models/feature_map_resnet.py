"""A torchvision ResNet as a multi-scale feature-map encoder, for AMDIM's contrastive task.

``encoder(x)`` is the ResNet's pooled output (N, feature_dim), exactly what
``build_resnet_encoder`` gives; ``encoder.feature_maps(x)`` adds AMDIM-style embedded maps
(see ``scale_ssl.models.amdim_encoder.EmbeddingHead``) of

    map 0: the pooled layer4 output (1x1)
    map 1: the layer4 output        (e.g. 4x4 on 28 px with the small-image stem)
    map 2: the layer3 output        (e.g. 7x7)

so comparisons such as "01, 02, 11" mean the same thing as with the AMDIM encoder (global vs
coarse vs fine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.models.amdim_encoder import EmbeddingHead
from scale_ssl.models.resnet import build_resnet_encoder


class ResNetFeatureMaps(nn.Module):
    def __init__(self, arch: str, in_channels: int = 3, embedding_dim: int = 128, first_conv: bool = False,
                 maxpool1: bool = False, use_bn: bool = True):
        super().__init__()
        self.trunk, self.feature_dim = build_resnet_encoder(arch, in_channels=in_channels, first_conv=first_conv, maxpool1=maxpool1)
        layer3_width = self.trunk.layer4[0].conv1.in_channels
        self.embed = nn.ModuleList([
            EmbeddingHead(self.feature_dim, embedding_dim, use_bn),
            EmbeddingHead(self.feature_dim, embedding_dim, use_bn),
            EmbeddingHead(layer3_width, embedding_dim, use_bn),
        ])
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.trunk
        h = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        h3 = t.layer3(t.layer2(t.layer1(h)))
        h4 = t.layer4(h3)
        return self.embed[0](F.adaptive_avg_pool2d(h4, 1)), self.embed[1](h4), self.embed[2](h3)
