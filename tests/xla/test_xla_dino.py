"""DINO's center on XLA devices (threads of one process, with the test-only sync shim): the
teacher-logit sum is all-reduced over the replicas, so N devices x b equal one process x N*b on
the loss, the reduced gradients and the center, step after step (the TPU config's claim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scale_ssl.collectives import LocalCollective
from scale_ssl.losses import DINOLoss
from tests.xla.replicas import run_replicas

pytestmark = pytest.mark.xla

K, B, CROPS, STEPS = 24, 8, (2, 2), 3
REL_TOL = 1e-5  # fp32, as the gloo test (tests/test_dino.py)


def _data() -> dict:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, K))
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(sum(CROPS), B, 6, generator=g), 3 * torch.randn(CROPS[0], B, K, generator=g)) for _ in range(STEPS)]
    return {"state": model.state_dict(), "steps": steps, "out_dim": K, "global_crops": CROPS[0]}


def _reference(data: dict) -> list[dict]:
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, K))
    model.load_state_dict(data["state"])
    loss_fn = DINOLoss(K, CROPS[0], collective=LocalCollective())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for inputs, teacher in data["steps"]:
        loss = loss_fn(model(inputs.reshape(-1, 6)), teacher.reshape(-1, K), 0.04)
        loss.backward()
        out.append({"loss": loss.item(), "center": loss_fn.center.clone(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        optimizer.step()
        optimizer.zero_grad()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices", [2, 4])
def test_dino_center_loss_and_gradients_on_xla_devices_equal_one_process(devices):
    data = _data()
    reference = _reference(data)
    replicas = run_replicas("dino_loss", devices, data)
    for r in replicas:
        for step, (got, ref) in enumerate(zip(r["steps"], reference)):
            assert got["mean_loss"].item() == pytest.approx(ref["loss"], rel=REL_TOL), (r["rank"], step)
            torch.testing.assert_close(got["center"], ref["center"], rtol=REL_TOL, atol=1e-7)
            scale = max(g.abs().max().item() for g in ref["grads"].values())
            diff = max((got["grads"][n] - ref["grads"][n]).abs().max().item() for n in ref["grads"]) / scale
            assert diff < REL_TOL, f"replica {r['rank']} step {step}: gradients differ by {diff:.2e} (relative)"
    assert reference[1]["center"].abs().max() > 0.1  # the center moved, and steps 2-3 used it
