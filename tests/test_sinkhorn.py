"""distributed_sinkhorn on real gloo ranks equals one process on the concatenated scores; it is
the swav iteration; it stays finite for bf16 scores x100; its marginals approach uniform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scale_ssl.collectives import TorchDistributedCollective
from scale_ssl.losses import distributed_sinkhorn, prototype_marginal_deviation
from tests.distributed import run_on_ranks

GLOBAL_ROWS, PROTOTYPES, DIM = 96, 40, 16
ABS_TOL = 1e-6  # fp32, on assignments in [0, 1]


def cosine_scores(seed: int = 0, rows: int = GLOBAL_ROWS, scale: float = 1.0) -> torch.Tensor:
    """What SwAV feeds Sinkhorn: normalised embeddings x normalised prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, DIM, generator=g), dim=1)
    c = F.normalize(torch.randn(PROTOTYPES, DIM, generator=g), dim=1)
    return scale * (z @ c.t())


def swav_reference(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """facebookresearch/swav's multiplicative form, in fp64, one process (for moderate scores)."""
    q = torch.exp(scores.double() / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def _rank_sinkhorn(rank, world, scores, dtype_name):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    collective = TorchDistributedCollective()
    rows = scores.shape[0] // world
    local = scores[rank * rows : (rank + 1) * rows].to(getattr(torch, dtype_name))
    return distributed_sinkhorn(local, iterations=3, epsilon=0.05, collective=collective)


def test_matches_the_swav_iteration_on_one_process():
    scores = cosine_scores()
    diff = (distributed_sinkhorn(scores).double() - swav_reference(scores)).abs().max().item()
    assert diff < ABS_TOL


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_n_ranks_equal_one_process_on_the_concatenated_scores(world):
    scores = cosine_scores(seed=world)
    single = distributed_sinkhorn(scores)
    parts = run_on_ranks(_rank_sinkhorn, world, scores, "float32")
    distributed = torch.cat(parts)
    diff = (distributed - single).abs().max().item()
    print(f"sinkhorn {world} ranks vs 1 process: max abs diff {diff:.2e}")
    assert diff <= ABS_TOL
    torch.testing.assert_close(distributed.sum(dim=1), torch.ones(GLOBAL_ROWS), atol=1e-5, rtol=0)
    # columns ~uniform over the global batch: every prototype gets B/K of the mass, to within
    # what 3 iterations achieve on these scores
    assert prototype_marginal_deviation(distributed).item() < 0.3


@pytest.mark.timeout(180)
def test_bf16_scores_times_100_stay_finite_and_distributed():
    """Scores x100 with eps 0.05 span thousands of nats: plain exp overflows (and per-rank or
    per-column underflow gives 0/0). The global max and log domain keep every row a distribution."""
    scores = cosine_scores(seed=3, scale=100.0).bfloat16()
    assert not torch.isfinite(torch.exp(scores.float() / 0.05)).all()  # the naive form would break
    single = distributed_sinkhorn(scores)
    parts = torch.cat(run_on_ranks(_rank_sinkhorn, 2, scores.float(), "bfloat16"))
    for q in (single, parts):
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(GLOBAL_ROWS), atol=1e-5, rtol=0)
    assert (parts - single).abs().max().item() <= ABS_TOL


def test_more_iterations_approach_equipartition():
    scores = cosine_scores()
    deviations = [prototype_marginal_deviation(distributed_sinkhorn(scores, n)).item() for n in (1, 3, 10, 50)]
    assert deviations == sorted(deviations, reverse=True)
    assert deviations[-1] < 1e-4


def test_fp64_option_and_no_gradient():
    scores = cosine_scores().requires_grad_()
    q = distributed_sinkhorn(scores, dtype=torch.float64)
    assert q.dtype == torch.float64 and not q.requires_grad
    assert (q - swav_reference(scores.detach())).abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [({"iterations": 0}, "iterations must be an int >= 1"), ({"epsilon": 0.0}, "epsilon must be a number > 0"),
     ({"dtype": torch.bfloat16}, "dtype must be torch.float32 or torch.float64")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed_sinkhorn(cosine_scores(), **kwargs)


def test_nan_scores_are_an_error():
    scores = cosine_scores()
    scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        distributed_sinkhorn(scores)
