"""SimSiam's symmetric negative cosine similarity with stop-gradient.

Chen, He. "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv:2011.10566), eq. (1)-(2):

    D(p, z) = - cos(p, sg(z))
    L       = D(p_1, z_2) / 2 + D(p_2, z_1) / 2          (mean over the batch)

The stop-gradient on z is what keeps SimSiam from collapsing (paper, sec. 4.1). Per-sample terms:
the strategy's gradient averaging makes N ranks x b equal one process on N x b; no gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NegativeCosineLoss(nn.Module):
    """``loss(p1, p2, z1, z2)``: p from the predictor, z from the projector (detached here)."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if not (p1.shape == p2.shape == z1.shape == z2.shape) or p1.dim() != 2:
            raise ValueError(
                f"NegativeCosineLoss: p1, p2, z1, z2 must all be (batch, dim), got "
                f"{[tuple(t.shape) for t in (p1, p2, z1, z2)]}"
            )
        with torch.autocast(device_type=p1.device.type, enabled=False):
            def d(p, z):
                return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()

            return d(p1, z2) / 2 + d(p2, z1) / 2
