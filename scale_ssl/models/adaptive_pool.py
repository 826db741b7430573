"""Adaptive average pooling that traces into one XLA program whatever the sizes.

``F.adaptive_avg_pool2d`` maps an (h, w) map to (p, q) by averaging, for output row i, input rows
[floor(i h / p), ceil((i + 1) h / p)) (and likewise for columns). torch_xla lowers it only when p
divides h and q divides w; otherwise (AMDIM's 7 -> 5 shortcut, a 32 px image's 8 -> 7 trunk) it
falls back to the host: the step's pending graph runs there, mid-step, its result is copied to the
host, pooled and copied back. That splits every training step into several programs, and with the
replicas' collectives inside the pending graph it is no longer one program per step.

The pooling is linear, so it is written as two small averaging matrices:

    y[n, c] = A_h x[n, c] A_w^T,   A_h[i, r] = 1 / |R_i| if r in R_i else 0,   R_i = the rows above

which every backend traces as ordinary matmuls (the same values up to summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _averaging_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in): row i averages the input positions adaptive pooling assigns to output i."""
    i = torch.arange(size_out, device=like.device)
    start = (i * size_in) // size_out
    end = ((i + 1) * size_in + size_out - 1) // size_out
    j = torch.arange(size_in, device=like.device)
    inside = (j.view(1, -1) >= start.view(-1, 1)) & (j.view(1, -1) < end.view(-1, 1))
    return inside.to(like.dtype) / (end - start).view(-1, 1).to(like.dtype)


def adaptive_avg_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """Same as ``F.adaptive_avg_pool2d(x, output_size)`` for (N, C, H, W) input."""
    p, q = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = x.shape[-2:]
    if h % p == 0 and w % q == 0:
        return F.adaptive_avg_pool2d(x, (p, q))
    return torch.einsum("ih,nchw,jw->ncij", _averaging_matrix(h, p, x), x, _averaging_matrix(w, q, x))
