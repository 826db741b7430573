"""``scale-ssl fit ... trainer.strategy=xla`` end to end on one XLA:CPU device, and the torchrun
trap (torchrun's WORLD_SIZE=2 but an XLA world of 1) stopped with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.xla

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _fit_args(shards, root) -> list[str]:
    return [
        "fit", "--config", os.path.join(REPO, "configs/simclr/fmnist_cpu.yaml"),
        "trainer.strategy=xla", "trainer.max_steps=2", "trainer.global_batch_size=16", "trainer.precision=32",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"trainer.default_root_dir={root}",
        f"data.train_shards={shards / 'train'}", "data.num_workers=0", "tracking.enabled=false",
        "model.hidden_mlp=32", "model.feat_dim=16",
    ]


def _env(**extra) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    for name in ("CPU_NUM_DEVICES", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(400)
def test_cli_fit_on_one_xla_cpu_device_writes_a_cpu_checkpoint(fmnist_shards, tmp_path):
    proc = subprocess.run([os.path.join(BIN, "scale-ssl"), *_fit_args(fmnist_shards, tmp_path)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simclr on xla x1" in proc.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())


@pytest.mark.timeout(200)
def test_torchrun_with_pjrt_cpu_is_a_clear_error(fmnist_shards, tmp_path):
    proc = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "scale_ssl",
         *_fit_args(fmnist_shards, tmp_path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    assert "WORLD_SIZE=2" in proc.stderr and "world of 1" in proc.stderr and "Do not use torchrun" in proc.stderr
