"""Layer-wise lr decay and the ViT weight-decay exclusions of the `optim:` recipe, from a YAML
config through `scale-ssl fit`'s path: every parameter gets lr x rate^(L + 1 - layer) with the
layers torchvision's names define, position embedding / class token / biases / norms get no
weight decay, the schedule keeps the ratios, DINO's weight-decay schedule drives the recipe's
decayed groups, and wrong uses are one clear error."""

from __future__ import annotations

import os

import pytest
import torch

from scale_ssl.cli.fit import run_fit
from scale_ssl.config import ConfigError, load_config
from scale_ssl.methods import SimCLR
from scale_ssl.optim import OptimRecipe, RecipeError
from scale_ssl.optim.layer_decay import vit_layer_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 0.5
RECIPE = """
optim:
  optimizer: {name: AdamW, weight_decay: 0.04}
  lr: 0.001
  exclude_bn_bias: true
  layer_decay: %s
  lr_scheduler: {name: warmup_cosine, warmup: {steps: 1}}
"""


def test_layer_ids_follow_torchvision_vit_names():
    model = SimCLR(arch="vit_mini_4", in_channels=1, encoder_options={"image_size": 16}, hidden_mlp=8, feat_dim=4)
    ids, num_layers = vit_layer_ids(n for n, _ in model.named_parameters())
    assert num_layers == 6
    assert ids["encoder.conv_proj.weight"] == ids["encoder.class_token"] == ids["encoder.encoder.pos_embedding"] == 0
    assert ids["encoder.encoder.layers.encoder_layer_0.ln_1.weight"] == 1
    assert ids["encoder.encoder.layers.encoder_layer_5.mlp.3.bias"] == 6
    assert ids["encoder.encoder.ln.weight"] == ids["projection.layers.0.weight"] == 7  # after the last block


def _config(tmp_path, shards, recipe: str, *overrides):
    path = tmp_path / "dino_layer_decay.yaml"
    path.write_text(open(os.path.join(REPO, "configs", "dino", "fmnist_cpu.yaml")).read() + recipe)
    return load_config(str(path), [
        "trainer.strategy=single", "trainer.max_steps=2", "trainer.global_batch_size=8", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", f"trainer.default_root_dir={tmp_path}/run", f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/test", "data.num_workers=0", "data.shuffle_buffer=16", "tracking.enabled=false",
        "model.out_dim=32", "model.hidden_dim=16", "model.bottleneck_dim=8", "trainer.num_threads=1", *overrides])  # fmt: skip


@pytest.mark.timeout(300)
def test_dino_with_layer_decay_from_yaml(fmnist_shards, tmp_path):
    trainer, module = run_fit(_config(tmp_path, fmnist_shards, RECIPE % RATE))
    optimizer = trainer.optimizers[0]
    ids, num_layers = vit_layer_ids(n for n, p in module.named_parameters() if p.requires_grad)
    names = {id(p): n for n, p in module.named_parameters()}
    seen = []
    lr_now = optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1]["initial_lr"]  # the schedule's factor
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            expected = 0.001 * RATE ** (num_layers + 1 - ids[name])
            assert group["initial_lr"] == pytest.approx(expected), name
            assert group["lr"] == pytest.approx(expected * lr_now), name  # warmup-cosine scaled every group alike
            no_decay = p.ndim <= 1 or name.endswith(("pos_embedding", "class_token"))
            assert (group["weight_decay"] == 0.0) == no_decay, name
    trainable = [n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("teacher_")]
    assert sorted(seen) == sorted(trainable)  # each trainable student parameter exactly once
    assert not any(n.startswith("teacher_") for n in seen)
    # 8 layers (embedding, 6 blocks, the rest) x decayed / not decayed
    assert len(optimizer.param_groups) == 2 * (num_layers + 2)
    # DINO's cosine weight-decay schedule (0.04 -> 0.4) drives the recipe's decayed groups
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert all(g["weight_decay"] == pytest.approx(module.weight_decay_for_step(1)) for g in decayed)
    assert module.weight_decay_for_step(1) > 0.04


@pytest.mark.timeout(300)
def test_recipe_weight_decay_that_contradicts_dinos_schedule_is_refused(fmnist_shards, tmp_path):
    config = _config(tmp_path, fmnist_shards, RECIPE.replace("weight_decay: 0.04", "weight_decay: 0.05") % RATE)
    with pytest.raises(ValueError, match="weight_decay=0.05 but DINO schedules the weight decay from model.weight_decay=0.04"):
        run_fit(config)


def test_layer_decay_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be a number in \(0, 1\]"):
        load_config(os.path.join(REPO, "configs", "simclr", "fmnist_cpu.yaml"),
                    ["optim.optimizer.name=SGD", "optim.layer_decay=1.5"])
    recipe = OptimRecipe({"optimizer": {"name": "SGD"}, "lr": 0.1, "layer_decay": 0.75}, 256)
    resnet = SimCLR(arch="resnet10", in_channels=1, hidden_mlp=8, feat_dim=4)
    with pytest.raises(RecipeError, match="optim.layer_decay: layer-wise lr decay needs a ViT encoder"):
        recipe.build(resnet, 10, 10)


def test_exclude_bn_bias_without_layer_decay_keeps_vit_tokens_out_of_weight_decay():
    recipe = OptimRecipe({"optimizer": {"name": "AdamW", "weight_decay": 0.05}, "lr": 0.1, "exclude_bn_bias": True}, 256)
    model = SimCLR(arch="vit_mini_4", in_channels=1, encoder_options={"image_size": 16}, hidden_mlp=8, feat_dim=4)
    built = recipe.build(model, 10, 10)
    decayed, excluded = built.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    assert {"encoder.class_token", "encoder.encoder.pos_embedding"} <= excluded_names and excluded["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert torch.is_tensor(decayed["params"][0])
