"""BYOL's regression loss: predict the target network's projection of the other view.

Grill et al. "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020
(arXiv:2006.07733), eq. (2) and the symmetrised loss of sec. 3.1:

    l(p, z) = || p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)
    L       = mean_b [ l(p_1, sg(z'_2)) + l(p_2, sg(z'_1)) ]

p_v are the online predictions of view v, z'_v the target projections (no gradient: sg). Every
term is per sample, so the mean over a rank's rows plus the strategy's gradient averaging equals
one process on the global batch; nothing needs gathering.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BYOLLoss(nn.Module):
    """``loss(p1, p2, z1, z2)``: p from the online predictor, z from the target projector."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if not (p1.shape == p2.shape == z1.shape == z2.shape) or p1.dim() != 2:
            raise ValueError(
                f"BYOLLoss: p1, p2, z1, z2 must all be (batch, dim), got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}"
            )
        with torch.autocast(device_type=p1.device.type, enabled=False):
            def regression(p, z):
                return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)

            return (regression(p1, z2) + regression(p2, z1)).mean()
