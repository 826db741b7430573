"""AMDIM and CPC v2 as methods: mix-and-match tasks, every strategy on the real Fashion-MNIST shards,
a short real fit on 2 DDP ranks with the loss going down, checkpoints, clear errors. (Encoder quality
is a benchmark, benchmarks/quality_fmnist.py, not a test: on the 600-image fixture after 60 steps
AMDIM's and CPC v2's kNN were within one test image of a random-init encoder's.)"""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
from torch import nn

from scale_ssl.config import load_config
from scale_ssl.data import ShardedImageStream
from scale_ssl.losses import CPCTask, FeatureMapContrastiveTask
from scale_ssl.methods import AMDIM, CPCV2
from scale_ssl.models.amdim_encoder import AMDIMEncoder
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.distributed import run_on_ranks
from tests.test_methods_fit import loss_went_down

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {m: os.path.join(REPO, "configs", m, "fmnist_cpu.yaml") for m in ("amdim", "cpc_v2")}
# Tiny encoders: a step at global batch 64 takes well under a second on one core.
TINY = {
    # No BatchNorm here: dp's per-part statistics would differ from one process by design.
    "amdim": ["model.encoder_feature_dim=16", "model.embedding_fx_dim=32", "model.conv_block_depth=1",
              "model.use_bn=false", "model.learning_rate=0.001"],
    "cpc_v2": ["model.encoder_width=8", "model.encoder_depth=1", "model.target_dim=16", "model.learning_rate=0.002"],
}


def overrides(method, shards, root, steps, strategy="ddp", tiny=True, batch=64):
    return [
        f"trainer.strategy={strategy}",
        f"trainer.max_steps={steps}",
        f"trainer.global_batch_size={batch}",
        "trainer.log_every_n_steps=1",
        "trainer.precision=32",
        "trainer.enable_progress_bar=false",
        f"trainer.default_root_dir={root}",
        f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/test",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "tracking.enabled=false",
        *(TINY[method] if tiny else []),
    ]


def losses_of(trainer):
    return [row["train/loss"] for row in trainer.history if "train/loss" in row]


def _fit(rank, world, config_path, args):
    from scale_ssl.cli.fit import run_fit

    trainer, module = run_fit(load_config(config_path, args))
    online = [row["online_train_acc"] for row in trainer.history if "online_train_acc" in row]
    state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
    return losses_of(trainer), online, state


# -- mix and match ------------------------------------------------------------------------------

def one_real_batch(shards, batch=32):
    data = load_config(CONFIG["cpc_v2"]).data
    stream = ShardedImageStream(str(shards / "train"), batch_size=batch, transform=CPCV2.train_transform(data),
                                rank=0, world_size=1, num_workers=0, seed=0)
    return next(iter(stream))


def quiet_trainer(strategy="single", steps=8, **kwargs):
    return Trainer(strategy=strategy, max_steps=steps, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                   enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)


def test_cpcv2_with_an_amdim_feature_map_task_trains(fmnist_shards):
    seed_everything(0)
    task = FeatureMapContrastiveTask(comparisons="01, 11, 02", bidirectional=True)
    model = CPCV2(contrastive_task=task, image_channels=1, image_height=28, encoder_width=8, encoder_depth=1,
                  learning_rate=3e-3, online_ft=False)
    assert model.contrastive_task is task and model.uses_feature_maps
    start = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    batch = one_real_batch(fmnist_shards)
    trainer = quiet_trainer(steps=8)
    trainer.fit(model, [batch] * 8)
    losses = losses_of(trainer)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    print("CPCV2 + FeatureMapContrastiveTask('01, 11, 02') on one real batch:", [round(v, 4) for v in losses])
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns (the same batch, fresh anchor draws)
    assert task.calls == 8  # the task really ran every step
    assert any(not torch.equal(start[k], v) for k, v in model.encoder.state_dict().items())


def test_task_names_and_encoders_can_be_mixed():
    x = torch.randn(2, 1, 28, 28)
    amdim_task = CPCV2(task="amdim", image_channels=1, image_height=28, encoder_width=4, encoder_depth=0, online_ft=False)
    assert isinstance(amdim_task.contrastive_task, FeatureMapContrastiveTask)
    assert amdim_task.contrastive_task.comparisons == ((0, 1), (0, 2), (1, 1))
    cpc = CPCV2(image_channels=1, image_height=28, encoder_width=4, encoder_depth=0)
    assert isinstance(cpc.contrastive_task, CPCTask) and cpc.encoder.grid_size == 6
    resnet = CPCV2(encoder_name="resnet10", image_channels=1, image_height=28, online_ft=False)
    assert resnet.encoder(x).shape == (2, 512)
    module = CPCV2(encoder_name=nn.Sequential(nn.Conv2d(1, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                   image_channels=1, image_height=28, online_ft=False)
    assert module.encoder(x).shape == (2, 5) and module.encoder.feature_grid(x).shape == (2, 5, 6, 6)

    amdim = AMDIM(image_channels=1, image_height=28, encoder_feature_dim=4, embedding_fx_dim=8, conv_block_depth=0)
    assert [m.shape[-1] for m in amdim.encoder.feature_maps(x)] == [1, 5, 7] and amdim.encoder(x).shape == (2, 16)
    res = AMDIM(encoder="resnet10", image_channels=1, image_height=28, embedding_fx_dim=8)
    assert [m.shape[-1] for m in res.encoder.feature_maps(x)] == [1, 4, 7] and res.encoder(x).shape == (2, 512)
    given = AMDIMEncoder(1, 28, 4, 8, 0)
    assert AMDIM(encoder=given, image_channels=1, image_height=28).encoder is given
    assert "encoder" not in AMDIM(encoder=given, image_channels=1, image_height=28).hparams  # no module in checkpoints


# -- clear errors -------------------------------------------------------------------------------

def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"CPCV2: patch_size=8 with patch_overlap=2 .* does not tile a 28-px image"):
        CPCV2(image_channels=1, image_height=28, patch_size=8, patch_overlap=2)
    with pytest.raises(ValueError, match="patch_overlap=8 must be smaller than patch_size=8"):
        CPCV2(image_channels=1, image_height=28, patch_size=8, patch_overlap=8)
    with pytest.raises(ValueError, match=r"AMDIM: comparison '03' .* names feature map 3, but the encoder produces 3 map"):
        AMDIM(contrastive_task="01, 03", image_channels=1, image_height=28, encoder_feature_dim=4, embedding_fx_dim=8,
              conv_block_depth=0)
    with pytest.raises(ValueError, match=r"CPCV2: comparison '31' .* names feature map 3"):
        CPCV2(contrastive_task=FeatureMapContrastiveTask("31"), image_channels=1, image_height=28, encoder_width=4)
    with pytest.raises(ValueError, match="malformed"):
        AMDIM(contrastive_task="1-5", image_channels=1, image_height=28, encoder_feature_dim=4, embedding_fx_dim=8)
    with pytest.raises(ValueError, match="AMDIM: encoder='vgg' is not known"):
        AMDIM(encoder="vgg", image_channels=1, image_height=28)
    with pytest.raises(TypeError, match="has no feature_maps"):
        AMDIM(encoder=nn.Linear(3, 3), image_channels=1, image_height=28)
    with pytest.raises(ValueError, match="CPCV2: task='moco' is not known"):
        CPCV2(task="moco", image_channels=1, image_height=28, encoder_width=4)
    with pytest.raises(ValueError, match="patch grid has 2 rows"):
        CPCV2(image_channels=1, image_height=28, patch_size=16, patch_overlap=4, encoder_width=4)
    with pytest.raises(ValueError, match="image_height=16 is too small"):
        AMDIM(image_channels=1, image_height=16)


# -- every strategy on the real shards ----------------------------------------------------------

@pytest.mark.parametrize("method", ["amdim", "cpc_v2"])
def test_single_and_dp_run_on_the_shards_and_dp_sees_the_full_batch(method, fmnist_shards, tmp_path):
    from scale_ssl.cli.fit import run_fit

    results = {}
    for strategy, extra in (("single", []), ("dp", ["trainer.devices=2"])):
        seed_everything(0)
        args = overrides(method, fmnist_shards, tmp_path / strategy, 2, strategy=strategy, batch=32) + extra
        trainer, module = run_fit(load_config(CONFIG[method], args))
        results[strategy] = losses_of(trainer)
        assert trainer.global_step == 2
    print(f"{method}: single {results['single']}, dp x2 {results['dp']}")
    assert all(math.isfinite(v) for v in results["single"] + results["dp"])
    # The loss is computed in training_step_end over both dp parts: the first step's loss is the
    # single-process loss of the same batch (same seed, same data order).
    assert results["dp"][0] == pytest.approx(results["single"][0], rel=1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["amdim", "cpc_v2"])
def test_short_real_fit_on_two_ddp_ranks_lowers_the_loss(method, fmnist_shards, tmp_path):
    losses, online, state = run_on_ranks(_fit, 2, CONFIG[method], overrides(method, fmnist_shards, tmp_path, 10))[0]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    first, last = loss_went_down(method, losses, 3)
    print(f"{method} (2 DDP ranks): loss {first:.4f} (first 3 steps) -> {last:.4f} (last 3 of 10)")
    assert last < first
    if method == "cpc_v2":  # online_ft=True in the config: the online linear head trained every step
        assert len(online) == 10 and all(0 <= a <= 1 for a in online)


def test_checkpoint_reloads_the_encoder_and_the_online_head(fmnist_shards, tmp_path):
    from scale_ssl.cli.fit import run_fit

    args = overrides("cpc_v2", fmnist_shards, tmp_path, 2, strategy="single", batch=32)
    trainer, module = run_fit(load_config(CONFIG["cpc_v2"], args))
    [ckpt] = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    loaded = CPCV2.load_from_checkpoint(ckpt)
    for key, value in module.encoder.state_dict().items():
        assert torch.equal(value, loaded.encoder.state_dict()[key]), key
    head = module.online_evaluator.head.state_dict()
    pending = loaded.online_evaluator._pending_state["head"]
    assert all(torch.equal(head[k], pending[k]) for k in head)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(module.eval()(x), loaded.eval()(x))


class StopAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def make_tiny(name):
    seed_everything(3)
    if name == "amdim":  # a comparison from the 5x5 map: anchor locations are drawn every step
        return AMDIM(contrastive_task="01, 11", image_channels=1, image_height=28, encoder_feature_dim=4,
                     embedding_fx_dim=8, conv_block_depth=1, learning_rate=1e-3)
    return CPCV2(image_channels=1, image_height=28, encoder_width=4, encoder_depth=0, learning_rate=1e-3)


@pytest.mark.parametrize("name", ["amdim", "cpc_v2"])
def test_resume_equals_never_stopping(name, fmnist_shards, tmp_path):
    batches = [one_real_batch(fmnist_shards, batch=8)] * 4

    def trainer(root, callbacks=()):
        return Trainer(strategy="single", max_steps=4, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                       num_sanity_val_steps=0, default_root_dir=str(root), callbacks=list(callbacks))

    straight = make_tiny(name)
    trainer(tmp_path / "a").fit(straight, batches)
    first = make_tiny(name)
    trainer(tmp_path / "b", [StopAfter(2)]).fit(first, batches)
    resumed = make_tiny(name)
    trainer(tmp_path / "b").fit(resumed, batches, ckpt_path="last")
    for key, value in straight.state_dict().items():
        other = resumed.state_dict()[key]
        assert (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other), key
    if name == "amdim":
        assert resumed.contrastive_task.calls == 4
    else:  # the online linear head continued exactly too
        head, other = straight.online_evaluator.head.state_dict(), resumed.online_evaluator.head.state_dict()
        assert all(torch.equal(head[k], other[k]) for k in head)
