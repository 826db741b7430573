"""The strategy equivalence matrix for the global NT-Xent loss: every strategy on N parts/ranks
gives the loss and the one-step parameter update of one process on the whole batch. One
parametrised test over {dp x 2/4, ddp x 2/4, deepspeed ZeRO 0-3 x 2 ranks} against single; the XLA
column is in tests/xla/test_xla_multi_device.py (it needs the XLA virtualenv).

Model: conv encoder + MLP head without BatchNorm (per-device BN statistics differ by design under
dp; under ddp the GlobalBatchNorm case is covered in test_trainer_ddp.py). Loss in
``training_step_end`` so that dp's gathered outputs reach it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from scale_ssl.losses import NTXentLoss
from scale_ssl.strategies import DDPStrategy, DPStrategy
from scale_ssl.trainer import SSLModule, Trainer
from tests.distributed import run_on_ranks

GLOBAL_BATCH = 16
LR = 0.5
# fp32: relative to the largest entry of the reference update
UPDATE_REL_TOL = 1e-5


class TinyContrastive(SSLModule):
    def __init__(self, loss_in_step_end: bool = True):
        super().__init__()
        torch.manual_seed(123)
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        self.criterion = NTXentLoss(0.2)
        self.loss_in_step_end = loss_in_step_end
        self.val_sizes = []

    def setup(self, stage):
        self.criterion.collective = self.collective

    def training_step(self, batch, batch_idx):
        (x1, x2), _ = batch
        z1, z2 = self.head(self.encoder(x1)), self.head(self.encoder(x2))
        if not self.loss_in_step_end:
            return self.criterion(z1, z2)
        return {"z1": z1, "z2": z2}

    def training_step_end(self, outputs):
        if not self.loss_in_step_end:
            return outputs
        loss = self.criterion(outputs["z1"], outputs["z2"])
        self.log("loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_sizes.append(batch[1].shape[0])
        return {"n": batch[1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def global_batch():
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
    x2 = x1 + 0.3 * torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
    return (x1, x2), torch.arange(GLOBAL_BATCH)


def _fit(strategy, batch) -> tuple[dict, float]:
    module = TinyContrastive()
    trainer = Trainer(strategy=strategy, max_steps=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(module, [batch])
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, trainer.callback_metrics["loss"]


def reference():
    return _fit("single", global_batch())


def _update_diffs(state, ref) -> tuple[float, float]:
    """Max abs difference of the one-step parameter updates, and that relative to the largest
    entry of the reference update."""
    start = TinyContrastive().state_dict()
    scale = max((ref[k] - start[k]).abs().max().item() for k in ref)
    diff = max(((state[k] - start[k]) - (ref[k] - start[k])).abs().max().item() for k in ref)
    return diff, diff / scale


def _ddp_rank(rank, world):
    (x1, x2), y = global_batch()
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    return _fit(DDPStrategy(accelerator="cpu"), ((x1[sl], x2[sl]), y[sl]))


# One column per strategy and size, each against `reference()` (single on the whole batch); a later
# strategy or loss joins by adding a column here. Each column returns one (state_dict, logged loss)
# per rank/process after one step on its share of the same global batch.
COLUMNS = ["dp-2", "dp-4", "ddp-2", "ddp-4", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"]


def _column_results(column: str, request) -> list[tuple[dict, float]]:
    kind, _, size = column.partition("-")
    if kind == "dp":
        return [_fit(DPStrategy(accelerator="cpu", devices=int(size)), global_batch())]
    if kind == "ddp":
        return run_on_ranks(_ddp_rank, int(size))
    pytest.importorskip("deepspeed")
    per_rank, _ = request.getfixturevalue("deepspeed_engines")  # 2 ranks, all stages in one launch
    return [rank_result["stages"][int(size.removeprefix("zero"))] for rank_result in per_rank]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("column", COLUMNS)
def test_strategy_equals_one_process_on_the_global_batch(column, request):
    """N ranks/parts x b == 1 process x N*b: the logged global NT-Xent loss within 1e-6 relative,
    the one-step update within 1e-5 of its largest entry (fp32), on every rank."""
    ref_state, ref_loss = reference()
    figures = {"loss_abs": 0.0, "loss_rel": 0.0, "update_abs": 0.0, "update_rel": 0.0}
    for state, loss in _column_results(column, request):
        update_abs, update_rel = _update_diffs(state, ref_state)
        figures["loss_abs"] = max(figures["loss_abs"], abs(loss - ref_loss))
        figures["loss_rel"] = max(figures["loss_rel"], abs(loss - ref_loss) / abs(ref_loss))
        figures["update_abs"] = max(figures["update_abs"], update_abs)
        figures["update_rel"] = max(figures["update_rel"], update_rel)
    print(f"\n{column}: " + " ".join(f"{k}={v:.2e}" for k, v in figures.items()))
    assert figures["loss_rel"] <= 1e-6, f"{column}: loss {figures}"
    assert figures["update_rel"] < UPDATE_REL_TOL, f"{column}: one-step update {figures}"


class NoStepEnd(TinyContrastive):
    training_step_end = SSLModule.training_step_end  # the base hook: not overridden


def test_dp_without_training_step_end_averages_part_losses_and_warns_once():
    module = NoStepEnd(loss_in_step_end=False)
    trainer = Trainer(strategy=DPStrategy(accelerator="cpu", devices=2), max_steps=2, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, [global_batch()] * 2)
    messages = [str(w.message) for w in caught if "no training_step_end" in str(w.message)]
    assert len(messages) == 1
    assert trainer.global_step == 2


class FloatLoss(TinyContrastive):
    def training_step(self, batch, batch_idx):
        return {"loss": 1.0}


def test_dp_part_returning_a_python_float_is_a_clear_error():
    trainer = Trainer(strategy=DPStrategy(accelerator="cpu", devices=2), max_steps=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.raises(TypeError, match="non-tensor loss"):
        trainer.fit(FloatLoss(), [global_batch()])


def test_dp_validation_runs_on_every_part():
    module = TinyContrastive()
    Trainer(strategy=DPStrategy(accelerator="cpu", devices=4), max_steps=1, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, num_sanity_val_steps=0).fit(module, [global_batch()], val_dataloaders=[global_batch()])
    assert module.val_sizes == [4, 4, 4, 4]


def test_dp_with_fewer_samples_than_devices_is_a_clear_error():
    trainer = Trainer(strategy=DPStrategy(accelerator="cpu", devices=4), max_steps=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    (x1, x2), y = global_batch()
    with pytest.raises(ValueError, match="cannot be split into 4 parts"):
        trainer.fit(TinyContrastive(), [((x1[:2], x2[:2]), y[:2])])
