"""The whole stack (Trainer + DDPStrategy + SimCLR + NT-Xent) on real gloo ranks equals one process
on the concatenated batch, and resuming from a checkpoint equals never stopping."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.methods import SimCLR
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.distributed import run_on_ranks

GLOBAL_BATCH = 16
# One optimizer step: the update is lr x the averaged gradient, so comparing updates compares
# gradients after the whole trainer/strategy/loss path. (Over several steps this small BN
# ResNet on noise is chaotic: a 1e-7 weight perturbation moves the next gradient by 1e-2, so
# fp32 round-off, not the math, would decide a multi-step comparison.)
STEPS = 1
# fp32 tolerance on the update, relative to its largest entry.
UPDATE_REL_TOL = 1e-5


def make_simclr() -> SimCLR:
    seed_everything(7)
    return SimCLR(
        arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=32, feat_dim=16,
        temperature=0.5, optimizer="sgd", learning_rate=0.5, weight_decay=0.0, warmup_steps=0,
    )


def make_batches():
    """STEPS global batches of two views of 28x28 grayscale images."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        x1 = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g)
        x2 = x1 + 0.5 * torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g)
        out.append(((x1, x2), torch.zeros(GLOBAL_BATCH, dtype=torch.long)))
    return out


def rank_slice(batches, rank, world):
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    return [((x1[sl], x2[sl]), y[sl]) for (x1, x2), y in batches]


def fit_single(batches) -> dict:
    model = make_simclr()
    Trainer(strategy="single", max_steps=STEPS, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, log_every_n_steps=1).fit(model, batches)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_fit(rank, world, sync_batchnorm):
    model = make_simclr()
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu", sync_batchnorm=sync_batchnorm), max_steps=STEPS,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(model, rank_slice(make_batches(), rank, world))
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer.callback_metrics["train/loss"]


def _max_update_diff(a: dict, b: dict) -> float:
    """max |update_a - update_b| / max |update_b| over floating-point entries (incl. BN stats)."""
    start = make_simclr().state_dict()
    keys = [k for k in a if a[k].is_floating_point()]
    scale = max((b[k] - start[k]).abs().max().item() for k in keys)
    return max(((a[k] - start[k]) - (b[k] - start[k])).abs().max().item() for k in keys) / scale


@pytest.mark.timeout(240)
def test_simclr_on_two_ddp_ranks_with_syncbn_equals_one_process():
    reference = fit_single(make_batches())
    results = run_on_ranks(_ddp_fit, 2, True)
    for state, _ in results:
        diff = _max_update_diff(state, reference)
        assert diff < UPDATE_REL_TOL, f"parameter update differs by {diff:.2e} (relative) from one process"
    # the logged loss is the global mean, identical on both ranks
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


@pytest.mark.timeout(240)
def test_without_syncbn_local_batchnorm_breaks_equivalence():
    """The reason for SyncBN: with local statistics, 2 ranks x 8 is not 1 x 16 (and the model can
    cheat on the contrastive task with per-device statistics, google-research/simclr #114)."""
    reference = fit_single(make_batches())
    state, _ = run_on_ranks(_ddp_fit, 2, False)[0]
    assert _max_update_diff(state, reference) > 100 * UPDATE_REL_TOL


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tmp_path):
    batches = make_batches() * 3  # 6 steps over one "epoch" of in-memory batches
    straight = make_simclr()
    Trainer(max_steps=6, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "a")).fit(straight, batches)

    class StopAfter3(Callback):  # the same run (6-step schedule), interrupted after step 3
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 3

    first = make_simclr()
    Trainer(max_steps=6, logger=False, enable_progress_bar=False, callbacks=[StopAfter3()],
            default_root_dir=str(tmp_path / "b")).fit(first, batches)
    resumed = make_simclr()  # fresh weights: everything must come from the checkpoint
    trainer = Trainer(max_steps=6, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "b"))
    trainer.fit(resumed, batches, ckpt_path="last")
    assert trainer.global_step == 6
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_loads_encoder_with_load_from_checkpoint(tmp_path):
    model = make_simclr()
    Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path)).fit(model, make_batches())
    loaded = SimCLR.load_from_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), strict=False)
    x = torch.randn(2, 1, 28, 28)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded.encoder(x), model.encoder(x))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = make_simclr()
    Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path)).fit(model, make_batches())
    path = tmp_path / "checkpoints" / "last.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        SimCLR.load_from_checkpoint(str(path))
