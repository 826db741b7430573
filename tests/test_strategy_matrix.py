"""The strategy equivalence matrix for the global NT-Xent loss: every strategy on N parts/ranks
gives the loss and the one-step parameter update of one process on the whole batch.

Model: conv encoder + MLP head without BatchNorm (per-device BN statistics differ by design under
dp; under ddp the GlobalBatchNorm case is covered in test_trainer_ddp.py). Loss in
``training_step_end`` so that dp's gathered outputs reach it.
"""

from __future__ import annotations

import math
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


def _update_diff(state, ref) -> float:
    start = TinyContrastive().state_dict()
    scale = max((ref[k] - start[k]).abs().max().item() for k in ref)
    return max(((state[k] - start[k]) - (ref[k] - start[k])).abs().max().item() for k in ref) / scale


@pytest.mark.parametrize("devices", [2, 4])
def test_dp_equals_single(devices):
    ref_state, ref_loss = reference()
    state, loss = _fit(DPStrategy(accelerator="cpu", devices=devices), global_batch())
    assert math.isclose(loss, ref_loss, rel_tol=1e-6)
    assert _update_diff(state, ref_state) < UPDATE_REL_TOL


def _ddp_rank(rank, world):
    (x1, x2), y = global_batch()
    b = GLOBAL_BATCH // world
    sl = slice(rank * b, (rank + 1) * b)
    return _fit(DDPStrategy(accelerator="cpu"), ((x1[sl], x2[sl]), y[sl]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2])
def test_ddp_equals_single(world):
    ref_state, ref_loss = reference()
    for state, loss in run_on_ranks(_ddp_rank, world):
        assert math.isclose(loss, ref_loss, rel_tol=1e-6)
        assert _update_diff(state, ref_state) < UPDATE_REL_TOL


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
