"""Bad input anywhere a user types something gives one clean error, never a traceback:

* a property-based fuzz (hypothesis) over config files and ``key=value`` overrides: every config
  either loads or raises ``ConfigError`` with a one-line message;
* the CLI: bad arguments, config values, checkpoint paths and shard paths end with one
  ``scale-ssl: error:`` line and a non-zero exit, in a real subprocess;
* an interrupted shard writer (SIGKILL mid-write) leaves nothing a rerun would take as complete.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scale_ssl.config import ConfigError, load_config, per_device_batch_size
from scale_ssl.config.schema import DataConfig, EvalConfig, PlanConfig, TrackingConfig, TrainerConfig
from scale_ssl.methods import METHODS
from tests.reliability._procs import CONFIG, fit_overrides, subprocess_env

SECTIONS = {"trainer": TrainerConfig, "data": DataConfig, "tracking": TrackingConfig, "eval": EvalConfig,
            "plan": PlanConfig}
MODEL_KEYS = sorted({name for cls in METHODS.values() for name in inspect.signature(cls.__init__).parameters
                     if name not in ("self", "args", "kwargs")})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.sampled_from([0, 1, -1, 2, 3, 256]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["ddp", "single", "xla", "dp", "deepspeed", "bogus", "32", "bf16-mixed", "16-mixed", "64",
                     "exact", "resampled", "resnet10", "resnet50", "lars", "sgd", "adam", "last", "${trainer.seed}",
                     "${nope}", "???", "1e-3", "[1, 2]", "{a: 1}"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)


@st.composite
def config_dicts(draw) -> dict:
    config = {}
    if draw(st.booleans()):
        config["method"] = draw(st.sampled_from(sorted(METHODS) + ["nope", ""]) | scalars)
    for section, schema in SECTIONS.items():
        if draw(st.booleans()):
            keys = [f.name for f in dataclasses.fields(schema)] + ["not_a_key"]
            config[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
    if draw(st.booleans()):
        config["model"] = draw(st.dictionaries(st.sampled_from(MODEL_KEYS + ["nope"]), values, max_size=4))
    if draw(st.booleans()):
        config["optim"] = draw(st.dictionaries(st.sampled_from(["name", "lr", "weight_decay", "groups", "scheduler", "swa",
                                                                "lr_scaling", "nope"]), values, max_size=3) | scalars)
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.text(min_size=1, max_size=6))] = draw(values)
    return config


@st.composite
def overrides(draw) -> list[str]:
    section = draw(st.sampled_from(sorted(SECTIONS) + ["model", "optim", "nope"]))
    key = draw(st.sampled_from(["max_steps", "global_batch_size", "strategy", "precision", "seed", "arch", "lr",
                                "channels", "mean", "nope"]) | st.text(max_size=5))
    value = draw(st.sampled_from(["1", "0", "-5", "abc", "[1,2]", "null", "1e9", "nan", "${x}", "", "{a: 1}"])
                 | st.text(max_size=6))
    return draw(st.sampled_from([[f"{section}.{key}={value}"], [f"{section}.{key}"], [f"={value}"], [f"{key}={value}"]]))


def _assert_clean(load) -> None:
    try:
        load()
    except ConfigError as err:
        message = str(err)
        assert message.strip() and "\n" not in message.strip(), repr(message)
    # Any other exception type escapes and fails the test with hypothesis's minimal example.


@settings(max_examples=int(os.environ.get("SCALE_SSL_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=config_dicts(), extra=st.one_of(st.just([]), overrides()))
def test_any_config_file_and_overrides_load_or_give_one_clean_config_error(config, extra):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "run.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(config, handle, allow_unicode=True)
        _assert_clean(lambda: load_config(path, extra))


@settings(max_examples=100, deadline=None)
@given(global_batch=st.integers(-4, 4096), world=st.integers(1, 64), accumulate=st.integers(1, 8))
def test_global_batch_division_is_checked(global_batch, world, accumulate):
    try:
        per_device = per_device_batch_size(global_batch, world, accumulate)
        assert per_device * world * accumulate == global_batch and per_device >= 1
    except ConfigError as err:
        assert f"trainer.global_batch_size={global_batch}" in str(err)


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale_ssl.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=subprocess_env(), timeout=120)


def _one_error_line(stderr: str, name: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale-ssl: error: "), f"{name}: {stderr[-2000:]}"


@pytest.mark.timeout(300)
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(fmnist_shards, tmp_path, capsys, monkeypatch):
    from scale_ssl.cli.main import main

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SCALE_SSL_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    single = fit_overrides(fmnist_shards, tmp_path / "run", **{"trainer.strategy": "single", "trainer.max_steps": 1})
    cases = {
        "override without =": ["fit", "--config", CONFIG, "trainer.max_steps"],
        "unknown key": ["fit", "--config", CONFIG, "trainer.max_stepz=3"],
        "wrong type": ["fit", "--config", CONFIG, "trainer.max_steps=many"],
        "control character": ["fit", "--config", CONFIG, "trainer.seed=\x1f"],
        "unknown strategy": ["fit", "--config", CONFIG, "trainer.strategy=mpi"],
        "unsupported precision": ["fit", "--config", CONFIG, "trainer.precision=8"],
        "bad nonfinite policy": ["fit", "--config", CONFIG, "trainer.on_nonfinite_loss=ignore"],
        "bad timeout": ["fit", "--config", CONFIG, "trainer.collective_timeout_s=0"],
        "missing checkpoint": ["fit", "--config", CONFIG, *single, f"trainer.ckpt_path={tmp_path / 'none.ckpt'}"],
        "corrupt checkpoint": ["fit", "--config", CONFIG, *single, f"trainer.ckpt_path={corrupt}"],
        "missing shards": ["fit", "--config", CONFIG, *single, f"data.train_shards={tmp_path / 'no_shards'}"],
        "unreachable shard URL": ["fit", "--config", CONFIG, *single, "data.retries=0",
                                  "data.train_shards=http://127.0.0.1:9/shard-{000..003}.tar"],
        "unsupported shard scheme": ["fit", "--config", CONFIG, *single, "data.train_shards=ftp://host/s-{0..3}.tar"],
        "precision the device lacks": ["fit", "--config", CONFIG, *single, "trainer.precision=16-mixed",
                                       "trainer.accelerator=cpu"],
        "ddp without a launcher": ["fit", "--config", CONFIG, *fit_overrides(fmnist_shards, tmp_path / "run")],
        "export of a corrupt checkpoint": ["export", "--ckpt", str(corrupt), "--out", str(tmp_path / "e.pt")],
    }
    for name, argv in cases.items():
        code = main(argv)
        assert code != 0, name
        _one_error_line(capsys.readouterr().err, name)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-made left behind

    # The same through a real process: exit status and stderr as a shell (or torchrun) sees them.
    proc = _cli("fit", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "missing config file")
    usage = _cli("fit", cwd=tmp_path)  # argparse's own: a usage line plus one error line, exit 2
    assert usage.returncode == 2 and usage.stderr.strip().splitlines()[-1].startswith("scale-ssl fit: error:")


@pytest.mark.timeout(180)
def test_shard_writer_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "shards"
    writer = subprocess.Popen([sys.executable, "-m", "scale_ssl.cli.main", "make-shards", "fashion-mnist", "--out", str(out),
                               "--shard-size", "1000"], cwd=tmp_path, env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until shards are being written in the staging directory, then kill -9
            staged = [p for d in out.glob(".train.incomplete-*") for p in d.glob("*.tar")]
            if len(staged) >= 2:
                break
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert not (out / "train").exists(), "a killed writer must not leave the final directory"
    assert list(out.glob(".train.incomplete-*"))  # partial work only in a hidden, clearly named directory
    from scale_ssl.data import ShardedImageStream

    with pytest.raises((FileNotFoundError, ValueError)):  # a training run refuses it, loudly
        ShardedImageStream(str(out / "train"), batch_size=8, transform=lambda image: image)
