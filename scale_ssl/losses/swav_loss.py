"""The SwAV "swapped prediction" loss with multi-crop, over the global batch (and queue).

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020 (arXiv:2006.09882), eq. (1)-(3) and sec. 3.2.

For a batch of b images seen as V crops (2 global + V-2 local), with prototype scores
s^v_b = <z^v_b, c> / (one row of K per crop and image), for every crop a in ``crops_for_assign``:

    q^a     = Sinkhorn([scores of the queue ; s^a])[last b rows]       (no gradient; global)
    l^a     = -(1 / (V - 1)) sum_{v != a} mean_b sum_k q^a_bk log softmax_k(s^v_b / T)
    L       = mean over a of l^a

The codes q come from the global batch (plus the global queue, once full) through
``distributed_sinkhorn``; the predictions are local rows. The mean over b is local, and the
strategy averages gradients over ranks, so N ranks x b equal one process on N x b images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import Collective, default_collective
from scale_ssl.losses.sinkhorn import distributed_sinkhorn, prototype_marginal_deviation


class SwAVLoss(nn.Module):
    """``loss(scores, batch_size, queue_scores=None)``.

    ``scores`` is (V * b, K): the prototype scores of crop 0 of every image, then crop 1, ...;
    ``queue_scores`` (optional) holds one (q, K) tensor per entry of ``crops_for_assign``: the
    scores of this rank's queue rows, prepended to that crop's rows before Sinkhorn.

    Args:
        temperature: T of the softmax over prototypes, > 0 (SwAV: 0.1).
        crops_for_assign: indices of the crops whose codes are predicted (SwAV: the two global
            crops, (0, 1)).
        num_crops: crops per image per resolution, e.g. (2, 6); V = sum(num_crops).
        sinkhorn_iterations / epsilon: see ``distributed_sinkhorn``.
        collective: the world Sinkhorn sums over (``None``: default process group, else local).

    After each call, ``last_marginal_deviation`` holds the largest deviation of the Sinkhorn
    prototype marginals from uniform (``prototype_marginal_deviation``) over the assigned crops.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        crops_for_assign: Sequence[int] = (0, 1),
        num_crops: Sequence[int] = (2, 6),
        sinkhorn_iterations: int = 3,
        epsilon: float = 0.05,
        collective: Collective | None = None,
    ):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"SwAVLoss: temperature must be a number > 0 (SwAV: 0.1), got {temperature!r}")
        num_crops = tuple(num_crops)
        if not num_crops or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_crops):
            raise ValueError(f"SwAVLoss: num_crops must be a list of crop counts >= 0, e.g. [2, 6], got {list(num_crops)}")
        total = sum(num_crops)
        if total < 2:
            raise ValueError(f"SwAVLoss: num_crops={list(num_crops)} gives {total} crop(s); swapped prediction needs >= 2")
        crops_for_assign = tuple(crops_for_assign)
        if not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign) or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < total for c in crops_for_assign
        ):
            raise ValueError(
                f"SwAVLoss: crops_for_assign must be distinct crop indices in [0, {total}), e.g. [0, 1], "
                f"got {list(crops_for_assign)}"
            )
        self.temperature = float(temperature)
        self.crops_for_assign = crops_for_assign
        self.num_crops = num_crops
        self.total_crops = total
        self.sinkhorn_iterations = sinkhorn_iterations
        self.epsilon = epsilon
        self.collective = collective
        self.last_marginal_deviation: torch.Tensor | None = None

    def forward(
        self,
        scores: torch.Tensor,
        batch_size: int,
        queue_scores: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, v = batch_size, self.total_crops
        if scores.dim() != 2 or scores.shape[0] != v * b:
            raise ValueError(
                f"SwAVLoss: scores must be (num_crops * batch, prototypes) = ({v} * {b}, K), got {tuple(scores.shape)}"
            )
        if queue_scores is not None and len(queue_scores) != len(self.crops_for_assign):
            raise ValueError(
                f"SwAVLoss: queue_scores needs one tensor per crop in crops_for_assign ({len(self.crops_for_assign)}), "
                f"got {len(queue_scores)}"
            )
        collective = self.collective or default_collective()
        with torch.autocast(device_type=scores.device.type, enabled=False):
            scores = scores.float()
            log_predictions = F.log_softmax(scores / self.temperature, dim=1).view(v, b, -1)
            total, deviations = scores.new_zeros(()), []
            for i, crop in enumerate(self.crops_for_assign):
                with torch.no_grad():
                    rows = scores[crop * b : (crop + 1) * b]
                    if queue_scores is not None:
                        rows = torch.cat([queue_scores[i].float(), rows])
                    codes = distributed_sinkhorn(rows, self.sinkhorn_iterations, self.epsilon, collective)
                    deviations.append(prototype_marginal_deviation(codes, collective))
                    codes = codes[-b:]
                others = [u for u in range(v) if u != crop]
                cross_entropy = -(codes.unsqueeze(0) * log_predictions[others]).sum(dim=2).mean(dim=1)
                total = total + cross_entropy.mean()
            self.last_marginal_deviation = torch.stack(deviations).max()
            return total / len(self.crops_for_assign)
