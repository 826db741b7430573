"""The lr scaling rule reads the global batch: 1 rank x 512 and 4 gloo ranks x 128 train with the
same effective lr, and log it to MLflow (solo-learn #262 scaled by the per-device batch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "simclr", "fmnist_cpu.yaml")
VENV_BIN = os.path.dirname(sys.executable)

RECIPE = [
    "optim.optimizer.name=LARS", "optim.optimizer.momentum=0.9", "optim.optimizer.weight_decay=1.0e-6",
    "optim.lr.base=0.3", "optim.lr.scale=linear", "optim.lr.reference_batch=256", "optim.exclude_bn_bias=true",
]


def _fit(world: int, shards, root) -> tuple[dict, str]:
    overrides = [
        f"trainer.strategy={'ddp' if world > 1 else 'single'}", "trainer.global_batch_size=512", "trainer.max_steps=1",
        "trainer.precision=32", "trainer.enable_progress_bar=true", f"trainer.default_root_dir={root}",
        f"data.train_shards={shards}/train", f"data.val_shards={shards}/test", "data.num_workers=0",
        "data.mode=resampled", "data.shuffle_buffer=64", "model.arch=resnet10", "model.hidden_mlp=64", "model.feat_dim=32",
        "trainer.num_threads=1", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", *RECIPE,
    ]
    launcher = [os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node", str(world), "-m", "scale_ssl"]
    proc = subprocess.run([*launcher, "fit", "--config", CONFIG, *overrides], capture_output=True, text=True,
                          timeout=500, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True), proc.stdout


@pytest.mark.timeout(900)
def test_linear_scaling_gives_one_lr_at_1x512_and_4x128(fmnist_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    results = {}
    for world in (1, 4):
        root = tmp_path / f"world{world}"
        root.mkdir()
        ckpt, stdout = _fit(world, fmnist_shards, root)
        derived = ckpt["config"]["derived"]
        client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
        history = client.get_metric_history(ckpt["mlflow_run_id"], "effective_lr")
        groups = ckpt["optimizer_states"][0]["param_groups"]
        results[world] = (derived["per_device_batch_size"], [h.value for h in history], [g["lr"] for g in groups])
        assert "effective lr 0.6 (from the global batch)" in stdout, stdout
    assert results[1][0] == 512 and results[4][0] == 128
    assert results[1][1] == results[4][1] == [pytest.approx(0.6)]
    # The optimizer trained with it: every group (LARS default, and bias/norm) at 0.3 x 512 / 256.
    assert results[1][2] == results[4][2] == [pytest.approx(0.6)] * len(results[1][2]) and len(results[1][2]) == 2
