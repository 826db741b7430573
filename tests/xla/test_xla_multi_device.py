"""Several XLA:CPU devices (threads of one process, with the test-only sync shim): N replicas x b
equal one process x N*b for the global NT-Xent loss and gradients, distributed Sinkhorn, and the
whole Trainer + SimCLR + global BatchNorm stack; replicas stay identical; no recompilation after
the first steps. Each run has a hard timeout: a hang fails the test with XLA's rendezvous message."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.collectives import LocalCollective
from scale_ssl.losses import NTXentLoss
from tests.xla.models import TinyContrastiveModule, TinyEncoderHead
from tests.xla.replicas import run_replicas

pytestmark = pytest.mark.xla

# fp32 tolerances relative to the largest entry (the gloo tests use the same 1e-5).
REL_TOL = 1e-5


def _max_rel_diff(a: dict, b: dict) -> float:
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b) / scale


def _nt_xent_data(global_batch: int = 16) -> dict:
    torch.manual_seed(0)
    model = TinyEncoderHead()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(global_batch, 1, 12, 12, generator=g)
    x2 = x1 + 0.3 * torch.randn(global_batch, 1, 12, 12, generator=g)
    return {"state": model.state_dict(), "x1": x1, "x2": x2}


def _nt_xent_reference(data: dict):
    model = TinyEncoderHead()
    model.load_state_dict(data["state"])
    loss = NTXentLoss(0.5, collective=LocalCollective())(model(data["x1"]), model(data["x2"]))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices", [2, 4])
def test_global_nt_xent_loss_and_gradients_equal_one_process(devices):
    data = _nt_xent_data()
    ref_loss, ref_grads = _nt_xent_reference(data)
    replicas = run_replicas("nt_xent", devices, data)
    assert [r["world"] for r in replicas] == [devices] * devices
    # One program for every replica: rank-dependent values entered the graph as data.
    assert len({r["graph_hash"] for r in replicas}) == 1
    local_mean = sum(r["loss"].item() for r in replicas) / devices
    assert local_mean == pytest.approx(ref_loss, rel=1e-6)
    for r in replicas:
        assert r["mean_loss"].item() == pytest.approx(ref_loss, rel=1e-6)
        diff = _max_rel_diff(r["grads"], ref_grads)
        assert diff < REL_TOL, f"replica {r['rank']}: gradients differ from one process by {diff:.2e} (relative)"
    print(f"\nNT-Xent on {devices} XLA devices: loss {local_mean:.8f} vs {ref_loss:.8f}; "
          f"max grad rel diff {max(_max_rel_diff(r['grads'], ref_grads) for r in replicas):.2e}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices", [2, 4])
def test_distributed_sinkhorn_equals_one_process(devices):
    from scale_ssl.losses.sinkhorn import distributed_sinkhorn

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(16, 10, generator=g)  # (global rows, prototypes)
    reference = distributed_sinkhorn(scores, iterations=3, epsilon=0.05, collective=LocalCollective())
    replicas = run_replicas("sinkhorn", devices, {"scores": scores})
    q = torch.cat([r["q"] for r in replicas])
    diff = (q - reference).abs().max().item()
    assert diff < 1e-5, f"Sinkhorn on {devices} XLA devices differs from one process by {diff:.2e}"
    print(f"\nSinkhorn on {devices} XLA devices: max abs diff {diff:.2e}")


def _simclr_data(global_batch: int = 16, steps: int = 5) -> dict:
    from scale_ssl.methods import SimCLR

    hparams = dict(arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=32, feat_dim=16,
                   temperature=0.5, optimizer="sgd", learning_rate=0.1, weight_decay=0.0, warmup_steps=0)
    torch.manual_seed(7)
    state = SimCLR(**hparams).state_dict()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(steps):
        x1 = torch.randn(global_batch, 1, 28, 28, generator=g)
        x2 = x1 + 0.5 * torch.randn(global_batch, 1, 28, 28, generator=g)
        batches.append(((x1, x2), torch.zeros(global_batch, dtype=torch.long)))
    return {"hparams": hparams, "state": state, "batches": batches, "sync_batchnorm": True}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("devices", [2, 4])
def test_trainer_replicas_stay_identical_and_do_not_recompile(devices):
    """SimCLR (ResNet-10) + global BN through the whole Trainer: every replica traces the same step
    program, ends every step with the same parameters and the same global loss, and after the first
    two steps nothing recompiles. (This hung before the sync shim turned off buffer donation; see
    tests/xla/sync_shim.py.)"""
    replicas = run_replicas("trainer", devices, _simclr_data(), timeout_s=850)
    first = replicas[0]
    for r in replicas[1:]:
        assert r["graph_hashes"] == first["graph_hashes"], f"replica {r['rank']} traced another step program"
        assert r["losses"] == first["losses"]
        for step, (state, ref) in enumerate(zip(r["states"], first["states"])):
            for key in ref:
                assert torch.equal(state[key], ref[key]), f"replica {r['rank']} differs at step {step + 1}: {key}"
    # Step 1 (no momentum buffers yet) and step 2 compile their own programs, and so do the first
    # two metric reductions (the first one also materialises what the first step left pending);
    # from step 3 on every program comes from the cache.
    compiles = first["compiles"]
    assert compiles[2] == compiles[-1], f"recompiled after step 2: uncached compiles before each step, then at the end: {compiles}"
    print(f"\nTrainer on {devices} XLA devices: losses {first['losses']}; uncached compiles before each step, then at the end: {compiles}")


def _tiny_trainer_data(global_batch: int = 16, steps: int = 2) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(steps):
        x1 = torch.randn(global_batch, 1, 12, 12, generator=g)
        x2 = x1 + 0.3 * torch.randn(global_batch, 1, 12, 12, generator=g)
        batches.append(((x1, x2), torch.zeros(global_batch, dtype=torch.long)))
    return {"state": TinyContrastiveModule().state_dict(), "batches": batches}


def _tiny_trainer_reference(data: dict):
    from scale_ssl.trainer import Trainer

    model = TinyContrastiveModule()
    model.load_state_dict(data["state"])
    trainer = Trainer(strategy="single", max_steps=len(data["batches"]), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(model, data["batches"])
    return model.state_dict(), [h["train/loss"] for h in trainer.history if "train/loss" in h]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("devices", [1, 2, 4])
def test_trainer_on_xla_devices_equals_single_on_the_global_batch(devices):
    """The strategy matrix's xla column: Trainer + strategy=xla on N devices x b, two SGD steps,
    equals strategy=single on N*b (losses and parameters), on the BN-free tiny network."""
    data = _tiny_trainer_data()
    ref_state, ref_losses = _tiny_trainer_reference(data)
    start = data["state"]
    scale = max((ref_state[k] - start[k]).abs().max().item() for k in ref_state)
    replicas = run_replicas("trainer_tiny", devices, data, timeout_s=380)
    for r in replicas:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
        diff = max((r["state"][k] - ref_state[k]).abs().max().item() for k in ref_state) / scale
        assert diff < REL_TOL, f"replica {r['rank']} of {devices}: parameters differ by {diff:.2e} (relative to the update)"
    for r in replicas[1:]:
        for k in ref_state:
            assert torch.equal(r["state"][k], replicas[0]["state"][k]), f"replicas 0 and {r['rank']} differ: {k}"
    print(f"\nTrainer on {devices} XLA devices vs single: losses {replicas[0]['losses']} vs {ref_losses}; "
          f"max param rel diff {max(max((r['state'][k] - ref_state[k]).abs().max().item() for k in ref_state) for r in replicas) / scale:.2e}")
