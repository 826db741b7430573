"""The rest of the Lightning surface the trainer promises, each with a test that fails if the
hook or flag were ignored: the test-side hooks, the module's own checkpoint state, clipping by
value, the logging interval, the progress display, deterministic kernels, and what DDP adds
(prepare_data once per node, training_step_end on every strategy, no gradient all-reduce on
non-final micro-batches, ``None`` from training_step refused)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from tests.distributed import run_on_ranks
from tests.test_trainer_api import Regressor, quiet, regression_batches
from tests.test_trainer_callbacks import Interrupt, MetricsSink

# -- test stage: test_step -> test_step_end -> test_epoch_end(outputs) -> on_test_epoch_end --------


class RecordsTestStage(Regressor):
    def __init__(self):
        super().__init__()
        self.steps: list[tuple[int, int]] = []
        self.step_end_inputs: list[dict] = []
        self.epoch_end_outputs = None
        self.on_epoch_end_calls = 0

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.steps.append((dataloader_idx, batch_idx))
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("test_loss", loss)
        return {"loss": loss, "n": len(x)}

    def test_step_end(self, outputs):
        self.step_end_inputs.append(outputs)
        return outputs["n"]  # what test_epoch_end receives is what test_step_end returned

    def test_epoch_end(self, outputs):
        self.epoch_end_outputs = outputs

    def on_test_epoch_end(self):
        self.on_epoch_end_calls += 1


def test_test_stage_calls_step_end_old_epoch_end_form_and_respects_limit_test_batches():
    module = RecordsTestStage()
    trainer = quiet(limit_test_batches=2)
    results = trainer.test(module, [regression_batches(5, batch=8), regression_batches(3, batch=4, seed=3)])
    assert module.steps == [(0, 0), (0, 1), (1, 0), (1, 1)]  # two loaders, dataloader_idx passed, 2 batches each
    assert all(set(o) == {"loss", "n"} for o in module.step_end_inputs)
    assert module.epoch_end_outputs == [[8, 8], [4, 4]]
    assert module.on_epoch_end_calls == 1
    assert "test_loss" in results[0]
    assert module.training and torch.is_grad_enabled()  # back to train mode with grads on afterwards


# -- the module's own extra state in the checkpoint ----------------------------------------------------


class CountsSeenSamples(Regressor):
    """Keeps a plain Python counter outside its state_dict: only the checkpoint hooks carry it."""

    def __init__(self):
        super().__init__()
        self.samples_seen = 0
        self.loaded_from: dict | None = None

    def training_step(self, batch, batch_idx, *rest):
        self.samples_seen += len(batch[0])
        return super().training_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint):
        self.samples_seen = checkpoint["samples_seen"]
        self.loaded_from = {"global_step": checkpoint["global_step"]}


def test_on_save_and_on_load_checkpoint_carry_the_modules_own_state(tmp_path):
    first = CountsSeenSamples()
    quiet(max_epochs=1, callbacks=[Interrupt(3)], enable_checkpointing=True, default_root_dir=str(tmp_path)).fit(
        first, regression_batches(6))
    assert first.samples_seen == 24
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["samples_seen"] == 24

    resumed = CountsSeenSamples()
    quiet(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path)).fit(
        resumed, regression_batches(6), ckpt_path="last")
    assert resumed.loaded_from == {"global_step": 3}
    assert resumed.samples_seen == 48  # 24 restored by the hook + the 3 remaining batches of 8


# -- lr_scheduler_config frequency, per step and per epoch, and across a resume ------------------------


def _halving_every(interval, frequency):
    def make(m):
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
        return {"optimizer": o, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "frequency": frequency}}
    return make


@pytest.mark.parametrize("interval, frequency, max_epochs, halvings", [("step", 3, 1, 2), ("epoch", 2, 5, 2)])
def test_scheduler_frequency_steps_the_scheduler_every_nth_interval(interval, frequency, max_epochs, halvings):
    trainer = quiet(max_epochs=max_epochs)
    trainer.fit(Regressor(_halving_every(interval, frequency)), regression_batches(6))  # 6 steps per epoch
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**halvings)


def test_scheduler_frequency_keeps_its_phase_across_a_resume(tmp_path):
    # stop after 4 of 6 steps: one halving at step 3, one more due at step 6 (not at 4 + 3 = 7)
    quiet(max_epochs=1, callbacks=[Interrupt(4)], enable_checkpointing=True, default_root_dir=str(tmp_path)).fit(
        Regressor(_halving_every("step", 3)), regression_batches(6))
    trainer = quiet(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(Regressor(_halving_every("step", 3)), regression_batches(6), ckpt_path="last")
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


# -- clipping by value, automatic optimization ------------------------------------------------------


class FirstStepGradients(Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.grads is None:
            self.grads = torch.cat([p.grad.flatten() for p in module.parameters()]).clone()


def test_gradient_clipping_by_value_clamps_each_entry():
    clipped, unclipped = FirstStepGradients(), FirstStepGradients()
    quiet(max_epochs=1, gradient_clip_val=0.02, gradient_clip_algorithm="value", callbacks=[clipped]).fit(
        Regressor(), regression_batches(1))
    quiet(max_epochs=1, callbacks=[unclipped]).fit(Regressor(), regression_batches(1))
    assert unclipped.grads.abs().max() > 0.02 and (unclipped.grads.abs() < 0.02).any()
    # entry-wise clamp (clipping the norm instead would rescale the small entries too)
    torch.testing.assert_close(clipped.grads, unclipped.grads.clamp(-0.02, 0.02), rtol=0, atol=1e-7)


# -- log_every_n_steps, enable_progress_bar, deterministic ------------------------------------------


@pytest.mark.parametrize("every, steps", [(2, [2, 4, 6]), (3, [3, 6])])
def test_log_every_n_steps_sets_the_logged_steps(every, steps):
    sink = MetricsSink()
    quiet(max_epochs=1, logger=sink, log_every_n_steps=every).fit(Regressor(), regression_batches(6))
    assert [step for step, row in sink.rows if "train_loss" in row] == steps


def test_enable_progress_bar_switches_the_display(capfd):
    quiet(max_epochs=1, log_every_n_steps=1, enable_progress_bar=True).fit(Regressor(), regression_batches(2))
    shown = capfd.readouterr().err
    assert "step 1" in shown and "step 2" in shown and "train_loss=" in shown
    quiet(max_epochs=1, log_every_n_steps=1, enable_progress_bar=False).fit(Regressor(), regression_batches(2))
    assert "step" not in capfd.readouterr().err


class RecordsDeterminism(Regressor):
    seen: list[bool] = []

    def training_step(self, batch, batch_idx, *rest):
        RecordsDeterminism.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().training_step(batch, batch_idx)


def test_deterministic_turns_on_deterministic_kernels_for_the_run():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        RecordsDeterminism.seen = []
        quiet(max_epochs=1, deterministic=True).fit(RecordsDeterminism(), regression_batches(1))
        assert RecordsDeterminism.seen == [True]
    finally:
        torch.use_deterministic_algorithms(before)
    RecordsDeterminism.seen = []
    quiet(max_epochs=1).fit(RecordsDeterminism(), regression_batches(1))
    assert RecordsDeterminism.seen == [before]


# -- DDP: prepare_data per node, training_step_end, no_sync on micro-batches, None refused ----------------


class DDPHooks(Regressor):
    def __init__(self, marker_dir):
        super().__init__()
        self.marker_dir = marker_dir
        self.step_end_calls = 0

    def prepare_data(self):
        rank = os.environ["RANK"]
        open(os.path.join(self.marker_dir, f"prepared-by-rank{rank}"), "w").close()

    def training_step_end(self, outputs):
        self.step_end_calls += 1
        return outputs


class LocalGradientsOfMicroBatches(Callback):
    """The accumulated gradient after each non-final micro-batch: under ``no_sync`` it is this
    rank's own (different on every rank); had DDP all-reduced it, every rank would hold the same."""

    def __init__(self):
        self.grads = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            self.grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]).clone())


def _ddp_hooks(rank, world, marker_dir):
    module = DDPHooks(marker_dir)
    micro = LocalGradientsOfMicroBatches()
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu"), max_epochs=1, accumulate_grad_batches=2, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[micro])
    batches = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in regression_batches(4, batch=8)]
    trainer.fit(module, batches)
    return module.step_end_calls, micro.grads, trainer.global_step, module.net.weight.detach().clone()


@pytest.mark.timeout(180)
def test_ddp_prepares_data_once_per_node_calls_step_end_and_syncs_only_at_the_step(tmp_path):
    results = run_on_ranks(_ddp_hooks, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["prepared-by-rank0"]  # local rank 0 only
    for step_end_calls, _, steps, _ in results:
        assert step_end_calls == 4  # every micro-batch goes through training_step_end under DDP too
        assert steps == 2
    (_, grads0, _, weight0), (_, grads1, _, weight1) = results
    assert len(grads0) == len(grads1) == 2  # micro-batches 0 and 2 of 4 (accumulation 2)
    for g0, g1 in zip(grads0, grads1):
        assert not torch.allclose(g0, g1)  # not all-reduced: no gradient sync before the last micro-batch
    assert torch.equal(weight0, weight1)  # ... and synced at the step: replicas stay identical


class ReturnsNone(Regressor):
    def training_step(self, batch, batch_idx, *rest):
        return None


def _ddp_none(rank, world):
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu"), max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, num_sanity_val_steps=0)
    try:
        trainer.fit(ReturnsNone(), regression_batches(2, batch=4))
    except RuntimeError as err:
        return str(err)
    return "no error"


@pytest.mark.timeout(180)
def test_training_step_returning_none_under_ddp_is_a_clear_error():
    for message in run_on_ranks(_ddp_none, 2):
        assert "training_step returned None under a distributed strategy" in message
