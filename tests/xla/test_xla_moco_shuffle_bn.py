"""MoCo's shuffle-BN on 2 XLA:CPU devices equals its one-process definition.

Shuffle-BN (He et al. 2020, arXiv:1911.05722, sec. 3.3): the key batch is gathered, permuted with a
permutation from replica 0, split into one shard per device, encoded with *per-device* BatchNorm
statistics, and un-shuffled. On one process that is: permute the global key batch, encode each of
the N shards with its own batch statistics, and put every key back in its image's row. Every
replica must trace the same program (its rank enters as device data), or XLA replicas compile
different programs whose collectives never meet.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scale_ssl.methods import MoCoV2
from tests.xla.replicas import run_replicas

pytestmark = pytest.mark.xla

DEVICES = 2
GLOBAL_BATCH = 8
# fp32 keys are unit vectors. XLA:CPU and eager CPU sum in different orders, and BatchNorm over a
# shard of 4 images amplifies that: measured 7e-6. Whole-batch instead of per-shard statistics
# moves them by ~0.7.
KEY_ATOL = 5e-5
HPARAMS = dict(base_encoder="resnet10", in_channels=1, first_conv=True, maxpool1=True, emb_dim=16,
               num_negatives=4 * GLOBAL_BATCH, use_mlp=True, shuffle_bn=True, sync_bn=False)


def _data() -> dict:
    torch.manual_seed(0)
    state = MoCoV2(**HPARAMS).state_dict()
    x = torch.randn(GLOBAL_BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"hparams": HPARAMS, "state": state, "x": x}


def _encode(model: MoCoV2, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.momentum_projection(model.momentum_encoder(images)).float(), dim=1)


def _one_process_shuffle_bn(data: dict, order: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN written out on one process for ``DEVICES`` virtual devices."""
    model = MoCoV2(**data["hparams"])
    model.load_state_dict(data["state"])
    model.train()
    b = GLOBAL_BATCH // DEVICES
    with torch.no_grad():
        shuffled = torch.cat([_encode(model, data["x"][order[d * b:(d + 1) * b]]) for d in range(DEVICES)])
        keys = torch.empty_like(shuffled)
        keys[order] = shuffled
        whole_batch = _encode(model, data["x"])
    return keys, whole_batch


@pytest.mark.timeout(400)
def test_shuffle_bn_on_xla_replicas_equals_one_process_and_is_one_program():
    data = _data()
    replicas = run_replicas("moco_shuffle_bn", DEVICES, data, timeout_s=380)
    assert len({r["graph_hash"] for r in replicas}) == 1, "replicas traced different key programs"
    order = replicas[0]["order"]
    assert sorted(order.tolist()) == list(range(GLOBAL_BATCH))
    for r in replicas[1:]:
        assert torch.equal(r["order"], order), "replicas received different permutations"
    expected, whole_batch = _one_process_shuffle_bn(data, order)
    got = torch.cat([r["keys"] for r in replicas])
    diff = (got - expected).abs().max().item()
    assert diff < KEY_ATOL, f"shuffle-BN keys differ from one process by {diff:.2e}"
    # The comparison can tell per-shard from whole-batch statistics.
    assert (got - whole_batch).abs().max().item() > 100 * KEY_ATOL
    print(f"\nshuffle-BN keys on {DEVICES} XLA devices vs one process: max abs diff {diff:.2e} "
          f"(whole-batch BN would differ by {(got - whole_batch).abs().max().item():.2e})")
