"""Trainer parity with the Lightning API: hook order, configure_optimizers forms, manual
optimization, flags. Small in-memory modules: what is tested is the loop, not a method."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from scale_ssl.trainer import Callback, SSLModule, Trainer

torch.set_num_threads(1)


def regression_batches(n_batches=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 1, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 5, generator=g)
        out.append((x, x @ w + 0.01 * torch.randn(batch, 1, generator=g)))
    return out


class Regressor(SSLModule):
    """y = Wx + b with an MSE loss; ``make_optim`` picks the configure_optimizers form."""

    def __init__(self, make_optim=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(5, 1)
        self.make_optim = make_optim
        self.calls: list[str] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx, *rest):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx, *rest):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx, *rest):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.make_optim is not None:
            return self.make_optim(self)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet(**kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(**kwargs)


# -- hook order ---------------------------------------------------------------------------------

HOOKS = [
    "prepare_data", "setup", "configure_optimizers", "train_dataloader", "val_dataloader", "on_fit_start",
    "on_train_start", "on_train_epoch_start", "on_train_batch_start", "training_step", "training_step_end",
    "on_before_optimizer_step", "on_train_batch_end", "on_validation_epoch_start", "validation_step",
    "validation_step_end", "validation_epoch_end", "on_validation_epoch_end", "on_train_epoch_end", "on_train_end",
    "on_fit_end", "teardown",
]


class Recorder(Regressor):
    def __init__(self):
        super().__init__()
        for hook in HOOKS:
            original = getattr(self, hook, None)

            def wrapped(*args, _hook=hook, _orig=original, **kwargs):
                self.calls.append(_hook)
                if _hook == "validation_step":
                    assert not self.training and not torch.is_grad_enabled()
                if _hook == "training_step":
                    assert self.training and torch.is_grad_enabled()
                return _orig(*args, **kwargs) if _orig is not None else None

            object.__setattr__(self, hook, wrapped)

    def train_dataloader(self):
        return regression_batches(2)

    def val_dataloader(self):
        return regression_batches(1, seed=1)


def test_fit_calls_hooks_in_lightning_order():
    module = Recorder()
    quiet(max_epochs=1).fit(module)
    per_batch = ["on_train_batch_start", "training_step", "training_step_end", "on_before_optimizer_step", "on_train_batch_end"]
    validation = ["on_validation_epoch_start", "validation_step", "validation_step_end", "validation_epoch_end", "on_validation_epoch_end"]
    expected = (
        ["prepare_data", "setup", "configure_optimizers", "train_dataloader", "val_dataloader", "on_fit_start", "on_train_start",
         "on_train_epoch_start"] + per_batch * 2 + validation + ["on_train_epoch_end", "on_train_end", "on_fit_end", "teardown"]
    )
    assert module.calls == expected
    assert module.training  # back in train mode after validation


def test_sanity_validation_runs_first_and_is_not_kept():
    module = Recorder()
    trainer = quiet(max_epochs=1, num_sanity_val_steps=1)
    trainer.fit(module)
    first_train = module.calls.index("training_step")
    assert "validation_step" in module.calls[:first_train]
    assert module.calls.count("validation_step") == 2  # 1 sanity + 1 real (the loader has 1 batch)


# -- configure_optimizers: the six forms ----------------------------------------------------------

def _sgd(m, lr=0.1):
    return torch.optim.SGD(m.parameters(), lr=lr)


FORMS = {
    "single": lambda m: _sgd(m),
    "list": lambda m: [_sgd(m)],
    "two_lists": lambda m: ([o := _sgd(m)], [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)]),
    "dict": lambda m: {"optimizer": (o := _sgd(m)),
                       "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(o, 1, 0.5), "interval": "step"}},
    "tuple_of_dicts": lambda m: ({"optimizer": _sgd(m), "frequency": 1},),
    "none": lambda m: None,
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_configure_optimizers_form(form):
    module = Regressor(FORMS[form])
    before = module.net.weight.detach().clone()
    trainer = quiet(max_epochs=1)
    trainer.fit(module, regression_batches(4))
    changed = not torch.equal(before, module.net.weight)
    assert changed == (form != "none")
    if form == "two_lists":  # epoch interval by default: stepped once at the end of the epoch
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    if form == "dict":  # step interval: four steps
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


class TwoOptimizers(Regressor):
    def __init__(self, frequencies=(2, 1)):
        super().__init__()
        self.head = nn.Linear(1, 1)
        self.frequencies = frequencies
        self.seen: list[tuple[int, bool, bool]] = []

    def training_step(self, batch, batch_idx, optimizer_idx):
        self.seen.append((optimizer_idx, self.net.weight.requires_grad, self.head.weight.requires_grad))
        x, y = batch
        return nn.functional.mse_loss(self.head(self.net(x)), y)

    def configure_optimizers(self):
        a = torch.optim.SGD(self.net.parameters(), lr=0.1)
        b = torch.optim.SGD(self.head.parameters(), lr=0.1)
        sched_b = torch.optim.lr_scheduler.StepLR(b, 1, 0.5)
        if self.frequencies is None:
            return [a, b], [{"scheduler": sched_b, "interval": "step"}]
        return (
            {"optimizer": a, "frequency": self.frequencies[0]},
            {"optimizer": b, "frequency": self.frequencies[1], "lr_scheduler": {"scheduler": sched_b, "interval": "step"}},
        )


def test_frequencies_take_turns_and_only_the_active_optimizer_has_grads():
    module = TwoOptimizers((2, 1))
    trainer = quiet(max_epochs=1)
    trainer.fit(module, regression_batches(6))
    assert [s[0] for s in module.seen] == [0, 0, 1, 0, 0, 1]
    for idx, net_grad, head_grad in module.seen:
        assert (net_grad, head_grad) == ((True, False) if idx == 0 else (False, True))
    # the scheduler of optimizer 1 stepped only when optimizer 1 did (twice)
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert trainer.global_step == 6
    assert module.net.weight.requires_grad and module.head.weight.requires_grad  # untoggled after


def test_several_optimizers_without_frequency_each_train_every_batch():
    module = TwoOptimizers(None)
    quiet(max_epochs=1).fit(module, regression_batches(2))
    assert [s[0] for s in module.seen] == [0, 1, 0, 1]


def test_lbfgs_gets_a_closure_from_the_trainer():
    module = Regressor(lambda m: torch.optim.LBFGS(m.parameters(), lr=1, max_iter=20))
    batches = regression_batches(1) * 3
    x, y = batches[0]
    start = nn.functional.mse_loss(module(x), y).item()
    quiet(max_epochs=1).fit(module, batches)
    assert nn.functional.mse_loss(module(x), y).item() < 0.01 * start


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: {"optimizer": _sgd(m), "lr_scheduler": {"interval": "step"}}, "needs a 'scheduler' key"),
        (lambda m: {"optimizer": (o := _sgd(m)), "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(o, 1), "interval": "batch"}},
         "interval='batch'"),
        (lambda m: {"optimizer": (o := _sgd(m)), "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o)}},
         "needs a 'monitor' key"),
        (lambda m: ({"optimizer": _sgd(m), "frequency": 1}, {"optimizer": _sgd(m)}), "given for some optimizers but not all"),
        (lambda m: {"optimizer": _sgd(m), "lr_schedular": None}, "unknown keys"),
        (lambda m: "adam", "configure_optimizers returned str"),
    ],
)
def test_bad_optimizer_configs_are_clear_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        quiet(max_epochs=1).fit(Regressor(make), regression_batches(1))


def test_reduce_lr_on_plateau_monitor_strict_and_lenient():
    def plateau(strict):
        def make(m):
            o = _sgd(m)
            return {"optimizer": o, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o),
                                                     "monitor": "missing_metric", "strict": strict}}
        return make

    with pytest.raises(ValueError, match="monitors 'missing_metric'"):
        quiet(max_epochs=1).fit(Regressor(plateau(True)), regression_batches(1))
    with pytest.warns(UserWarning, match="missing_metric"):
        quiet(max_epochs=1).fit(Regressor(plateau(False)), regression_batches(1))


def test_reduce_lr_on_plateau_reads_the_validation_metric():
    def make(m):
        o = _sgd(m, lr=0.01)
        # threshold=0.99: only a 99% drop of val_loss counts as progress, so the lr is cut each epoch
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.99)
        return {"optimizer": o, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}

    trainer = quiet(max_epochs=3)
    trainer.fit(Regressor(make), regression_batches(2), val_dataloaders=regression_batches(1, seed=1))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)


# -- manual optimization ---------------------------------------------------------------------

class TinyGAN(SSLModule):
    """The seeds' GAN pattern: the discriminator steps every batch, the generator every 2nd."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = nn.Linear(2, 4)
        self.discriminator = nn.Linear(4, 1)
        self.g_steps = self.d_steps = 0

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        assert opt_g.optimizer.__class__ is torch.optim.Adam
        z = torch.randn(real.shape[0], 2)
        bce = nn.functional.binary_cross_entropy_with_logits

        self.toggle_optimizer(opt_d)
        d_loss = bce(self.discriminator(real), torch.ones(len(real), 1)) + bce(
            self.discriminator(self.generator(z).detach()), torch.zeros(len(real), 1))
        opt_d.zero_grad()
        g_grad = None if self.generator.weight.grad is None else self.generator.weight.grad.clone()
        self.manual_backward(d_loss)
        # toggled off: the discriminator's backward leaves the generator's gradient untouched
        assert (g_grad is None and self.generator.weight.grad is None) or torch.equal(g_grad, self.generator.weight.grad)
        self.clip_gradients(opt_d, gradient_clip_val=0.01, gradient_clip_algorithm="value")
        assert self.discriminator.weight.grad.abs().max() <= 0.01 + 1e-9
        opt_d.step()
        self.d_steps += 1
        self.untoggle_optimizer(opt_d)

        if batch_idx % 2 == 1:
            self.toggle_optimizer(opt_g)
            g_loss = bce(self.discriminator(self.generator(z)), torch.ones(len(real), 1))
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            self.g_steps += 1
            self.untoggle_optimizer(opt_g)
            self.lr_schedulers().step()
        self.log("d_loss", d_loss)

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=1e-2)
        return [opt_g, opt_d], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt_g, 1, 0.5), "interval": "epoch", "frequency": 99}]


def test_manual_optimization_gan_with_two_frequencies():
    module = TinyGAN()
    g0 = module.generator.weight.detach().clone()
    trainer = quiet(max_epochs=1)
    trainer.fit(module, [(torch.randn(8, 4), torch.zeros(8))] * 4)
    assert (module.d_steps, module.g_steps) == (4, 2)
    assert trainer.global_step == 6  # every optimizer step counts
    assert not torch.equal(g0, module.generator.weight)
    # the scheduler's interval/frequency are ignored in manual mode: it stepped when the module said
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


def test_manual_optimization_rejects_automatic_only_flags():
    with pytest.raises(ValueError, match="accumulate_grad_batches is not used with manual optimization"):
        quiet(max_epochs=1, accumulate_grad_batches=2).fit(TinyGAN(), [(torch.randn(8, 4), torch.zeros(8))])
    with pytest.raises(ValueError, match="self.clip_gradients"):
        quiet(max_epochs=1, gradient_clip_val=1.0).fit(TinyGAN(), [(torch.randn(8, 4), torch.zeros(8))])


class ManualLBFGS(Regressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(self(x), y)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=1, max_iter=20)


def test_manual_closure_form_runs_lbfgs():
    module = ManualLBFGS()
    batches = regression_batches(1) * 2
    x, y = batches[0]
    start = nn.functional.mse_loss(module(x), y).item()
    quiet(max_epochs=1).fit(module, batches)
    assert nn.functional.mse_loss(module(x), y).item() < 0.01 * start


# -- flags ---------------------------------------------------------------------------------

def test_accumulation_equals_one_big_batch():
    small = regression_batches(4, batch=4)
    big = [(torch.cat([small[i][0], small[i + 1][0]]), torch.cat([small[i][1], small[i + 1][1]])) for i in (0, 2)]
    a, b = Regressor(), Regressor()
    quiet(max_epochs=1, accumulate_grad_batches=2).fit(a, small)
    t = quiet(max_epochs=1)
    t.fit(b, big)
    torch.testing.assert_close(a.net.weight, b.net.weight, rtol=1e-6, atol=1e-7)
    assert t.global_step == 2


class GradRecorder(Callback):
    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.norms.append(torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item())


def test_gradient_clipping_by_norm_is_applied_before_the_step():
    recorder = GradRecorder()
    quiet(max_epochs=1, gradient_clip_val=0.05, callbacks=[recorder]).fit(Regressor(), regression_batches(3))
    assert max(recorder.norms) <= 0.05 + 1e-6
    unclipped = GradRecorder()
    quiet(max_epochs=1, callbacks=[unclipped]).fit(Regressor(), regression_batches(3))
    assert max(unclipped.norms) > 0.05


class DtypeProbe(Regressor):
    dtypes: list = []

    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        DtypeProbe.dtypes.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch[1])


def test_bf16_mixed_autocasts_the_step_and_16_mixed_needs_cuda():
    DtypeProbe.dtypes = []
    quiet(max_epochs=1, precision="bf16-mixed").fit(DtypeProbe(), regression_batches(1))
    assert DtypeProbe.dtypes == [torch.bfloat16]
    with pytest.raises(ValueError, match="'16-mixed' needs a CUDA device"):
        quiet(max_epochs=1, precision="16-mixed").fit(Regressor(), regression_batches(1))
    with pytest.raises(ValueError, match="precision='64'"):
        quiet(max_epochs=1, precision="64").fit(Regressor(), regression_batches(1))


class CountingVal(Regressor):
    def __init__(self):
        super().__init__()
        self.val_at: list[tuple[int, int]] = []
        self.dl_indices: list[int] = []
        self.epoch_end_outputs = None

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_at.append((self.current_epoch, self.global_step))
        self.dl_indices.append(dataloader_idx)
        return super().validation_step(batch, batch_idx)

    def validation_epoch_end(self, outputs):
        self.epoch_end_outputs = outputs


def test_check_val_every_n_epoch():
    module = CountingVal()
    quiet(max_epochs=4, check_val_every_n_epoch=2).fit(module, regression_batches(2), val_dataloaders=regression_batches(1))
    assert sorted({e for e, _ in module.val_at}) == [1, 3]


@pytest.mark.parametrize("interval, expected_steps", [(0.5, [2, 4]), (1, [1, 2, 3, 4]), (2, [2, 4])])
def test_val_check_interval_fraction_and_batches(interval, expected_steps):
    module = CountingVal()
    quiet(max_epochs=1, val_check_interval=interval).fit(module, regression_batches(4), val_dataloaders=regression_batches(1))
    assert [s for _, s in module.val_at] == expected_steps


def test_limits_and_several_val_dataloaders_with_old_epoch_end_form():
    module = CountingVal()
    trainer = quiet(max_epochs=1, limit_train_batches=0.5, limit_val_batches=2)
    trainer.fit(module, regression_batches(8), val_dataloaders=[regression_batches(3), regression_batches(3, seed=2)])
    assert trainer.global_step == 4
    assert module.dl_indices == [0, 0, 1, 1]
    assert len(module.epoch_end_outputs) == 2 and len(module.epoch_end_outputs[0]) == 2
    assert "val_loss" in trainer.callback_metrics


def test_fast_dev_run_runs_one_batch_each_and_writes_nothing(tmp_path):
    module = Recorder()
    trainer = Trainer(fast_dev_run=True, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer.fit(module)
    assert module.calls.count("training_step") == 1 and module.calls.count("validation_step") == 1
    assert trainer.logger is None and not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "mlflow.db")


class StopAtOnce(Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


def test_min_epochs_and_min_steps_hold_off_a_stop():
    trainer = quiet(max_epochs=10, min_epochs=3, callbacks=[StopAtOnce()])
    trainer.fit(Regressor(), regression_batches(2))
    assert trainer.current_epoch == 3
    trainer = quiet(max_epochs=10, min_steps=5, callbacks=[StopAtOnce()])
    trainer.fit(Regressor(), regression_batches(2))
    assert trainer.global_step == 5  # the pending stop takes effect as soon as min_steps is met


def test_max_steps_wins_over_max_epochs():
    trainer = quiet(max_epochs=10, max_steps=3)
    trainer.fit(Regressor(), regression_batches(2))
    assert trainer.global_step == 3


def test_validate_test_and_predict():
    module = Regressor()
    trainer = quiet()
    val = trainer.validate(module, regression_batches(2))
    test = trainer.test(module, regression_batches(2))
    assert "val_loss" in val[0] and "test_loss" in test[0]
    predictions = trainer.predict(module, regression_batches(2))
    assert len(predictions) == 2 and predictions[0].shape == (8, 1)
    assert module.training


class SkipOdd(Regressor):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


def test_training_step_returning_none_skips_the_batch():
    trainer = quiet(max_epochs=1)
    trainer.fit(SkipOdd(), regression_batches(4))
    assert trainer.global_step == 2


def test_same_seed_same_result_and_logged_epoch_metrics():
    a, b = Regressor(), Regressor()
    quiet(max_epochs=2, seed=3).fit(a, regression_batches(3))
    quiet(max_epochs=2, seed=3).fit(b, regression_batches(3))
    assert torch.equal(a.net.weight, b.net.weight)


def test_bad_trainer_flags_are_clear_errors():
    with pytest.raises(ValueError, match="trainer.limit_train_batches=1.5"):
        Trainer(limit_train_batches=1.5)
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches must be an integer >= 1"):
        Trainer(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="gradient_clip_algorithm='l2'"):
        Trainer(gradient_clip_algorithm="l2")
    with pytest.raises(ValueError, match="trainer.strategy='horovod'"):
        Trainer(strategy="horovod")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(max_steps=5)
