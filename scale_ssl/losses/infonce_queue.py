"""InfoNCE against a queue of negative keys: the MoCo loss.

He, Fan, Wu, Xie, Girshick. "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020 (arXiv:1911.05722), eq. (1); Chen, Fan, Girshick, He. "Improved Baselines with Momentum
Contrastive Learning" (MoCo v2), 2020 (arXiv:2003.04297).

For a query q (one view through the online encoder), its key k+ (the other view through the
momentum encoder) and the K negative keys k_1..k_K of the queue, all L2-normalised:

    l = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_i exp(q.k_i / T)) )

averaged over the batch: a (K+1)-way classification whose right answer is index 0. The queue is
global (the same on every rank), each rank scores its own queries, and the strategy averages the
gradients, so N ranks x b equal one process on N x b queries with the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCEQueueLoss(nn.Module):
    """``loss(q, k, queue)`` with q, k (b, d) and queue (K, d); returns ``(loss, top1)`` where
    ``top1`` is the share of queries whose positive key beats every negative (no gradient).

    Args:
        temperature: T, > 0 (MoCo v2: 0.2; pl_bolts' default 0.07 is MoCo v1's).
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"InfoNCEQueueLoss: temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dim() != 2 or q.shape != k.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"InfoNCEQueueLoss: q and k must be (batch, dim) and queue (negatives, dim) with the same dim, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
            )
        # fp32 whatever the autocast dtype: a 65537-way softmax at T = 0.07 needs it.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1).detach()
            positive = (q * k).sum(dim=1, keepdim=True)
            negative = q @ queue.detach().float().t()
            logits = torch.cat([positive, negative], dim=1) / self.temperature
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss = F.cross_entropy(logits, target)
            top1 = (logits.detach().argmax(dim=1) == 0).float().mean()
        return loss, top1
