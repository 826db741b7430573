"""Every config under configs/ resolves at the scale it states (``plan.world_size``) without
launching: per-device batch, accumulation, queue divisibility and lr rule are derived and checked
by ``resolve_plan`` (what ``scale-ssl plan`` prints). A config that cannot run at its stated scale
fails here. Pure Python: no process group, no data; the ImageNet shard paths need not exist."""

from __future__ import annotations

import glob
import json
import math
import os
import re

import pytest
import torch

from scale_ssl.cli.assembly import build_strategy_from_config
from scale_ssl.cli.main import main
from scale_ssl.cli.run_plan import resolve_plan
from scale_ssl.config import ConfigError, load_config
from scale_ssl.methods import SimCLR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
IMAGENET = [c for c in CONFIGS if os.path.basename(c).startswith("imagenet_")]
METHODS = ("simclr", "swav", "moco", "byol", "simsiam")
# Devices per scale: a TPU v4 chip is one XLA device (megacore), so v4-128 has 64 devices.
WORLD_BY_SCALE = {"64gpu": 64, "tpu_v3_128": 128, "tpu_v4_128": 64}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name repo-relative paths (DeepSpeed JSON, shard indexes)


def test_the_issue_configs_exist():
    expected = {f"configs/{m}/imagenet_{s}.yaml" for m in METHODS for s in WORLD_BY_SCALE}
    expected.add("configs/swav/imagenet_64gpu_deepspeed.yaml")
    expected |= {"configs/dino/fmnist_cpu.yaml", "configs/dino/imagenet_64gpu.yaml", "configs/dino/imagenet_tpu_v3_128.yaml"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_resolves_at_its_stated_world_size(path):
    config = load_config(path)
    t, p = config.trainer, config.plan
    assert p.world_size is not None, f"{path}: state plan.world_size (the scale it is written for)"
    plan = resolve_plan(config)

    assert plan.world_size == p.world_size
    assert plan.per_device_batch_size * plan.world_size * plan.accumulate_grad_batches == t.global_batch_size
    assert plan.steps_per_epoch >= 1
    assert plan.steps_per_epoch * plan.per_device_batch_size * plan.world_size + plan.samples_dropped_per_epoch == plan.num_samples
    step_batch = t.global_batch_size // t.accumulate_grad_batches
    if plan.queue_length:
        assert plan.queue_length % step_batch == 0
        if config.method == "swav":
            assert plan.queue_rows_per_rank * plan.world_size == plan.queue_length
    if p.lr_rule not in (None, "none"):
        ratio = t.global_batch_size / p.base_batch_size
        expected = p.base_learning_rate * (ratio if p.lr_rule == "linear" else math.sqrt(ratio))
        assert plan.learning_rate == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("path", IMAGENET)
def test_imagenet_configs_state_anchor_scale_and_lr_rule(path):
    text = open(path).read()
    assert re.search(r"^# Anchor: .*\d\d\.\d% top-1", text, re.M), f"{path}: state the published anchor result"
    config = load_config(path)
    scale = os.path.basename(path)[len("imagenet_"):-len(".yaml")].replace("_deepspeed", "").replace("_fsdp", "")
    plan = resolve_plan(config)
    assert plan.world_size == WORLD_BY_SCALE[scale]
    # DINO's ViT-S/16 anchor is at batch 1024 (the ResNet-50 anchors at 4096)
    assert config.trainer.global_batch_size == (1024 if config.method == "dino" else 4096)
    assert str(config.trainer.precision) == "bf16-mixed"
    assert config.plan.lr_rule in ("linear", "sqrt"), f"{path}: state the lr rule the lr follows"
    backend = "deepspeed" if "deepspeed" in path else ("fsdp" if "fsdp" in path else "ddp")
    assert config.trainer.strategy == ("xla" if scale.startswith("tpu") else backend)
    # Global BN over all ranks, by the strategy (DeepSpeed included) or by the model (MoCo's sync_bn);
    # DINO's ViT and head have no BN.
    if config.method == "dino":
        from omegaconf import OmegaConf

        from scale_ssl.methods import DINO

        model = DINO(**{**OmegaConf.to_container(config.model, resolve=True), "out_dim": 16})  # a small last layer
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    else:
        assert config.trainer.sync_batchnorm or config.model.get("sync_bn"), f"{path}: global BN expected"
    assert plan.num_samples == 1281167
    strategy = build_strategy_from_config(config)  # what fit builds: global BN reaches the strategy
    assert getattr(strategy, "sync_batchnorm", False) == bool(config.trainer.sync_batchnorm)


# -- each check fails when the config is wrong --------------------------------------------------

def _plan(path, *overrides, world=None):
    return resolve_plan(load_config(path, list(overrides)), world)


def test_batch_that_does_not_divide_over_the_ranks_fails():
    with pytest.raises(ConfigError, match="global_batch_size=4000 is not divisible by world_size \\(64\\)"):
        _plan("configs/simclr/imagenet_64gpu.yaml", "trainer.global_batch_size=4000", "model.learning_rate=4.6875")


def test_the_same_config_at_another_world_size_rederives_the_batch():
    plan = _plan("configs/simclr/imagenet_tpu_v3_128.yaml", world=256)
    assert plan.per_device_batch_size == 16 and plan.steps_per_epoch == 1281167 // 4096
    with pytest.raises(ConfigError, match="not divisible by world_size \\(3\\)"):
        _plan("configs/simclr/imagenet_64gpu.yaml", world=3)


def test_accumulation_divides_the_device_batch_and_the_negatives():
    plan = _plan("configs/simclr/imagenet_64gpu.yaml", "trainer.accumulate_grad_batches=4")
    assert plan.per_device_batch_size == 16
    assert plan.negatives_per_anchor == 2 * 1024 - 2  # one micro-step's global batch is 1024


def test_lr_that_ignores_the_rule_fails():
    with pytest.raises(ConfigError, match="does not follow plan.lr_rule .*set model.learning_rate=2.4"):
        _plan("configs/simclr/imagenet_64gpu.yaml", "trainer.global_batch_size=2048")
    # sqrt rule (SimCLR's small-batch rule in the Fashion-MNIST config)
    with pytest.raises(ConfigError, match="model.learning_rate=1.2 does not follow plan.lr_rule \\(sqrt"):
        _plan("configs/simclr/fmnist_cpu.yaml", "trainer.global_batch_size=1024")


def test_queue_that_is_not_a_multiple_of_the_global_batch_fails():
    with pytest.raises(ConfigError, match="num_negatives=65000 is not a multiple of the global batch 4096"):
        _plan("configs/moco/imagenet_64gpu.yaml", "model.num_negatives=65000")
    # SwAV's script asks for 3840 rows; at batch 4096 that is not a multiple (the config uses 0)
    with pytest.raises(ConfigError, match="queue_length=3840 is not divisible by trainer.global_batch_size=4096"):
        _plan("configs/swav/imagenet_64gpu.yaml", "model.queue_length=3840")
    plan = _plan("configs/swav/imagenet_64gpu.yaml", "model.queue_length=8192")
    assert plan.queue_rows_per_rank == 128 and plan.method_figures["sinkhorn_rows"] == 4096 + 8192


def test_deepspeed_json_that_disagrees_with_the_trainer_fails(tmp_path):
    plan = _plan("configs/swav/imagenet_64gpu_deepspeed.yaml")
    ds = plan.deepspeed_config
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["zero_optimization"]["stage"]) == (4096, 64, 2)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 2048, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_batch_size=2048 but the trainer settings give 4096"):
        _plan("configs/swav/imagenet_64gpu_deepspeed.yaml", f"trainer.deepspeed_config={bad}")
    # one process already normalises over its whole batch: the default global BN is a no-op there
    _plan("configs/simclr/fmnist_cpu.yaml", "trainer.strategy=single", "trainer.sync_batchnorm=true", world=1)


def test_one_process_strategy_cannot_be_planned_on_many_ranks():
    with pytest.raises(ConfigError, match="trainer.strategy=single runs one process"):
        _plan("configs/simclr/fmnist_cpu.yaml", "trainer.strategy=single")


def test_no_dataset_size_is_an_error():
    with pytest.raises(ConfigError, match="plan.num_samples is not set"):
        _plan("configs/simclr/imagenet_64gpu.yaml", "plan.num_samples=null")


def test_steps_per_epoch_from_a_shard_index_match_the_stream(fmnist_shards):
    """With a readable shards.json the plan uses the stream's own epoch plan: equal numbers."""
    from scale_ssl.data import ShardedImageStream

    train = str(fmnist_shards / "train")
    config = load_config("configs/simclr/fmnist_cpu.yaml", [f"data.train_shards={train}", "trainer.global_batch_size=64",
                                                            "data.num_workers=2", "plan.lr_rule=null"])
    plan = resolve_plan(config, 2)
    for rank in range(2):
        stream = ShardedImageStream(train, batch_size=32, transform=lambda image: image, rank=rank, world_size=2, num_workers=2,
                                    seed=config.trainer.seed)
        assert (plan.steps_per_epoch, plan.samples_dropped_per_epoch) == (stream.steps_per_epoch, stream.samples_dropped_per_epoch)
    assert plan.num_samples == 600 and "shard index" in plan.samples_source


def test_plan_command_prints_the_resolution(capsys):
    code = main(["plan", "--config", "configs/swav/imagenet_64gpu_deepspeed.yaml", "--no-measure"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4096 = 64/device x 64 ranks x 1 accumulation" in out
    assert "steps per epoch     312" in out
    assert "ZeRO stage 2, train_batch_size 4096" in out
    assert main(["plan", "--config", "configs/simclr/imagenet_64gpu.yaml", "--world-size", "3"]) == 2
    assert "not divisible by world_size (3)" in capsys.readouterr().err


# -- the memory / communication measurement behind `scale-ssl plan` ------------------------------

def test_step_cost_collectives_are_the_methods_own_and_extrapolation_matches_a_direct_measurement():
    from scale_ssl.cli.step_cost import _measure, measure_step_cost

    config = load_config("configs/simclr/fmnist_cpu.yaml", ["trainer.sync_batchnorm=true", "trainer.precision=32"])
    world, batch = 8, 16
    cost = measure_step_cost(config, world, batch)
    feat = config.model.feat_dim
    # NT-Xent gathers (b, 2 x feat_dim) fp32 rows from every rank; its backward all-reduces that much.
    assert cost.collectives[("nt_xent.forward", "all_gather", "forward")] == world * batch * 2 * feat * 4
    assert cost.collectives[("nt_xent.forward", "all_reduce", "backward")] == world * batch * 2 * feat * 4
    # Global BN gathers one (2C + 1) fp32 row per rank per BN layer, whatever the batch.
    norms = [m for m in SimCLR(**config.model).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    channels, layers = sum(m.num_features for m in norms), len(norms)
    assert cost.collectives[("global_batchnorm.forward", "all_gather", "forward")] == world * (2 * channels + layers) * 4
    assert cost.gradient_sync == [("gradient all_reduce (fp32)", cost.trainable_params * 4)]
    # Activations: linear extrapolation from batches 2 and 4 == a real forward at batch 16 (within 5%).
    direct = _measure(config, world, batch, False)["saved"]
    assert cost.activation_bytes == pytest.approx(direct, rel=0.05)


def test_step_cost_shards_zero_state_over_the_ranks():
    from scale_ssl.cli.step_cost import _state_bytes

    config = load_config("configs/swav/imagenet_64gpu_deepspeed.yaml")
    t = config.trainer
    ddp = _state_bytes(load_config("configs/swav/imagenet_64gpu.yaml").trainer, 1000, 0, 1, 64)
    zero2 = _state_bytes(t, 1000, 0, 1, 64)
    assert ddp[:3] == (4000.0, 4000.0, 4000.0)  # fp32 weights, gradients, momentum
    # bf16 weights kept whole; bf16 gradients and (fp32 master + momentum) sharded over 64 ranks
    assert zero2[:3] == (2000.0, 2000.0 / 64, 8000.0 / 64)
    assert [what for what, _ in zero2[3]] == ["gradient reduce_scatter", "updated weights all_gather"]
