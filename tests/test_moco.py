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
from tests._batchnorm_free import remove_batchnorm
from tests.distributed import run_on_ranks

NEG = 16
SIZES = (8, 8, 6)  # global batch sizes; the last one is short


def make_moco(cls=MoCoV2, **overrides) -> MoCoV2:
    seed_everything(5)
    kwargs = dict(base_encoder="resnet10", in_channels=1, first_conv=True, maxpool1=False, emb_dim=8,
                  num_negatives=NEG, encoder_momentum=0.9, softmax_temperature=0.2, learning_rate=0.1, use_mlp=True)
    kwargs.update(overrides)
    return cls(**kwargs)


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
    out["accumulated"] = _accumulating_ranks(rank, world)  # see the accumulation tests below
    return out


@pytest.fixture(scope="module")
def two_ranks():
    """One launch of 2 gloo ranks for every 2-rank check of this file."""
    return run_on_ranks(_ranks, 2)


@pytest.mark.timeout(300)
def test_global_queue_identical_on_every_rank_short_last_batch_shuffle_bn_and_sync_bn(two_ranks):
    results = two_ranks
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


# -- gradient accumulation: the queue changes once per optimizer step --------------------------
ACC_NEG = 48  # a multiple of the optimizer step's global batch (8)
ACC_STEPS = 4  # the queue wraps: 4 x 8 keys > 48 - 16 slots left after 2 steps


def without_batchnorm(model: MoCoV2) -> MoCoV2:
    """Without BN, MoCo's loss given the queue is a mean of per-sample terms, so accumulation can
    equal one process on the whole batch and what remains to compare is the queue's timing
    (``tests/_batchnorm_free.py``)."""
    for name in ("encoder", "momentum_encoder", "projection", "momentum_projection"):
        remove_batchnorm(getattr(model, name))
    return model


def acc_model(cls=MoCoV2, **overrides):
    return without_batchnorm(make_moco(cls, **{"num_negatives": ACC_NEG, **overrides}))


def micro_batches(steps=ACC_STEPS, world=2, micro=2, b=2, seed=3):
    """``out[step][micro][rank]``: b images each, so one optimizer step holds world*micro*b = 8."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            parts = []
            for _ in range(world):
                x = torch.randn(b, 1, 28, 28, generator=g)
                parts.append(((x, x + 0.3 * torch.randn(b, 1, 28, 28, generator=g)), torch.zeros(b, dtype=torch.long)))
            step.append(parts)
        out.append(step)
    return out


def cat_batches(parts):
    return ((torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts])), torch.cat([p[1] for p in parts]))


def whole_batch_order(step):
    """The optimizer step's global batch in the order its keys enter the queue: micro-batch by
    micro-batch, ranks in order within each (what the gather of every micro-batch yields)."""
    return cat_batches([part for micro in step for part in micro])


def snapshot(model):
    return {"keys": model.queue.keys.clone(), "ptr": model.queue.ptr,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "momentum": {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}}


class Snapshots(Callback):
    """The queue and weights after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if len(self.steps) < trainer.global_step:
            self.steps.append(snapshot(module))


class EnqueuePerMicroBatch(MoCoV2):
    """The behaviour before the fix: each micro-batch's keys enter the queue right after it, so
    the next micro-batch of the same step already contrasts against them."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.queue.enqueue_held()
        super().on_train_batch_end(outputs, batch, batch_idx)


def fit_snapshots(model, batches, strategy="single", accumulate=1, **trainer_args):
    snaps = Snapshots()
    Trainer(strategy=strategy, max_steps=trainer_args.pop("max_steps", ACC_STEPS), logger=False, enable_progress_bar=False,
            enable_checkpointing=False, accumulate_grad_batches=accumulate, callbacks=[snaps], **trainer_args).fit(model, batches)
    return snaps.steps


def _accumulating_ranks(rank, world):
    steps = micro_batches()
    mine = [micro[rank] for step in steps for micro in step]  # this rank's micro-batches in time order
    return fit_snapshots(acc_model(), mine, DDPStrategy(accelerator="cpu"), accumulate=2)


def assert_same_steps(got, want, what):
    """fp32, relative 1e-5 of each tensor's largest entry: accumulation sums the micro-batch
    gradients in another order than the whole-batch mean (~1e-7 relative per step); over 4 SGD
    steps that stays far below 1e-5, while a queue entry from the wrong step differs by O(1)."""
    assert len(got) == len(want) == ACC_STEPS, what
    for step, (g, w) in enumerate(zip(got, want)):
        assert g["ptr"] == w["ptr"], (what, step)
        torch.testing.assert_close(g["keys"], w["keys"], rtol=0, atol=1e-5, msg=f"{what}: queue after step {step}")
        for group in ("params", "momentum"):
            for name, value in w[group].items():
                scale = value.abs().max().clamp_min(1e-12)
                diff = ((g[group][name] - value).abs().max() / scale).item()
                assert diff < 1e-5, f"{what}: {group} {name} after step {step}: rel diff {diff:.1e}"


@pytest.mark.timeout(300)
def test_accumulation_on_one_process_and_two_ranks_equals_one_process_on_the_whole_batch(two_ranks):
    steps = micro_batches()
    whole = fit_snapshots(acc_model(), [whole_batch_order(step) for step in steps])
    one_process = fit_snapshots(acc_model(), [cat_batches(micro) for step in steps for micro in step], accumulate=2)
    assert_same_steps(one_process, whole, "1 process, accumulate 2")
    for rank, result in enumerate(two_ranks):
        assert_same_steps(result["accumulated"], whole, f"2 ranks, accumulate 2, rank {rank}")
    # the queue really moved, and wrapped: every step enqueued the step's 8 keys at once
    assert [s["ptr"] for s in whole] == [8, 16, 24, 32]
    assert not torch.equal(whole[-1]["keys"], whole[0]["keys"])

    # The comparison has the power to see the old behaviour: enqueueing per micro-batch lets the
    # second micro-batch contrast against the first one's keys, and the weights drift apart.
    old = fit_snapshots(acc_model(EnqueuePerMicroBatch), [cat_batches(micro) for step in steps for micro in step], accumulate=2)
    with pytest.raises(AssertionError):
        assert_same_steps(old, whole, "enqueue per micro-batch")


def test_keys_of_a_skipped_step_never_enter_the_queue():
    """A micro-batch with a NaN image makes its step non-finite: the step is skipped on every rank,
    and its keys (NaN) are dropped with it. The run then equals one that never saw that step."""
    steps = micro_batches(steps=3, world=1)
    poisoned = [list(micro) for micro in steps[1]]
    (x1, x2), y = poisoned[0][0]
    poisoned[0][0] = ((x1.clone().fill_(float("nan")), x2.clone().fill_(float("nan"))), y)
    with_skip = [steps[0], poisoned, steps[2]]
    flat = lambda chosen: [cat_batches(micro) for step in chosen for micro in step]  # noqa: E731
    with pytest.warns(UserWarning, match="non-finite loss"):
        skipped = fit_snapshots(acc_model(), flat(with_skip), accumulate=2, max_steps=2, on_nonfinite_loss="skip")
    clean = fit_snapshots(acc_model(), flat([steps[0], steps[2]]), accumulate=2, max_steps=2)
    assert torch.isfinite(skipped[-1]["keys"]).all()
    assert skipped[-1]["ptr"] == clean[-1]["ptr"] == 8  # 2 steps x 4 keys
    torch.testing.assert_close(skipped[-1]["keys"], clean[-1]["keys"], rtol=0, atol=1e-6)
    for name, value in clean[-1]["params"].items():
        torch.testing.assert_close(skipped[-1]["params"][name], value, rtol=1e-5, atol=1e-7)


def test_queue_must_be_a_multiple_of_the_optimizer_steps_global_batch_under_accumulation():
    model = acc_model(num_negatives=12)  # a multiple of the micro-batch's 4 keys, not of the step's 8
    batches = [cat_batches(micro) for step in micro_batches(steps=1) for micro in step]
    with pytest.raises(ValueError, match="num_negatives=12 is not a multiple of the global batch 8"):
        fit_snapshots(model, batches, accumulate=2, max_steps=1)
