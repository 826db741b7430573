"""The CLI: bad input is one clear line and a non-zero exit; good input trains, under torchrun too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from scale_ssl.cli.main import EXIT_BAD_INPUT, main
from scale_ssl.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "simclr", "fmnist_cpu.yaml")
VENV_BIN = os.path.dirname(sys.executable)


def tiny_overrides(shards, root, strategy="single") -> list[str]:
    """A run small enough for a test: resnet10, batch 32, a few steps, real Fashion-MNIST shards."""
    return [
        f"trainer.strategy={strategy}",
        "trainer.max_steps=3",
        "trainer.global_batch_size=32",
        "trainer.log_every_n_steps=1",
        "trainer.precision=32",
        "trainer.enable_progress_bar=false",
        f"trainer.default_root_dir={root}",
        f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/test",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "model.arch=resnet10",
        "model.hidden_mlp=64",
        "model.feat_dim=32",
    ]


def _error_of(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale-ssl: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.max_stepz=5", "'trainer.max_stepz' is not known"),
        ("trainer.max_steps=abc", "'trainer.max_steps'"),
        ("trainer.strategy=horovod", "trainer.strategy='horovod' is not known"),
        ("trainer.precision=fp8", "trainer.precision='fp8'"),
        ("model.temprature=0.2", "model.temprature is not an argument of SimCLR"),
        ("model.temperature=warm", "model.temperature='warm' has type str"),
        ("model.optimizer=lamb", "optimizer='lamb'"),
        ("data.mean=[0.5,0.5]", "data.mean has 2 values but data.channels=1"),
        ("trainer.global_batch_size=0", "trainer.global_batch_size must be >= 1"),
        ("bogus=1", "'bogus' is not known"),
        ("nonsense", "must look like section.key=value"),
    ],
)
def test_bad_config_is_one_clear_line(override, expected, capsys, tmp_path):
    line = _error_of(["fit", "--config", CONFIG, f"trainer.default_root_dir={tmp_path}", override], capsys)
    assert expected in line


def test_missing_shard_path_names_the_path(capsys, tmp_path):
    missing = tmp_path / "no_such_shards"
    line = _error_of(["fit", "--config", CONFIG, "trainer.strategy=single", f"data.train_shards={missing}"], capsys)
    assert str(missing) in line


def test_missing_config_file(capsys, tmp_path):
    line = _error_of(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in line and "no such file" in line


def test_global_batch_not_divisible_by_world_names_the_fix(capsys, fmnist_shards, tmp_path):
    args = tiny_overrides(fmnist_shards, tmp_path) + ["trainer.global_batch_size=30", "trainer.accumulate_grad_batches=4"]
    line = _error_of(["fit", "--config", CONFIG, *args], capsys)
    assert "global_batch_size=30 is not divisible" in line and "multiple of 4" in line


def test_ddp_without_a_launcher_says_how_to_launch(capsys, fmnist_shards, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    line = _error_of(["fit", "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path, strategy="ddp")], capsys)
    assert "torchrun --nproc_per_node" in line


@pytest.mark.timeout(300)
def test_console_script_fit_single_process(fmnist_shards, tmp_path):
    """`scale-ssl fit --config ... key=value` trains and writes a checkpoint with its config."""
    cmd = [os.path.join(VENV_BIN, "scale-ssl"), "fit", "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["config"]["trainer"]["max_steps"] == 3
    assert ckpt["config"]["derived"]["world_size"] == 1
    assert ckpt["mlflow_run_id"]


@pytest.mark.timeout(400)
def test_torchrun_two_ranks_fit(fmnist_shards, tmp_path):
    """`torchrun --nproc_per_node 2 -m scale_ssl fit` runs the same config on 2 gloo ranks."""
    cmd = [
        os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "scale_ssl", "fit",
        "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path, strategy="ddp"), "tracking.enabled=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp x2" in proc.stdout, proc.stdout
    assert "16/device x 2" in proc.stdout  # global 32 = 16 per rank x 2 ranks
    # The config's default: BatchNorm over both ranks' samples, and the banner says so.
    assert "BatchNorm: global over the 2 ranks' 32 samples (trainer.sync_batchnorm=true)" in proc.stdout, proc.stdout
    assert "terminate called" not in proc.stderr  # ranks leave cleanly (strategies/ddp.py)
    assert proc.stdout.count("scale_ssl fit: done, 3 steps") == 1, proc.stdout  # the summary: rank zero only
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["world_size"] == 2
    assert len(ckpt["rng_states"]) == 2


def test_dp_from_the_command_line(fmnist_shards, tmp_path):
    args = tiny_overrides(fmnist_shards, tmp_path, strategy="dp") + ["trainer.devices=2", "tracking.enabled=false",
                                                                     "trainer.num_threads=1", "trainer.sync_batchnorm=false"]
    assert main(["fit", "--config", CONFIG, *args]) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def test_dp_without_devices_is_a_clear_error(capsys, fmnist_shards, tmp_path):
    line = _error_of(["fit", "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path, strategy="dp"),
                      "trainer.sync_batchnorm=false"], capsys)
    assert "trainer.devices" in line


def test_every_multi_part_strategy_takes_the_default_global_batchnorm(fmnist_shards, tmp_path):
    """The configs default to global BN, and every strategy that splits a batch honours it."""
    from scale_ssl.cli.assembly import GLOBAL_BATCHNORM_STRATEGIES, build_strategy_from_config

    for strategy in GLOBAL_BATCHNORM_STRATEGIES:
        overrides = [*tiny_overrides(fmnist_shards, tmp_path, strategy=strategy), "trainer.devices=2"]
        config = load_config(CONFIG, overrides)
        assert config.trainer.sync_batchnorm is True
        if strategy == "xla":
            continue  # building it needs torch_xla (tests/xla)
        assert build_strategy_from_config(config).sync_batchnorm is True, strategy


@pytest.mark.timeout(600)
def test_torchrun_deepspeed_zero2_bf16_with_a_user_json(fmnist_shards, tmp_path):
    """`torchrun ... fit trainer.strategy=deepspeed trainer.deepspeed_config=configs/deepspeed/zero2.json`."""
    cmd = [
        os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "scale_ssl", "fit",
        "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path, strategy="deepspeed"), "tracking.enabled=false",
        "trainer.precision=bf16-mixed", f"trainer.deepspeed_config={REPO}/configs/deepspeed/zero2.json",
        "trainer.sync_batchnorm=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed x2" in proc.stdout
    ckpt_dir = tmp_path / "checkpoints" / "last.ckpt"
    assert os.path.isdir(ckpt_dir / "state")  # a sharded DeepSpeed checkpoint
    # Readers take the directory as it is: export writes a torchvision-loadable encoder, and
    # load_from_checkpoint rebuilds the method, both from the merged fp32 weights.
    from scale_ssl.eval.export import torchvision_resnet
    from scale_ssl.methods import SimCLR
    from scale_ssl.strategies.deepspeed import read_deepspeed_checkpoint

    out = tmp_path / "encoder.pt"
    assert main(["export", "--ckpt", str(ckpt_dir), "--out", str(out), "--method", "simclr"]) == 0
    merged = read_deepspeed_checkpoint(str(ckpt_dir))
    assert merged["global_step"] == 3
    exported = torch.load(out, weights_only=True)
    resnet = torchvision_resnet("resnet10", in_channels=1, first_conv=True, maxpool1=False)
    resnet.load_state_dict(exported, strict=True)
    module = SimCLR.load_from_checkpoint(str(ckpt_dir))
    for key, value in module.encoder.state_dict().items():
        assert torch.equal(value, exported[key]), key
        assert torch.equal(value, merged["state_dict"][f"encoder.{key}"]), key
    assert exported["conv1.weight"].dtype == torch.float32  # trained in bf16, merged to fp32


def test_a_directory_that_is_not_a_deepspeed_checkpoint_is_a_clear_error(capsys, tmp_path):
    line = _error_of(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "e.pt")], capsys)
    assert "not a DeepSpeed checkpoint" in line and not (tmp_path / "e.pt").exists()


def test_eval_knn_with_baselines_scores_a_fitted_checkpoint(fmnist_shards, tmp_path, capsys):
    """`scale-ssl eval knn --ckpt ... --baselines` (the demo's second command) on a real 3-step fit."""
    assert main(["fit", "--config", CONFIG, *tiny_overrides(fmnist_shards, tmp_path), "tracking.enabled=false"]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["eval", "knn", "--ckpt", str(ckpt), "--baselines", "eval.knn_k=20", "tracking.enabled=false"]) == 0
    out = capsys.readouterr().out
    for row in ("raw pixels", "random-init"):
        assert row in out, out
    assert "%" in out


def test_eval_from_another_directory_logs_to_the_fits_own_store(fmnist_shards, tmp_path, monkeypatch, capsys):
    """The default store is ``sqlite:///<default_root_dir>/mlflow.db`` with a relative
    ``default_root_dir`` (``runs/demo``): an evaluation started from another directory must log to
    the store the fit wrote, not create an empty one next to its own working directory."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fit_dir, other_dir = tmp_path / "project", tmp_path / "elsewhere"
    fit_dir.mkdir()
    other_dir.mkdir()
    monkeypatch.chdir(fit_dir)
    overrides = [o for o in tiny_overrides(fmnist_shards, tmp_path) if not o.startswith("trainer.default_root_dir")]
    assert main(["fit", "--config", CONFIG, *overrides, "trainer.default_root_dir=runs/demo",
                 "tracking.experiment_name=cwd_test"]) == 0
    ckpt = fit_dir / "runs" / "demo" / "checkpoints" / "last.ckpt"
    run_id = torch.load(ckpt, map_location="cpu", weights_only=False)["mlflow_run_id"]
    monkeypatch.chdir(other_dir)
    assert main(["eval", "knn", "--ckpt", str(ckpt), "eval.knn_k=20"]) == 0
    assert "logged to MLflow run " + run_id in capsys.readouterr().out
    assert not (other_dir / "runs").exists()
    store = f"sqlite:///{fit_dir / 'runs' / 'demo' / 'mlflow.db'}"
    assert "eval/knn_top1/ssl_encoder" in MlflowClient(tracking_uri=store).get_run(run_id).data.metrics
