"""Callbacks (checkpointing, early stopping, lr monitor, SWA, EMA) and resume with their state;
distributed parts on real gloo ranks."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch

from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
    Trainer,
)
from tests.distributed import run_on_ranks
from tests.test_trainer_api import Regressor, quiet, regression_batches


class ScriptedVal(Regressor):
    """val_metric follows a script per epoch, so the best checkpoints are known in advance."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)

    def validation_step(self, batch, batch_idx, *rest):
        self.log("val_metric", torch.tensor(self.script[self.current_epoch]))


class MetricsSink:
    """A logger that keeps what it is given (the real MLflow logger is tested elsewhere)."""

    def __init__(self):
        self.rows = []
        self.run_id = None

    def log_hyperparams(self, params): ...

    def log_dict(self, d, name): ...

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_metric_curves(self, keys): ...

    def finalize(self, status): ...

    def continue_run(self, run_id): ...


def test_model_checkpoint_keeps_the_top_k_and_last(tmp_path):
    ckpt = ModelCheckpoint(monitor="val_metric", mode="min", save_top_k=2, save_last=True, filename="e{epoch}-{val_metric:.1f}")
    trainer = quiet(max_epochs=5, callbacks=[ckpt], default_root_dir=str(tmp_path))
    trainer.fit(ScriptedVal([5.0, 3.0, 4.0, 1.0, 2.0]), regression_batches(2), val_dataloaders=regression_batches(1))
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "checkpoints" / "*.ckpt")))
    assert names == ["e3-1.0.ckpt", "e4-2.0.ckpt", "last.ckpt"]
    assert ckpt.best_model_path.endswith("e3-1.0.ckpt") and ckpt.best_model_score == 1.0
    assert not glob.glob(str(tmp_path / "checkpoints" / ".tmp-*"))  # atomic writes leave no temp files
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert best["epoch"] == 3


def test_model_checkpoint_every_n_steps_and_unknown_monitor(tmp_path):
    ckpt = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, filename="s{step}")
    quiet(max_epochs=1, callbacks=[ckpt], default_root_dir=str(tmp_path)).fit(Regressor(), regression_batches(6))
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "checkpoints" / "s*.ckpt")))
    assert names == ["s2.ckpt", "s4.ckpt", "s6.ckpt"]
    with pytest.raises(ValueError, match="monitor='nope'"):
        quiet(max_epochs=1, callbacks=[ModelCheckpoint(monitor="nope")], default_root_dir=str(tmp_path)).fit(
            Regressor(), regression_batches(1))


def test_early_stopping_patience():
    stop = EarlyStopping(monitor="val_metric", patience=2, mode="min")
    trainer = quiet(max_epochs=10, callbacks=[stop])
    trainer.fit(ScriptedVal([3, 2, 2.5, 2.2, 1, 1, 1, 1, 1, 1]), regression_batches(1), val_dataloaders=regression_batches(1))
    assert trainer.current_epoch == 4 and stop.stopped_epoch == 3
    assert "did not improve for 2" in stop.stopping_reason
    with pytest.raises(ValueError, match="EarlyStopping\\(monitor='missing'\\)"):
        quiet(max_epochs=2, callbacks=[EarlyStopping(monitor="missing")]).fit(Regressor(), regression_batches(1))


def test_learning_rate_monitor_names_groups_by_scheduler_name():
    def make(m):
        opt = torch.optim.SGD([{"params": [m.net.weight]}, {"params": [m.net.bias], "lr": 0.5}], lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                                   "interval": "step", "name": "backbone"}}

    sink = MetricsSink()
    trainer = Trainer(max_epochs=1, logger=sink, log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False,
                      callbacks=[LearningRateMonitor(logging_interval="step", log_momentum=True)])
    trainer.fit(Regressor(make), regression_batches(2))
    logged = {k: v for _, row in sink.rows for k, v in row.items() if k.startswith("lr-backbone")}
    assert logged["lr-backbone/pg1"] == pytest.approx(0.1 * 0.25)
    assert logged["lr-backbone/pg2"] == pytest.approx(0.5 * 0.25)
    assert logged["lr-backbone-momentum/pg1"] == pytest.approx(0.9)


class EpochSnapshots(Callback):
    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, module):
        self.weights.append(copy.deepcopy(module.net.weight.detach()))


def test_swa_averages_the_weights_of_the_swa_epochs():
    snapshots = EpochSnapshots()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)
    module = Regressor()
    quiet(max_epochs=5, callbacks=[snapshots, swa]).fit(module, regression_batches(3))
    expected = torch.stack(snapshots.weights[2:]).mean(0)
    torch.testing.assert_close(module.net.weight.detach(), expected)
    assert int(swa.averaged.n_averaged) == 3


def test_ema_follows_the_formula_and_is_swapped_in():
    decay = 0.9
    steps = []

    class Track(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps.append(module.net.weight.detach().clone())

    ema = EMAWeightAveraging(decay=decay)
    module = Regressor()
    quiet(max_epochs=1, callbacks=[Track(), ema]).fit(module, regression_batches(4))
    expected = steps[0]
    for w in steps[1:]:
        expected = decay * expected + (1 - decay) * w
    torch.testing.assert_close(module.net.weight.detach(), expected)


class Interrupt(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_step:
            trainer.should_stop = True


def test_resume_restores_callback_states_and_is_exact(tmp_path):
    def run(root, callbacks, ckpt_path=None, extra=()):
        module = ScriptedVal([3, 2, 2.5, 2.2, 2.1, 2.0])
        ema = EMAWeightAveraging(decay=0.8, swap_at_end=False)
        es = EarlyStopping(monitor="val_metric", patience=3)
        trainer = quiet(max_epochs=6, callbacks=[ema, es, *extra], default_root_dir=str(root), enable_checkpointing=True)
        trainer.fit(module, regression_batches(3), val_dataloaders=regression_batches(1), ckpt_path=ckpt_path)
        return module, ema, es, trainer

    straight, ema_a, es_a, straight_trainer = run(tmp_path / "a", [])
    # early stopping ends the straight run after epoch 4 (patience 3 from the best at epoch 1)
    assert straight_trainer.global_step == 15
    run(tmp_path / "b", [], extra=[Interrupt(8)])  # stops mid-epoch 2 (3 steps per epoch)
    resumed, ema_b, es_b, trainer = run(tmp_path / "b", [], ckpt_path="last")
    assert trainer.global_step == 15  # the restored EarlyStopping state stops it at the same step
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in ema_a.ema.state_dict().items():
        assert torch.equal(value, ema_b.ema.state_dict()[key]), key
    assert (es_a.wait_count, es_a.best_score) == (es_b.wait_count, es_b.best_score)


# -- distributed --------------------------------------------------------------------------

def _ddp_accumulate(rank, world):
    """2 ranks x 2 micro-batches of 2 == 1 process x batch 8 (no BatchNorm in Regressor)."""
    batches = regression_batches(2, batch=8)
    mine = []
    for x, y in batches:  # each global batch of 8 -> rank slice of 4 -> two micro-batches of 2
        xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
        mine += [(xs[:2], ys[:2]), (xs[2:], ys[2:])]
    module = Regressor()
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu"), max_epochs=1, accumulate_grad_batches=2, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, mine)
    return module.net.weight.detach().clone(), trainer.global_step


@pytest.mark.timeout(180)
def test_ddp_gradient_accumulation_equals_one_big_batch():
    reference = Regressor()
    quiet(max_epochs=1).fit(reference, regression_batches(2, batch=8))
    for weight, steps in run_on_ranks(_ddp_accumulate, 2):
        assert steps == 2
        torch.testing.assert_close(weight, reference.net.weight.detach(), rtol=1e-6, atol=1e-7)


def _ddp_resume(rank, world, root, interrupt):
    module = Regressor()
    callbacks = [Interrupt(3)] if interrupt else []
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu"), max_epochs=2, logger=False, enable_progress_bar=False,
                      num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks)
    batches = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in regression_batches(4, batch=8)]
    trainer.fit(module, batches, ckpt_path=None if interrupt or root.endswith("straight") else "last")
    return module.net.weight.detach().clone(), trainer.global_step


@pytest.mark.timeout(240)
def test_ddp_resume_from_a_mid_epoch_checkpoint_is_bitwise_exact(tmp_path):
    straight = run_on_ranks(_ddp_resume, 2, str(tmp_path / "straight"), False)
    run_on_ranks(_ddp_resume, 2, str(tmp_path / "resumed"), True)
    resumed = run_on_ranks(_ddp_resume, 2, str(tmp_path / "resumed"), False)
    for (w_a, s_a), (w_b, s_b) in zip(straight, resumed):
        assert s_a == s_b == 8
        assert torch.equal(w_a, w_b)
