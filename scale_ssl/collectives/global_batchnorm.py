"""BatchNorm whose statistics are those of the global batch, over any ``Collective``.

SimCLR's "global BN" (Chen et al. 2020, sec. 3): with per-device statistics a contrastive model
can tell which device a sample came from and cheat (google-research/simclr #114). PyTorch's
``nn.SyncBatchNorm`` does this only on GPUs; this layer does it wherever a ``Collective`` runs
(gloo on CPU, XLA replicas), and is differentiable end to end.

Per channel, each rank contributes its count n_r, mean m_r and sum of squared deviations M2_r
(one differentiable all_gather of a (1, 2C+1) row). They combine exactly (Chan et al. 1979):

    N = sum_r n_r,   mean = sum_r n_r m_r / N,   M2 = sum_r (M2_r + n_r (m_r - mean)^2)
    y = (x - mean) / sqrt(M2 / N + eps) * weight + bias

The running variance uses the unbiased M2 / (N - 1), as ``nn.BatchNorm`` does. Where the ranks
are the parts of one dp step sharing one module (``PartsCollective``), part 0 alone updates the
running statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from scale_ssl.collectives.base import Collective


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d; normalises with global-batch statistics while training."""

    def __init__(self, num_features: int, collective: Collective | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.collective = collective

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        collective = self.collective
        if not self.training or collective is None or collective.world_size == 1:
            return self._local_forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input if input.dtype == torch.float64 else input.float()  # statistics in fp32 at least
        count = x.numel() // channels
        local_mean = x.mean(dim=dims)
        shape = [1, channels] + [1] * (input.dim() - 2)
        local_m2 = ((x - local_mean.view(shape)) ** 2).sum(dim=dims)
        row = torch.cat([local_mean, local_m2, local_mean.new_full((1,), float(count))]).unsqueeze(0)
        rows = collective.all_gather(row, grad=True)  # (world, 2C + 1)
        means, m2s, counts = rows[:, :channels], rows[:, channels : 2 * channels], rows[:, 2 * channels :]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(dim=0)
        var = m2 / total

        # Parts of one dp step update one set of buffers: once, not once per part.
        shared = getattr(collective, "replicas_share_buffers", False)
        if self.track_running_stats and (not shared or collective.rank == 0):
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = m2 / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))

        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


    def _local_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.BatchNorm``'s own forward, except where the affine parameters arrive in a lower
        precision than the running statistics: FSDP's ``MixedPrecisionPolicy(param_dtype=bf16)``
        casts parameters but not buffers, and ``batch_norm`` refuses bf16 weights with fp32
        running statistics. Then the kernel gets fp32 copies of weight and bias (mixed input
        dtypes are supported: a bf16 input stays bf16 at the output), and gradients flow back to
        the bf16 parameters through the casts."""
        if not (self.affine and self.running_mean is not None and self.weight.dtype != self.running_mean.dtype):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        dtype = self.running_mean.dtype
        return nn.functional.batch_norm(
            input, self.running_mean if keep_running else None, self.running_var if keep_running else None,
            self.weight.to(dtype), self.bias.to(dtype), use_batch_statistics, factor, self.eps,
        )


def convert_to_global_batchnorm(module: nn.Module, collective: Collective | None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a ``GlobalBatchNorm`` on ``collective``,
    keeping its parameters and running statistics. Returns the (possibly new) root module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, collective, eps=module.eps, momentum=module.momentum,
            affine=module.affine, track_running_stats=module.track_running_stats,
        )
        with torch.no_grad():
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            if module.track_running_stats:
                converted.running_mean = module.running_mean
                converted.running_var = module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        new_child = convert_to_global_batchnorm(child, collective)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
