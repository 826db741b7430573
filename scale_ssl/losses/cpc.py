"""CPC's InfoNCE over future patch rows, with negatives from the *global* batch.

Oord, Li, Vinyals. "Representation Learning with Contrastive Predictive Coding", 2018
(arXiv:1807.03748), eq. (4); Hénaff et al. "Data-Efficient Image Recognition with Contrastive
Predictive Coding" (CPC v2), ICML 2020 (arXiv:1905.09272), sec. 3.

The encoder turns each image into a grid of patch vectors z (b, C, h, w) (row r, column c). A
causal context network g gives c_{r,c} = g(z)_{r,c}, which depends only on rows <= r. For every
offset k in ``steps_to_ignore .. steps_to_ignore + steps_to_predict - 1`` the prediction
p^k_{r,c} = embed_scale * W_k c_{r,c} scores every target t = T z (a 1x1 conv) of the global batch:

    l^k_{i,r,c} = -log( exp(<p^k_{i,r,c}, t_{i,r+k,c}>) / sum_{j,r',c'} exp(<p^k_{i,r,c}, t_{j,r',c'}>) )
    L = mean_k mean_{i,r,c : r+k < h} l^k_{i,r,c}

The positive is the patch k rows below in the same image; every other patch vector of every image
of the global batch (including the other patches of the same image) is a negative. Offsets below
``steps_to_ignore`` are skipped: with overlapping patches the next row shares pixels with the
context and is trivial to predict.

Distributed form: each rank gathers the targets of all ranks (differentiable gather), scores its own
predictions against all B*h*w of them, and offsets its labels by ``collective.rank_offset``. Every
rank has the same number of predictions per offset, so the mean of the per-rank losses is the
one-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.checks import check_int
from scale_ssl.collectives import Collective, default_collective


class CausalRowConv(nn.Conv2d):
    """A k x k convolution whose output row r sees input rows r-k+1 .. r only (zero padding on top
    and both sides, none below): the masking that keeps the context from seeing the future rows."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        self.pad = (kernel_size // 2, kernel_size // 2, kernel_size - 1, 0)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class CausalContextBlock(nn.Module):
    """Residual block x + W_2 ReLU(CausalConv(ReLU(W_1 x))) (1x1 convs around a causal 3x3 conv),
    a PixelCNN-style stack without gating: row r of the output depends on rows <= r."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.causal = CausalRowConv(hidden, hidden, 3)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(F.relu(self.causal(F.relu(self.reduce(x)))))


class CPCTask(nn.Module):
    """``task(z)`` for a patch-vector grid z of shape (b, C, h, w) -> scalar InfoNCE loss.

    Args:
        num_input_channels: C, the encoder's patch feature width.
        target_dim: width of the target and prediction embeddings (CPC v2 code: 64).
        embed_scale: scale of the predictions before the dot product (pl_bolts: 0.1), which keeps
            the initial logits small.
        steps_to_ignore: the first offset predicted (offsets 1 .. steps_to_ignore-1 are skipped).
        steps_to_predict: how many offsets, from ``steps_to_ignore`` on, are predicted.
        context_blocks: depth of the causal context network.
        collective: the world to gather negatives over; ``None`` means the default process group
            when one is initialised, else a world of one.
    """

    def __init__(
        self,
        num_input_channels: int,
        target_dim: int = 64,
        embed_scale: float = 0.1,
        steps_to_ignore: int = 2,
        steps_to_predict: int = 3,
        context_blocks: int = 2,
        collective: Collective | None = None,
    ):
        super().__init__()
        check_int("CPCTask", "num_input_channels", num_input_channels, 1)
        check_int("CPCTask", "target_dim", target_dim, 1)
        self.steps_to_ignore = check_int("CPCTask", "steps_to_ignore", steps_to_ignore, 1)
        self.steps_to_predict = check_int("CPCTask", "steps_to_predict", steps_to_predict, 1)
        check_int("CPCTask", "context_blocks", context_blocks, 1)
        if isinstance(embed_scale, bool) or not isinstance(embed_scale, (int, float)) or embed_scale <= 0:
            raise ValueError(f"CPCTask: embed_scale must be a positive number, got {embed_scale!r}")
        self.num_input_channels = num_input_channels
        self.embed_scale = float(embed_scale)
        self.collective = collective
        hidden = max(1, num_input_channels // 2)
        self.context = nn.Sequential(*[CausalContextBlock(num_input_channels, hidden) for _ in range(context_blocks)])
        self.target = nn.Conv2d(num_input_channels, target_dim, 1)
        self.predictors = nn.ModuleList(nn.Conv2d(num_input_channels, target_dim, 1) for _ in range(steps_to_predict))

    @property
    def offsets(self) -> range:
        return range(self.steps_to_ignore, self.steps_to_ignore + self.steps_to_predict)

    def check_grid(self, grid_height: int, owner: str = "CPCTask") -> None:
        # Every offset must fit: a predictor that never runs would leave DDP waiting for its gradient.
        last = self.offsets[-1]
        if grid_height <= last:
            raise ValueError(
                f"{owner}: the patch grid has {grid_height} rows, but the task predicts up to {last} rows below "
                f"(steps_to_ignore={self.steps_to_ignore} + steps_to_predict={self.steps_to_predict} - 1); lower "
                f"steps_to_predict or steps_to_ignore, or use smaller patches / more overlap"
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.num_input_channels:
            raise ValueError(
                f"CPCTask: expected a patch grid (batch, {self.num_input_channels}, rows, cols), got {tuple(z.shape)}"
            )
        b, _, h, w = z.shape
        self.check_grid(h)
        collective = self.collective or default_collective()
        with torch.autocast(device_type=z.device.type, enabled=False):
            # The task's own parameters set the convolutions' precision: fp32 normally (a bf16 grid
            # from autocast is raised), float64 in gradient checks, bf16 where an engine cast the
            # whole module (DeepSpeed bf16). The scores and the softmax run in at least fp32.
            weights_dtype = self.target.weight.dtype
            scores_dtype = torch.promote_types(weights_dtype, torch.float32)
            z = z.to(weights_dtype)
            context = self.context(z)
            targets = self.target(z).permute(0, 2, 3, 1).contiguous()  # (b, h, w, T)
            candidates = collective.all_gather(targets, grad=True).reshape(-1, targets.shape[-1]).to(scores_dtype)
            first_image = torch.arange(b, device=z.device) + collective.rank_offset(b, device=z.device)
            losses = []
            for k, predictor in zip(self.offsets, self.predictors):
                predictions = (self.embed_scale * predictor(context[:, :, : h - k])).permute(0, 2, 3, 1)  # (b, h-k, w, T)
                logits = predictions.reshape(-1, predictions.shape[-1]).to(scores_dtype) @ candidates.t()
                rows = torch.arange(h - k, device=z.device)
                cols = torch.arange(w, device=z.device)
                # Global index of patch (image i, row r + k, column c) in the gathered targets.
                labels = (first_image.view(b, 1, 1) * h * w + (rows.view(1, -1, 1) + k) * w + cols.view(1, 1, -1)).reshape(-1)
                losses.append(F.cross_entropy(logits, labels))
            return torch.stack(losses).mean()
