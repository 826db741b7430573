"""SwAV through the whole stack (Trainer + strategy + multi-crop + Sinkhorn + queue): 2 DDP ranks
equal one process, resume with a full queue equals never stopping, the queue survives a change of
world size in a real checkpoint, and prototypes stay frozen for ``freeze_prototypes_epochs``."""

from __future__ import annotations

import os

import pytest
import torch

from scale_ssl.methods import SwAV
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests._batchnorm_free import remove_batchnorm
from tests.distributed import run_on_ranks

B = 8  # global batch
UPDATE_REL_TOL = 1e-5


def make_swav(**overrides) -> SwAV:
    seed_everything(7)
    kwargs = dict(
        arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=32, feat_dim=16,
        num_prototypes=24, num_crops=(2, 2), crops_for_assign=(0, 1), temperature=0.1, queue_length=0,
        freeze_prototypes_epochs=0, optimizer="sgd", learning_rate=0.5, weight_decay=0.0, warmup_steps=0,
    )
    kwargs.update(overrides)
    return SwAV(**kwargs)


def make_batches(steps):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        big = torch.randn(B, 1, 28, 28, generator=g)
        crops = (big, big + 0.5 * torch.randn(B, 1, 28, 28, generator=g),
                 big[..., 4:20, 4:20] + 0.3 * torch.randn(B, 1, 16, 16, generator=g),
                 big[..., 8:24, 8:24] + 0.3 * torch.randn(B, 1, 16, 16, generator=g))
        out.append((crops, torch.zeros(B, dtype=torch.long)))
    return out


def rank_slice(batches, rank, world):
    b = B // world
    sl = slice(rank * b, (rank + 1) * b)
    return [(tuple(c[sl] for c in crops), y[sl]) for crops, y in batches]


def quiet_trainer(strategy, max_steps, root=None, callbacks=()):
    return Trainer(strategy=strategy, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   log_every_n_steps=1, enable_checkpointing=root is not None, default_root_dir=str(root or "unused"),
                   callbacks=list(callbacks))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_one_step(rank, world):
    model = make_swav()
    quiet_trainer(DDPStrategy(accelerator="cpu", sync_batchnorm=True), 1).fit(model, rank_slice(make_batches(1), rank, world))
    return _state(model)


@pytest.mark.timeout(300)
def test_swav_on_two_ddp_ranks_with_global_bn_equals_one_process():
    start = _state(make_swav())
    single = make_swav()
    quiet_trainer("single", 1).fit(single, make_batches(1))
    reference = _state(single)
    keys = [k for k in reference if reference[k].is_floating_point()]
    scale = max((reference[k] - start[k]).abs().max().item() for k in keys)
    for state in run_on_ranks(_ddp_one_step, 2):
        diff = max(((state[k] - start[k]) - (reference[k] - start[k])).abs().max().item() for k in keys) / scale
        print(f"swav trainer 2 ranks vs 1 process: max relative update diff {diff:.2e}")
        assert diff < UPDATE_REL_TOL
    # the prototypes did learn (freeze_prototypes_epochs=0) and stay on the unit sphere next step
    assert (reference["prototypes.weight"] - start["prototypes.weight"]).abs().max() > 1e-4


class StopAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


class LogicalQueues(Callback):
    """The logical SwAV queue after every optimizer step (a gather: every rank calls it)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if len(self.steps) < trainer.global_step:
            self.steps.append(module.queue.logical_state(module.collective))


ACC_STEPS = 4


def accumulation_model() -> SwAV:
    """BN-free (``tests/_batchnorm_free.py``): with BN, 4 steps of this tiny model amplify round-off
    to ~1e-3 even between two identical one-process runs with reordered rows."""
    model = make_swav(queue_length=2 * B, epoch_queue_starts=0)
    remove_batchnorm(model.encoder)
    remove_batchnorm(model.projection)
    return model


def accumulation_run(strategy, batches):
    """SwAV with its queue under accumulate_grad_batches=2: 4 steps of 2 micro-batches of B images;
    the queue (2 micro-batches long) is full from the second step and then enters Sinkhorn."""
    model = accumulation_model()
    queues = LogicalQueues()
    trainer = Trainer(strategy=strategy, max_steps=ACC_STEPS, accumulate_grad_batches=2, logger=False, log_every_n_steps=1,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[queues])
    trainer.fit(model, batches)
    return _state(model), queues.steps, [h.get("train/queue_in_use") for h in trainer.history]


def _queue_run(rank, world, root):
    """4 steps straight vs 3 steps + resume, 2 DDP ranks; queue of 2 global batches, used from step 3.
    Then the queue under gradient accumulation (``accumulation_run``) on the same 2 ranks."""
    kwargs = dict(queue_length=2 * B, epoch_queue_starts=0)
    batches = rank_slice(make_batches(4), rank, world)
    ddp = lambda: DDPStrategy(accelerator="cpu")  # noqa: E731
    straight = make_swav(**kwargs)
    t_straight = quiet_trainer(ddp(), 4, os.path.join(root, "straight"))
    t_straight.fit(straight, batches)
    first = make_swav(**kwargs)
    quiet_trainer(ddp(), 4, os.path.join(root, "stopped"), [StopAfter(3)]).fit(first, batches)
    resumed = make_swav(**kwargs)
    t_resumed = quiet_trainer(ddp(), 4, os.path.join(root, "resumed"))
    t_resumed.fit(resumed, batches, ckpt_path=os.path.join(root, "stopped", "checkpoints", "last.ckpt"))
    losses = lambda t: {h["step"]: h["train/loss"] for h in t.history}  # noqa: E731
    accumulated = accumulation_run(DDPStrategy(accelerator="cpu"), rank_slice(make_batches(2 * ACC_STEPS), rank, world))
    return losses(t_straight), losses(t_resumed), _state(straight), _state(resumed), [
        h.get("train/queue_in_use") for h in t_straight.history
    ], accumulated


@pytest.fixture(scope="module")
def two_rank_queue_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("swav_queue")
    return root, run_on_ranks(_queue_run, 2, str(root))


@pytest.mark.timeout(400)
def test_resume_with_a_full_queue_equals_never_stopping_and_reshards_to_one_process(two_rank_queue_runs):
    tmp_path, results = two_rank_queue_runs
    straight_losses, resumed_losses, straight, resumed, in_use, _ = results[0]
    assert in_use == [0.0, 0.0, 1.0, 1.0]  # the queue entered Sinkhorn once full, at step 3
    assert resumed_losses[4] == straight_losses[4], (resumed_losses, straight_losses)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key

    # the checkpoint holds ONE logical queue (both ranks' shards), and a run on another world size
    # (here one process, global batch unchanged) continues from exactly that queue
    stopped_path = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = torch.load(stopped_path, weights_only=True)["swav_queue"]
    assert saved["embeddings"].shape == (2, 2 * B, 16) and saved["filled"] == 2 * B
    assert saved["embeddings"].abs().sum(dim=2).gt(0).all()  # every row holds a real embedding
    single = make_swav(queue_length=2 * B, epoch_queue_starts=0)
    quiet_trainer("single", 4, tmp_path / "single").fit(single, make_batches(4), ckpt_path=str(stopped_path))
    after = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)["swav_queue"]
    assert torch.equal(after["embeddings"][:, B:], saved["embeddings"][:, :B])


@pytest.mark.timeout(400)
def test_queue_under_accumulation_on_two_ranks_equals_one_process_accumulating(two_rank_queue_runs):
    """SwAV's loss is not a mean of per-sample terms: Sinkhorn equipartitions the codes over the
    batch it is given, so under accumulation each micro-batch (global over the ranks) is balanced
    with the queue, and no queue policy can make accumulation equal one process on the whole
    optimizer batch (measured: the updates differ by more than 100 %, queue or not). What holds,
    and is checked here step by step, is the distributed contract under accumulation: 2 ranks
    accumulating 2 micro-batches equal one process accumulating the same (concatenated)
    micro-batches, queue contents included, as each micro-batch pushes its rows."""
    reference_state, reference_queues, reference_in_use = accumulation_run("single", make_batches(2 * ACC_STEPS))
    assert reference_in_use == [0.0, 1.0, 1.0, 1.0]  # logged by the last micro-batch of each step
    start = _state(accumulation_model())
    keys = [k for k in reference_state if reference_state[k].is_floating_point()]
    scale = max((reference_state[k] - start[k]).abs().max().item() for k in keys)
    for rank, (*_, (state, queues, in_use)) in enumerate(two_rank_queue_runs[1]):
        assert in_use == reference_in_use
        diff = max(((state[k] - start[k]) - (reference_state[k] - start[k])).abs().max().item() for k in keys) / scale
        assert diff < UPDATE_REL_TOL, f"rank {rank}: max relative update diff {diff:.2e}"
        for step, (got, want) in enumerate(zip(queues, reference_queues, strict=True)):
            assert got["filled"] == want["filled"]
            torch.testing.assert_close(got["embeddings"], want["embeddings"], rtol=0, atol=1e-5,
                                       msg=f"rank {rank}: logical queue after step {step}")


def test_prototypes_frozen_for_the_first_epochs_then_learn():
    model = make_swav(freeze_prototypes_epochs=1)
    start = model.prototypes.weight.detach().clone()
    encoder_start = model.encoder.conv1.weight.detach().clone()

    class Record(Callback):
        after_epoch0 = None

        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                Record.after_epoch0 = module.prototypes.weight.detach().clone()

    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      callbacks=[Record()])
    trainer.fit(model, make_batches(2))
    assert torch.allclose(Record.after_epoch0, start, atol=1e-6)  # only re-normalised, never stepped
    assert not torch.equal(model.encoder.conv1.weight, encoder_start)  # the rest trained
    assert (model.prototypes.weight - start).abs().max() > 1e-4  # epoch 1: prototypes learn


def test_wrong_number_of_crops_is_a_clear_error():
    model = make_swav(num_crops=(2, 6))
    with pytest.raises(ValueError, match=r"expects 8 crops per image .* got 4; set data.views.num_crops"):
        quiet_trainer("single", 1).fit(model, make_batches(1))


def test_queue_length_not_a_multiple_of_the_global_batch_fails_at_the_first_step():
    model = make_swav(queue_length=12, epoch_queue_starts=0)
    with pytest.raises(ValueError, match="queue_length=12 is not divisible by the global batch 8"):
        quiet_trainer("single", 1).fit(model, make_batches(1))


def test_cli_reports_a_queue_that_does_not_divide_the_global_batch(fmnist_shards, tmp_path, capsys):
    from scale_ssl.cli.main import EXIT_BAD_INPUT, main

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "swav", "fmnist_cpu.yaml")
    code = main(["fit", "--config", config, "trainer.strategy=single", "trainer.global_batch_size=64",
                 f"trainer.default_root_dir={tmp_path}", f"data.train_shards={fmnist_shards}/train",
                 f"data.val_shards={fmnist_shards}/test", "data.num_workers=0", "tracking.enabled=false",
                 "model.queue_length=1000"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("scale-ssl: error: ") and len(err.splitlines()) == 1
    assert "model.queue_length=1000 is not divisible by trainer.global_batch_size=64" in err
