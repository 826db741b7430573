"""DINO's projection head: an MLP to a bottleneck, L2-normalised, then a weight-normalised layer.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021 (arXiv:2104.14294), sec. 3.1 and appendix:

    u = W_3 GELU(W_2 GELU(W_1 h))                 3-layer MLP, hidden 2048, bottleneck 256
    z = u / ||u||_2
    g(h) = V' z,  V'_k = g_k v_k / ||v_k||_2     weight-normalised last layer (Salimans & Kingma
                                                 2016, arXiv:1602.07868), K = out_dim rows

The magnitudes g start at 1; with ``norm_last_layer`` (the paper's default) they stay frozen at
1, so every output is a cosine between z and a prototype direction v_k, which the paper found
stabilises training. BatchNorm in the MLP is off by default (a ViT backbone has none either,
so the whole student is free of batch statistics). The last layer is the one DINO freezes during
the first epoch (``DINO(freeze_last_layer=1)``): its parameters are ``last_layer.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """``head(h)`` maps (N, input_dim) features to (N, out_dim) logits (see the module docstring).

    Args:
        input_dim: the backbone's feature width.
        out_dim: K, the number of output dimensions the softmaxes run over (paper: 65536).
        hidden_dim / bottleneck_dim: MLP widths (paper: 2048 / 256).
        num_layers: Linear layers of the MLP, >= 1 (paper: 3; 1 is a single Linear to the bottleneck).
        use_bn: BatchNorm1d after every hidden Linear (the paper's ResNet-50 runs use it).
        norm_last_layer: keep the last layer's weight-norm magnitudes frozen at 1.
    """

    def __init__(
        self,
        input_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive int, got {value!r}")
        self.input_dim = input_dim
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):  # the paper's initialisation (truncated normal, std 0.02)
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.input_dim:
            raise ValueError(
                f"DINOHead: expected features of shape (batch, {self.input_dim}), got {tuple(features.shape)}"
            )
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))
