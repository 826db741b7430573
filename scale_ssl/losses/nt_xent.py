"""NT-Xent, the normalised-temperature cross-entropy of SimCLR, over the *global* batch.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709), eq. (1).

For a global batch of B images seen as two views, the 2B normalised embeddings u_1..u_{2B} give
sim(i, k) = <u_i, u_k> / T, and for every anchor i with positive p(i) (the other view of the same
image):

    l_i = -log( exp(sim(i, p(i))) / sum_{k != i} exp(sim(i, k)) )
    L   = (1 / 2B) * sum_i l_i

Distributed form: each rank holds b = B / N images. It gathers both views from every rank (one
gather of ``[z1 | z2]``), computes l_i for its own 2b anchors against all 2B candidates with its
own self-similarities masked, and returns the mean over its anchors. The mean of that value over
ranks is exactly L, and with the gather's summed backward plus the strategy's gradient averaging
the gradients equal those of one process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import Collective, default_collective


class NTXentLoss(nn.Module):
    """Global NT-Xent: ``loss(z1, z2)`` with z1, z2 of shape (b, d), row i of each a view of image i.

    Args:
        temperature: T in the formula; must be > 0. SimCLR uses 0.1 at batch 4096 and 0.5 on
            CIFAR-sized runs.
        collective: the world to gather over. ``None`` (the default) means the default process
            group when one is initialised, else a world of one: the loss is global wherever it
            can be, never silently local.
        gather: set False only to measure the local-negatives baseline; the result is then not
            the SimCLR loss of the global batch.
    """

    def __init__(self, temperature: float = 0.5, collective: Collective | None = None, gather: bool = True):
        super().__init__()
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
            raise ValueError(f"NTXentLoss: temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.collective = collective
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(
                f"NTXentLoss: z1 and z2 must both be (batch, dim) with equal shapes, got "
                f"{tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        collective = self.collective or default_collective()
        b, d = z1.shape
        # Compute in fp32 whatever the autocast dtype: the 2B-way softmax loses too much in bf16.
        with torch.autocast(device_type=z1.device.type, enabled=False):
            local = F.normalize(torch.cat([z1.float(), z2.float()], dim=1).view(b, 2, d), dim=2).view(b, 2 * d)
            both = collective.all_gather(local, grad=True) if self.gather else local
            world_b = both.shape[0]
            candidates = torch.cat([both[:, :d], both[:, d:]], dim=0)  # (2B, d): all view-1 rows, then view-2
            anchors = torch.cat([local[:, :d], local[:, d:]], dim=0)  # (2b, d)
            logits = anchors @ candidates.t() / self.temperature  # (2b, 2B)

            offset = collective.rank_offset(b, device=z1.device) if self.gather else torch.zeros((), dtype=torch.long, device=z1.device)
            rows = torch.arange(b, device=z1.device) + offset  # global image index of each local row
            self_idx = torch.cat([rows, rows + world_b])
            positive_idx = torch.cat([rows + world_b, rows])
            anchor_idx = torch.arange(2 * b, device=z1.device)
            logits = logits.index_put((anchor_idx, self_idx), torch.tensor(float("-inf"), device=z1.device))
            return F.cross_entropy(logits, positive_idx)
