"""Run a scenario of ``tests/xla/_replicas.py`` on N XLA:CPU devices under a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_replicas(scenario: str, devices: int, data: dict, timeout_s: float = 240) -> list[dict]:
    """Results of every replica, in ordinal order. A hang (XLA aborts a rendezvous after 10 s, or
    the hard timeout fires) or an error in any replica fails with its output."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), XLA_THREAD_POOL_SIZE="8",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        in_path = os.path.join(tmp, "in.pt")
        torch.save(data, in_path)
        cmd = [sys.executable, "-m", "tests.xla._replicas", scenario, in_path, tmp]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-3000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise AssertionError(f"{scenario} on {devices} XLA devices hung for {timeout_s}s:\n{tail}") from None
        records = []
        for name in sorted(os.listdir(tmp)):
            if name.startswith("rank"):
                records.append(torch.load(os.path.join(tmp, name), weights_only=False))
        failures = [r["error"] for r in records if not r["ok"]]
        if proc.returncode != 0 or failures or len(records) != devices:
            raise AssertionError(
                f"{scenario} on {devices} XLA devices failed (exit {proc.returncode}, {len(records)} replica results):\n"
                + "\n".join(failures) + "\n--- stderr ---\n" + proc.stderr[-4000:]
            )
        return sorted(records, key=lambda r: r["rank"])
