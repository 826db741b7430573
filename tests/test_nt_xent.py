"""NT-Xent: the plain formula at world size 1, and N gloo ranks x b == 1 process x N*b."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scale_ssl.collectives import Collective, LocalCollective, TorchDistributedCollective
from scale_ssl.losses import NTXentLoss
from tests.distributed import run_on_ranks

# fp32 equivalence tolerance, relative to the largest gradient entry (issue: 1e-5 relative).
REL_TOL = 1e-5


def plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. (1) written out anchor by anchor, in float64, as an independent reference."""
    u = torch.cat([z1, z2]).double()
    u = u / u.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [(u[i] @ u[k]) / temperature for k in range(2 * n)]
        denominator = sum(torch.exp(sims[k]) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(sims[positive]) / denominator)
    return total / (2 * n)


def test_reference_value_from_the_literature():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    assert NTXentLoss(temperature=0.5)(z1, z2).item() == pytest.approx(2.5931916237, abs=2e-7)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_world_one_equals_plain_formula_value_and_gradient(temperature):
    torch.manual_seed(1)
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ours = NTXentLoss(temperature, collective=LocalCollective())(z1, z2)
    g1, g2 = torch.autograd.grad(ours, (z1, z2))
    ref = plain_nt_xent(z1, z2, temperature)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g1.double(), r1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2.double(), r2, rtol=1e-5, atol=1e-7)


def test_local_only_loss_is_not_the_global_loss():
    torch.manual_seed(2)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    full = NTXentLoss(0.5, collective=LocalCollective())(z1, z2)
    halves = (NTXentLoss(0.5, collective=LocalCollective())(z1[:4], z2[:4]) + NTXentLoss(0.5, collective=LocalCollective())(z1[4:], z2[4:])) / 2
    assert abs(full.item() - halves.item()) > 1e-3


@pytest.mark.parametrize("bad", [0, -1.0, "0.5", None, True])
def test_bad_temperature_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        NTXentLoss(temperature=bad)


def test_mismatched_views_are_a_clear_error():
    with pytest.raises(ValueError, match="equal shapes"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------
# N ranks x b == 1 process x N*b
# ---------------------------------------------------------------------------------------------

GLOBAL_BATCH = 16


class TinyEncoderHead(nn.Module):
    """Conv encoder + 2-layer projection; no BatchNorm, so per-rank statistics cannot differ."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.head(self.encoder(x))


def make_problem():
    torch.manual_seed(123)
    model = TinyEncoderHead()
    x1 = torch.randn(GLOBAL_BATCH, 3, 8, 8)
    x2 = x1 + 0.3 * torch.randn(GLOBAL_BATCH, 3, 8, 8)
    return model, x1, x2


def single_process_reference(temperature: float = 0.2):
    model, x1, x2 = make_problem()
    loss = NTXentLoss(temperature, collective=LocalCollective())(model(x1), model(x2))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


class SliceOnlyGatherCollective(TorchDistributedCollective):
    """A deliberately wrong gather: its backward returns this rank's slice without summing over
    ranks (the bug of pytorch/xla#5784 and lightly #1528). The equivalence test must catch it."""

    def all_gather(self, tensor, grad=True):
        full = super().all_gather(tensor.detach(), grad=False)
        rows = tensor.shape[0]
        start = self.rank * rows
        # Keep the forward value; route the gradient of this rank's rows only to the local tensor.
        return torch.cat([full[:start], tensor, full[start + rows :]], dim=0)


def _ddp_rank(rank: int, world_size: int, temperature: float, wrong_gather: bool):
    from scale_ssl.strategies import DDPStrategy

    strategy = DDPStrategy(accelerator="cpu")
    strategy.setup_environment()
    model, x1, x2 = make_problem()
    wrapped = strategy.setup_module(model)
    b = GLOBAL_BATCH // world_size
    sl = slice(rank * b, (rank + 1) * b)
    collective: Collective | None = SliceOnlyGatherCollective() if wrong_gather else None  # None: default group
    loss = NTXentLoss(temperature, collective=collective)(wrapped(x1[sl]), wrapped(x2[sl]))
    strategy.backward(loss)
    mean_loss = strategy.reduce(loss.detach(), op="mean").item()
    return mean_loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_rel_diff(grads, ref) -> float:
    scale = max(g.abs().max().item() for g in ref.values())
    return max((grads[n] - ref[n]).abs().max().item() for n in ref) / scale


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_ranks_equal_one_process_on_the_concatenated_batch(world_size):
    ref_loss, ref_grads = single_process_reference()
    results = run_on_ranks(_ddp_rank, world_size, 0.2, False)
    for rank, (loss, grads) in enumerate(results):
        assert math.isclose(loss, ref_loss, rel_tol=REL_TOL), (rank, loss, ref_loss)
        diff = _max_rel_diff(grads, ref_grads)
        assert diff < REL_TOL, f"rank {rank}: gradient max rel diff {diff:.2e} >= {REL_TOL}"


@pytest.mark.timeout(180)
def test_the_equivalence_test_catches_a_gather_without_summed_backward():
    ref_loss, ref_grads = single_process_reference()
    results = run_on_ranks(_ddp_rank, 2, 0.2, True)
    loss, grads = results[0]
    assert math.isclose(loss, ref_loss, rel_tol=REL_TOL)  # forward is still right...
    assert _max_rel_diff(grads, ref_grads) > 100 * REL_TOL  # ...but the gradient is not
