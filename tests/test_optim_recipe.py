"""Optimization recipes from the config: every optimizer and scheduler by name, parameter groups
by pattern, lr scaling from the global batch, SWA, and clear errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from scale_ssl.optim import OptimRecipe, RecipeError, effective_lr
from scale_ssl.optim.recipe import optimizer_classes
from scale_ssl.trainer import SSLModule, Trainer

OPTIMIZER_KWARGS = {
    "SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {"weight_decay": 0.05}, "Adadelta": {}, "Adagrad": {},
    "Adamax": {}, "ASGD": {}, "RMSprop": {}, "Rprop": {}, "LBFGS": {"max_iter": 2}, "NAdam": {}, "RAdam": {},
    "LARS": {"momentum": 0.9, "eta": 0.001},
}


class Net(SSLModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.projection = nn.Linear(8, 2)
        self.prototypes = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.prototypes(self.projection(self.backbone(x))).sum(1, keepdim=True), y)


def batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def fit(recipe_yaml: str, global_batch=8, epochs=1, **trainer_kwargs):
    recipe = OptimRecipe(OmegaConf.to_container(OmegaConf.create(recipe_yaml)), global_batch)
    module = Net()
    trainer_kwargs = {"enable_progress_bar": False, **trainer_kwargs}
    trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      optim_recipe=recipe, **trainer_kwargs)
    trainer.fit(module, batches())
    return module, trainer


@pytest.mark.parametrize("name", sorted(OPTIMIZER_KWARGS))
def test_every_listed_optimizer_builds_from_yaml_and_steps(name):
    kwargs = ", ".join(f"{k}: {v}" for k, v in OPTIMIZER_KWARGS[name].items())
    start = Net().projection.weight.detach().clone()
    module, trainer = fit(f"{{optimizer: {{name: {name}{', ' + kwargs if kwargs else ''}}}, lr: 0.01}}")
    assert type(trainer.optimizers[0]).__name__ == name
    assert not torch.equal(start, module.projection.weight)


SCHEDULERS = {
    "warmup_cosine": "{name: warmup_cosine, warmup: {steps: 2}, final_lr: 0.001}",
    "LambdaLR": "{name: LambdaLR, rule: {name: linear_warmup, warmup: {steps: 3}}}",
    "MultiplicativeLR": "{name: MultiplicativeLR, rule: {name: constant_factor, factor: 0.9}}",
    "StepLR": "{name: StepLR, step_size: {steps: 2}, gamma: 0.5}",
    "MultiStepLR": "{name: MultiStepLR, milestones: [1, 3]}",
    "ExponentialLR": "{name: ExponentialLR, gamma: 0.9}",
    "CosineAnnealingLR": "{name: CosineAnnealingLR, T_max: auto}",
    "CyclicLR": "{name: CyclicLR, base_lr: 0.001, max_lr: 0.1, step_size_up: 2}",
    "OneCycleLR": "{name: OneCycleLR, max_lr: 0.1, total_steps: auto}",
    "CosineAnnealingWarmRestarts": "{name: CosineAnnealingWarmRestarts, T_0: 2}",
    "SequentialLR": "{name: SequentialLR, schedulers: [{name: LinearLR, start_factor: 0.1, total_iters: 2}, "
                    "{name: CosineAnnealingLR, T_max: 2}], milestones: [{steps: 2}]}",
    "ReduceLROnPlateau": None,  # needs a logged metric: test_reduce_on_plateau_from_yaml_reads_its_monitor
}


@pytest.mark.parametrize("name", sorted(k for k, v in SCHEDULERS.items() if v))
def test_every_listed_scheduler_builds_from_yaml_and_steps(name):
    optimizer = "{name: SGD, momentum: 0.9}" if name in ("CyclicLR", "OneCycleLR") else "{name: SGD}"
    module, trainer = fit(f"{{optimizer: {optimizer}, lr: 0.05, lr_scheduler: {SCHEDULERS[name]}}}", epochs=2)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler).__name__ == ("WarmupCosineSchedule" if name == "warmup_cosine" else name)
    assert scheduler.last_epoch == 8  # stepped once per optimizer step (2 epochs x 4)


class LossLogger(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_epoch=True)
        return loss


def test_reduce_on_plateau_from_yaml_reads_its_monitor():
    recipe = OptimRecipe({"optimizer": {"name": "SGD"}, "lr": 0.05,
                          "lr_scheduler": {"name": "ReduceLROnPlateau", "monitor": "train_loss", "interval": "epoch"}}, 8)
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, optim_recipe=recipe)
    trainer.fit(LossLogger(), batches())
    assert trainer.lr_scheduler_configs[0].monitor == "train_loss"


def test_warmup_cosine_values_match_the_closed_form():
    module, trainer = fit("{optimizer: {name: SGD}, lr: 1.0, lr_scheduler: {name: warmup_cosine, warmup: {steps: 2}, total: {steps: 4}}}")
    # 4 steps done: the schedule has reached its end (final_lr = 0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_linear_and_sqrt_scaling_use_the_global_batch():
    rule = {"base": 0.3, "scale": "linear", "reference_batch": 256}
    # world 1 x batch 512 and world 4 x batch 128 have the same global batch: same lr
    assert effective_lr(rule, global_batch=1 * 512) == effective_lr(rule, global_batch=4 * 128) == pytest.approx(0.6)
    assert effective_lr({**rule, "scale": "sqrt"}, 1024) == pytest.approx(0.6)
    assert effective_lr({**rule, "scale": "none"}, 4096) == pytest.approx(0.3)
    _, trainer = fit("{optimizer: {name: SGD}, lr: {base: 0.3, scale: linear, reference_batch: 256}}", global_batch=512)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.6)
    assert trainer.recipe.effective_lr == pytest.approx(0.6)


def test_param_groups_by_pattern_cover_every_parameter_once_and_freeze():
    yaml = """{optimizer: {name: LARS, momentum: 0.9, weight_decay: 0.01}, lr: 0.1, exclude_bn_bias: true,
               param_groups: [{pattern: 'projection.*', lr_scale: 10.0}, {pattern: 'prototypes*', freeze_epochs: 1}]}"""
    start = Net()
    module, trainer = fit(yaml)
    groups = trainer.optimizers[0].param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.parameters()))
    assert groups[0]["lr"] == pytest.approx(1.0)  # projection: x10
    no_decay = [g for g in groups if g.get("weight_decay") == 0.0]
    assert no_decay and all(p.ndim == 1 for p in no_decay[0]["params"]) and no_decay[0]["lars_adaptation"] is False
    assert torch.equal(start.prototypes.weight, module.prototypes.weight)  # frozen for epoch 0
    assert not torch.equal(start.projection.weight, module.projection.weight)
    names = [g["name"] for g in trainer.recipe.groups]
    assert names == ["projection.*", "prototypes*", "default", "bias_and_norm"]


def test_swa_from_the_recipe():
    module, trainer = fit("{optimizer: {name: SGD}, lr: 0.05, swa: {start_epoch: 1, lr: 0.01, anneal_epochs: 1}}", epochs=3)
    assert any(type(cb).__name__ == "StochasticWeightAveraging" for cb in trainer.callbacks)
    swa = [cb for cb in trainer.callbacks if type(cb).__name__ == "StochasticWeightAveraging"][0]
    assert int(swa.averaged.n_averaged) == 2
    for name, p in swa.averaged.module.named_parameters():  # the module ends with the averaged weights
        assert torch.equal(p, dict(module.named_parameters())[name]), name
    # ... and BatchNorm statistics recomputed for them over the training stream (swa_utils.update_bn)
    from torch.optim.swa_utils import update_bn

    reference = Net()
    reference.load_state_dict(module.state_dict())
    update_bn((x for x, _ in batches()), reference)
    bn = module.backbone[1]
    assert torch.allclose(bn.running_mean, reference.backbone[1].running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, reference.backbone[1].running_var, atol=1e-6)


def test_resume_restores_the_scheduler_position(tmp_path):
    yaml = "{optimizer: {name: SGD, momentum: 0.9}, lr: 0.1, lr_scheduler: {name: warmup_cosine, warmup: {steps: 3}}}"
    recipe = OptimRecipe(OmegaConf.to_container(OmegaConf.create(yaml)), 8)

    class Stop(__import__("scale_ssl").Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 3

    def run(root, ckpt=None, stop=False):
        module = Net()
        t = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=str(root), optim_recipe=recipe,
                    callbacks=[Stop()] if stop else [])
        t.fit(module, batches(), ckpt_path=ckpt)
        return module, t

    straight, ts = run(tmp_path / "a")
    run(tmp_path / "b", stop=True)
    resumed, tr = run(tmp_path / "b", ckpt="last")
    assert ts.optimizers[0].param_groups[0]["lr"] == tr.optimizers[0].param_groups[0]["lr"]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"optimizer": {"name": "Adamm"}}, "optim.optimizer.name='Adamm' is not an optimizer"),
        ({"optimizer": {"name": "SGD", "momentun": 0.9}}, "SGD has no argument(s) ['momentun']; valid arguments:"),
        ({"optimizer": {"name": "SGD", "lr": 0.1}}, "give the learning rate as optim.lr"),
        ({"optimizer": {}}, "optim.optimizer.name is required"),
        ({"optimizer": {"name": "SGD"}, "lr": {"base": 0.1, "scale": "cubic"}}, "optim.lr.scale='cubic'"),
        ({"optimizer": {"name": "SGD"}, "lr_scheduler": {"name": "CosineAnnealing"}}, "is not a scheduler"),
        ({"optimizer": {"name": "SGD"}, "lr_scheduler": {"name": "StepLR", "stepsize": 2}}, "StepLR has no argument(s) ['stepsize']"),
        ({"optimizer": {"name": "SGD"}, "lr_scheduler": {"name": "warmup_cosine", "warmup_epochs": 2}}, "warmup_cosine has no argument"),
        ({"optimizer": {"name": "SGD"}, "param_groups": [{"lr_scale": 2}]}, "needs a 'pattern'"),
        ({"optimizer": {"name": "SGD"}, "scheduler": {}}, "optim has unknown keys ['scheduler']"),
    ],
)
def test_bad_recipes_are_one_clear_error(recipe, message):
    with pytest.raises(RecipeError) as err:
        OptimRecipe(recipe, 256)
    assert message in str(err.value)


def test_a_pattern_matching_nothing_is_an_error():
    with pytest.raises(RecipeError, match="pattern='head.*' matches no trainable parameter"):
        fit("{optimizer: {name: SGD}, param_groups: [{pattern: 'head.*', lr_scale: 2.0}]}")


def test_all_torch_optimizers_are_reachable_by_name():
    names = set(optimizer_classes())
    assert {"SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "RMSprop", "Rprop", "LBFGS", "NAdam",
            "RAdam", "SparseAdam", "LARS"} <= names


class RecordLr(__import__("scale_ssl").Callback):
    """The lr each optimizer step trains with (read before the step)."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_recording(recipe_yaml: str, epochs: int, n_batches: int = 4):
    recipe = OptimRecipe(OmegaConf.to_container(OmegaConf.create(recipe_yaml)), 8)
    record = RecordLr()
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, optim_recipe=recipe, callbacks=[record])
    trainer.fit(Net(), batches(n_batches))
    return record.lrs, trainer


def test_warmup_cosine_in_epochs_follows_the_closed_form_at_every_step():
    """warmup 1 epoch of a 4-batch stream = 4 steps, total auto = 3 epochs = 12 steps."""
    import math

    lrs, trainer = fit_recording("{optimizer: {name: SGD}, lr: 0.08, lr_scheduler: {name: warmup_cosine, "
                                 "warmup: {epochs: 1}, start_lr: 0.0, final_lr: 0.001}}", epochs=3)
    warmup, total, peak, start, final = 4, 12, 0.08, 0.0, 0.001

    def closed_form(t):
        if t < warmup:
            return start + (peak - start) * t / warmup
        return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    assert lrs == pytest.approx([closed_form(t) for t in range(12)], abs=1e-12)
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.08) and lrs[8] == pytest.approx((0.08 + 0.001) / 2)


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        ("{name: LambdaLR, rule: {name: linear_warmup, warmup: {steps: 4}}}",
         lambda t: 0.05 * min(1.0, (t + 1) / 4)),
        ("{name: LambdaLR, rule: {name: inverse_sqrt, warmup: {epochs: 1}}}",  # 1 epoch = 4 steps
         lambda t: 0.05 * min((t + 1) / 4, (4 / (t + 1)) ** 0.5)),
        ("{name: LambdaLR, rule: {name: polynomial, total: auto, power: 2}}",  # auto = 8 steps
         lambda t: 0.05 * (1 - t / 8) ** 2),
        ("{name: MultiplicativeLR, rule: {name: constant_factor, factor: 0.9}}",
         lambda t: 0.05 * 0.9 ** t),
    ],
)
def test_named_rules_make_lambda_and_multiplicative_lr_reachable_from_yaml(scheduler, expected):
    lrs, trainer = fit_recording(f"{{optimizer: {{name: SGD}}, lr: 0.05, lr_scheduler: {scheduler}}}", epochs=2)
    assert type(trainer.lr_scheduler_configs[0].scheduler).__name__ in ("LambdaLR", "MultiplicativeLR")
    assert lrs == pytest.approx([expected(t) for t in range(8)], rel=1e-12)


@pytest.mark.parametrize(
    "scheduler, message",
    [
        ({"name": "LambdaLR", "rule": "cosine_restart"}, "rule='cosine_restart' is not a LambdaLR rule"),
        ({"name": "LambdaLR", "rule": {"name": "linear_warmup"}}, "rule 'linear_warmup' needs ['warmup']"),
        ({"name": "LambdaLR", "rule": {"name": "polynomial", "total": 9, "pwr": 2}}, "has no argument(s) ['pwr']"),
        ({"name": "MultiplicativeLR"}, "MultiplicativeLR needs a named rule"),
        ({"name": "MultiplicativeLR", "rule": "linear_warmup"}, "is not a MultiplicativeLR rule"),
    ],
)
def test_bad_named_rules_are_one_clear_error(scheduler, message):
    with pytest.raises(RecipeError) as err:
        OptimRecipe({"optimizer": {"name": "SGD"}, "lr_scheduler": scheduler}, 8)
    assert message in str(err.value) and "optim.lr_scheduler" in str(err.value)


def test_a_named_rule_resumes_from_the_checkpoint(tmp_path):
    """The rule's arguments travel in the scheduler state: the resumed lrs equal the straight run's."""
    yaml = "{optimizer: {name: SGD}, lr: 0.05, lr_scheduler: {name: LambdaLR, rule: {name: polynomial, total: auto}}}"
    recipe = OptimRecipe(OmegaConf.to_container(OmegaConf.create(yaml)), 8)

    class Stop(__import__("scale_ssl").Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 3

    def run(root, ckpt=None, stop=False):
        record = RecordLr()
        t = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=str(root), optim_recipe=recipe,
                    callbacks=[record, *([Stop()] if stop else [])])
        t.fit(Net(), batches(), ckpt_path=ckpt)
        return record.lrs

    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop=True)
    resumed = run(tmp_path / "b", ckpt="last")
    assert first + resumed == pytest.approx(straight, rel=1e-12) and len(straight) == 8


class SparseNet(SSLModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(10, 4, sparse=True)

    def training_step(self, batch, batch_idx):
        return self.embedding(batch[0]).pow(2).mean()


def test_sparse_adam_from_yaml_trains_sparse_embeddings():
    recipe = OptimRecipe({"optimizer": {"name": "SparseAdam", "betas": [0.9, 0.99]}, "lr": 0.1}, 8)
    module = SparseNet()
    start = module.embedding.weight.detach().clone()
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, optim_recipe=recipe)
    trainer.fit(module, [(torch.tensor([1, 2, 3]),), (torch.tensor([3, 4]),)])
    assert type(trainer.optimizers[0]).__name__ == "SparseAdam"
    changed = (module.embedding.weight != start).any(1)
    assert changed.tolist() == [False, True, True, True, True, False, False, False, False, False]  # only rows seen


def test_the_banner_shows_each_group_with_its_lr_at_start_warmup_and_end(capsys):
    _, trainer = fit("{optimizer: {name: SGD, weight_decay: 0.01}, lr: 0.4, exclude_bn_bias: true, lr_scheduler: "
                     "{name: warmup_cosine, warmup: {steps: 2}, final_lr: 0.004}}", enable_progress_bar=True)
    out = capsys.readouterr().out
    assert "optimization recipe: SGD, effective lr 0.4 (from the global batch), schedule WarmupCosineSchedule" in out
    default, norm = [line for line in out.splitlines() if line.strip().startswith("group ")]
    # Net: Linear(4,8) + Linear(8,2) + Linear(2,3, no bias) weights = 32 + 16 + 6; biases + BN = 8 + 2 + 8 + 8
    assert "group default" in default and " 54 params" in default and "wd 0.01" in default
    assert "group bias_and_norm" in norm and " 26 params" in norm and "wd 0" in norm
    assert "lr 0 @0 -> 0.4 @2 -> 0.004 @4" in default


def test_the_banner_runs_any_scheduler_to_its_last_step(capsys):
    fit("{optimizer: {name: SGD}, lr: 0.4, lr_scheduler: {name: StepLR, step_size: {steps: 1}, gamma: 0.5}}",
        enable_progress_bar=True)
    out = capsys.readouterr().out
    assert "lr 0.4 @0 -> 0.05 @3 (last)" in out  # 4 steps: 0.4, 0.2, 0.1, 0.05


def test_freeze_epochs_freezes_the_group_only_for_those_epochs():
    class Snapshot(__import__("scale_ssl").Callback):
        def __init__(self):
            self.prototypes = []

        def on_train_epoch_end(self, trainer, module):
            self.prototypes.append(module.prototypes.weight.detach().clone())

    recipe = OptimRecipe(OmegaConf.to_container(OmegaConf.create(
        "{optimizer: {name: SGD}, lr: 0.1, param_groups: [{pattern: 'prototypes*', freeze_epochs: 1}]}")), 8)
    snapshot = Snapshot()
    start = Net().prototypes.weight.detach().clone()
    Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
            optim_recipe=recipe, callbacks=[snapshot]).fit(Net(), batches())
    assert torch.equal(snapshot.prototypes[0], start)  # epoch 0: frozen
    assert not torch.equal(snapshot.prototypes[1], start)  # epoch 1: trained
