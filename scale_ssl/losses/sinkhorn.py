"""Sinkhorn-Knopp over the *global* batch: SwAV's equipartitioned soft assignment to prototypes.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020 (arXiv:2006.09882), sec. 3.1 and appendix A.1;
Cuturi, "Sinkhorn Distances", NeurIPS 2013 (arXiv:1306.0895).

Given scores s_bk = <z_b, c_k> for B samples (over all ranks) and K prototypes, find

    Q* = argmax_{Q in Q} Tr(Q^T S) + eps H(Q),
    Q  = { Q in R_+^{B x K} : Q 1_K = 1_B / B,  Q^T 1_B = 1_K / K }

i.e. every sample spreads unit mass over the prototypes and every prototype receives an equal
share B/K of the batch. Starting from log Q = S / eps, each iteration rescales

    prototypes:  log Q_bk -= logsumexp_b' (log Q_b'k) + log K        (sum over the GLOBAL batch)
    samples:     log Q_bk -= logsumexp_k' (log Q_bk') + log B        (local: one row, one rank)

and the result is returned as B * Q, whose rows sum to 1 (the soft codes the loss predicts).

Distributed form: the prototype step sums over every rank's rows, so it is the only place that
communicates: an all-reduce of the per-prototype maximum and one of the per-prototype sum of
``exp(log Q - max)`` (a K-vector each). B is all-reduced once. Everything else is row-local, so N
ranks produce exactly (to float round-off) the assignment one process computes on the
concatenated scores.

Numerics: the iteration runs in the log domain, always in fp32 (or fp64 if asked) whatever the
autocast dtype. The maxima it subtracts before ``exp`` are global (all-reduced), so no rank's
rows overflow or underflow on their own, and a column whose scores all sit thousands of units
below another's (bf16 scores x 100 with eps = 0.05) still gets a proper distribution instead of
the 0 / 0 = NaN of the plain multiplicative form. Mathematically this is the same iteration as
swav's ``distributed_sinkhorn`` (the first division by the total sum there cancels in the first
prototype step).
"""

from __future__ import annotations

import math

import torch

from scale_ssl.collectives import Collective, default_collective


def _global_logsumexp_over_rows(log_q: torch.Tensor, collective: Collective) -> torch.Tensor:
    """logsumexp over the rows of every rank, per column: (b, K) -> (K,)."""
    column_max = collective.all_reduce(log_q.max(dim=0).values, op="max")
    column_sum = collective.all_reduce((log_q - column_max).exp().sum(dim=0), op="sum")
    return column_max + column_sum.log()


@torch.no_grad()
def distributed_sinkhorn(
    scores: torch.Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    collective: Collective | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Soft assignments (b, K) of this rank's b rows of ``scores`` to K prototypes, computed as if
    one process held every rank's rows (see the module docstring). Each returned row sums to 1.

    Args:
        scores: (b, K) similarities of this rank's samples (and queue rows) to the prototypes.
            Ranks may hold different numbers of rows. No gradient flows through the result.
        iterations: Sinkhorn-Knopp iterations, >= 1 (SwAV: 3).
        epsilon: entropic regularisation, > 0 (SwAV: 0.05); smaller is sharper.
        collective: the world to sum over; ``None``: the default process group if initialised,
            else a world of one.
        dtype: compute dtype, ``torch.float32`` or ``torch.float64``.
    """
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"distributed_sinkhorn: scores must be (rows, prototypes), got shape {tuple(scores.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"distributed_sinkhorn: iterations must be an int >= 1, got {iterations!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"distributed_sinkhorn: epsilon must be a number > 0 (SwAV uses 0.05), got {epsilon!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"distributed_sinkhorn: dtype must be torch.float32 or torch.float64, got {dtype}")
    collective = collective or default_collective()
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_q = scores.detach().to(dtype) / epsilon
        # On XLA this check would be a device-to-host read in the middle of the step (one more graph
        # executed per step, outside the step's sync); there a NaN score instead reaches the loss,
        # which the trainer's non-finite check reads at the log interval.
        if log_q.device.type != "xla" and not torch.isfinite(log_q).all():
            raise ValueError("distributed_sinkhorn: scores contain NaN or inf; check the model outputs")
        num_prototypes = log_q.shape[1]
        total_rows = collective.all_reduce(torch.tensor(float(log_q.shape[0]), dtype=dtype, device=log_q.device))
        log_k, log_b = math.log(num_prototypes), total_rows.log()
        # Global max first: every rank then works on the same scale, and exp never overflows.
        log_q = log_q - collective.all_reduce(log_q.max(), op="max")
        for _ in range(iterations):
            log_q = log_q - (_global_logsumexp_over_rows(log_q, collective) + log_k)
            log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_b)
        return (log_q + log_b).exp()


@torch.no_grad()
def prototype_marginal_deviation(assignments: torch.Tensor, collective: Collective | None = None) -> torch.Tensor:
    """max_k | K * (mean over the global rows of Q_.k) - 1 |: how far the assignment of the whole
    (global) set of rows is from using every prototype equally; 0 is a perfect equipartition."""
    collective = collective or default_collective()
    q = assignments.detach().float()
    column_sum = collective.all_reduce(q.sum(dim=0), op="sum")
    rows = collective.all_reduce(torch.tensor(float(q.shape[0]), device=q.device))
    return (q.shape[1] * column_sum / rows - 1).abs().max()
