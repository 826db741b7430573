"""Helpers for the reliability tests: real launches of ``scale-ssl fit`` and the processes they make.

Rank processes are found by scanning ``/proc`` for descendants of the launcher whose environment
says ``RANK=<r>`` (what torchrun gives each worker), so a test can ``kill -9`` exactly one rank by
its PID, as a failing node would.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
CONFIG = os.path.join(REPO, "configs", "simclr", "fmnist_cpu.yaml")


def fit_overrides(shards, root, **extra) -> list[str]:
    """A SimCLR fit small enough for a test: resnet10, global batch 32, fp32, real shards."""
    settings = {
        "trainer.strategy": "ddp",
        "trainer.max_steps": 8,
        "trainer.global_batch_size": 32,
        "trainer.log_every_n_steps": 1,
        "trainer.precision": "32",
        "trainer.enable_progress_bar": "false",
        "trainer.default_root_dir": str(root),
        "data.train_shards": f"{shards}/train",
        "data.val_shards": f"{shards}/test",
        "data.num_workers": 0,
        "data.shuffle_buffer": 64,
        "model.arch": "resnet10",
        "model.hidden_mlp": 64,
        "model.feat_dim": 32,
        "tracking.enabled": "false",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def torchrun_fit(overrides: list[str], nproc: int = 2, max_restarts: int = 0) -> list[str]:
    return [os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "scale_ssl.cli.main", "fit", "--config", CONFIG, *overrides]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # Field 4 is the parent PID; the command name (field 2) may hold spaces, so split after ')'.
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def environment_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def rank_pid(launcher_pid: int, rank: int, restart_count: int = 0, timeout: float = 60.0) -> int:
    """PID of the worker with ``RANK=rank`` (and this restart count) under ``launcher_pid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(launcher_pid):
            env = environment_of(pid)
            if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart_count):
                return pid
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} worker (restart {restart_count}) under PID {launcher_pid} after {timeout:.0f} s")
