"""MoCo v2 on real gloo ranks: one global queue identical on every rank, the enqueue pointer right
with a short last batch, shuffle-BN un-shuffles correctly, SyncBN option runs, and the queue and
momentum encoder round-trip through a checkpoint (resume equals never stopping)."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.methods import MoCoV2
from scale_ssl.methods.moco_queue import MoCoQueue
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.distributed import run_on_ranks

NEG = 16
SIZES = (8, 8, 6)  # global batch sizes; the last one is short


def make_moco(**overrides) -> MoCoV2:
    seed_everything(5)
    kwargs = dict(base_encoder="resnet10", in_channels=1, first_conv=True, maxpool1=False, emb_dim=8,
                  num_negatives=NEG, encoder_momentum=0.9, softmax_temperature=0.2, learning_rate=0.1, use_mlp=True)
    kwargs.update(overrides)
    return MoCoV2(**kwargs)


def make_batches(sizes=SIZES):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        x = torch.randn(n, 1, 28, 28, generator=g)
        out.append(((x, x + 0.3 * torch.randn(n, 1, 28, 28, generator=g)), torch.zeros(n, dtype=torch.long)))
    return out


def rank_slice(batches, rank, world):
    out = []
    for (x1, x2), y in batches:
        b = x1.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        out.append(((x1[sl], x2[sl]), y[sl]))
    return out


def quiet(strategy, max_steps, root=None, callbacks=()):
    return Trainer(strategy=strategy, max_steps=max_steps, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                   enable_checkpointing=root is not None, default_root_dir=str(root or "unused"), callbacks=list(callbacks))


def _ranks(rank, world):
    model = make_moco()
    initial = model.queue.keys.clone()
    quiet(DDPStrategy(accelerator="cpu"), len(SIZES)).fit(model, rank_slice(make_batches(), rank, world))
    out = {"keys": model.queue.keys.clone(), "ptr": model.queue.ptr, "initial": initial}

    # shuffle-BN: with BN in eval mode the key of an image does not depend on its batch-mates, so
    # the shuffled, sharded, un-shuffled keys must equal the keys computed in place (a fresh model:
    # after training each rank's BN running statistics differ, so ranks would encode differently)
    model = make_moco().eval()
    x = make_batches((8,))[0][0][1][rank * 4 : (rank + 1) * 4]
    shuffled = model._keys(x)
    model.hparams["shuffle_bn"] = False
    out["shuffle_diff"] = (shuffled - model._keys(x)).abs().max().item()

    synced = make_moco(sync_bn=True)
    trainer = quiet(DDPStrategy(accelerator="cpu"), 1)
    trainer.fit(synced, rank_slice(make_batches((8,)), rank, world))
    out["sync_bn_loss"] = trainer.callback_metrics["train/loss"]
    out["sync_bn_layers"] = sum(type(m).__name__ == "GlobalBatchNorm" for m in synced.modules())
    return out


@pytest.mark.timeout(300)
def test_global_queue_identical_on_every_rank_short_last_batch_shuffle_bn_and_sync_bn():
    results = run_on_ranks(_ranks, 2)
    first = results[0]
    for other in results[1:]:
        assert torch.equal(other["keys"], first["keys"])
        assert other["ptr"] == first["ptr"]
    # 8 + 8 + 6 global keys into 16 slots: the short batch wrapped around without error
    assert first["ptr"] == sum(SIZES) % NEG == 6
    # every slot was overwritten by a real key (22 keys > 16 slots); none is left from the init
    assert not (first["keys"] == first["initial"]).all(dim=1).any()
    torch.testing.assert_close(first["keys"].norm(dim=1), torch.ones(NEG), atol=1e-5, rtol=0)
    for r in results:
        assert r["shuffle_diff"] < 1e-6
        assert r["sync_bn_layers"] > 0 and torch.isfinite(torch.tensor(r["sync_bn_loss"]))


def test_enqueue_pointer_wraps_with_a_short_batch():
    queue = MoCoQueue(10, 2)
    for n in (4, 4, 3):
        queue.enqueue(torch.full((n, 2), float(n + queue.ptr)))
    assert queue.ptr == 1
    # slots 8, 9 and 0 hold the short batch (written from ptr 8, wrapping)
    assert queue.keys[[8, 9, 0], 0].tolist() == [11.0, 11.0, 11.0]
    assert queue.keys[1:4, 0].tolist() == [4.0] * 3 and queue.keys[4:8, 0].tolist() == [8.0] * 4


class StopAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    batches = make_batches()
    straight = make_moco()
    quiet("single", 3, tmp_path / "a").fit(straight, batches)
    first = make_moco()
    quiet("single", 3, tmp_path / "b", [StopAfter(2)]).fit(first, batches)
    resumed = make_moco()
    quiet("single", 3, tmp_path / "b").fit(resumed, batches, ckpt_path="last")
    assert torch.equal(resumed.queue.keys, straight.queue.keys) and resumed.queue.ptr == straight.queue.ptr
    for key, value in straight.state_dict().items():  # includes the momentum encoder
        assert torch.equal(value, resumed.state_dict()[key]), key
    loaded = MoCoV2.load_from_checkpoint(str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert torch.equal(loaded.queue.keys, straight.queue.keys) and loaded.queue.ptr == straight.queue.ptr


def test_momentum_encoder_is_the_ema_of_the_online_encoder():
    model = make_moco(encoder_momentum=0.5)
    snapshots = []

    class Snap(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snapshots.append((module.encoder.conv1.weight.detach().clone(), module.momentum_encoder.conv1.weight.detach().clone()))

    target = model.momentum_encoder.conv1.weight.detach().clone()
    quiet("single", 2, callbacks=[Snap()]).fit(model, make_batches((8, 8)))
    for online, momentum in snapshots:  # callbacks run after the module's hook
        target = 0.5 * target + 0.5 * online
        torch.testing.assert_close(momentum, target, atol=1e-6, rtol=0)


def test_num_negatives_must_be_a_multiple_of_the_global_batch():
    model = make_moco(num_negatives=12)
    with pytest.raises(ValueError, match="num_negatives=12 is not a multiple of the global batch 8"):
        quiet("single", 1).fit(model, make_batches((8,)))
