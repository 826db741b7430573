"""Run a scenario of ``tests/xla/_replicas.py`` on N XLA:CPU devices under a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# How often a run whose device process died abruptly, before any replica wrote a result, is
# started again. On 2 shared cores the threads-as-devices emulation (several XLA:CPU devices as
# threads of one process, with the test-only sync shim of ``sync_shim.py``) loses
# its process without a message about once in 10-30 runs (seen in CI and reproduced here, 1/12),
# before our code has produced anything to compare. A replica that *finishes* with a wrong
# result, raises, or hangs is never retried.
ABRUPT_DEATH_RETRIES = 1


def run_replicas(scenario: str, devices: int, data: dict, timeout_s: float = 240) -> list[dict]:
    """Results of every replica, in ordinal order. A hang (XLA aborts a rendezvous after 10 s, or
    the hard timeout fires) or an error in any replica fails with its output."""
    for attempt in range(ABRUPT_DEATH_RETRIES + 1):
        try:
            return _run_replicas_once(scenario, devices, data, timeout_s)
        except _AbruptDeath as death:
            if attempt == ABRUPT_DEATH_RETRIES:
                raise AssertionError(str(death)) from None
            warnings.warn(f"{scenario} on {devices} XLA devices: the device process died abruptly before any "
                          f"replica reported; running it again (attempt {attempt + 2})", stacklevel=2)
    raise AssertionError("unreachable")


class _AbruptDeath(Exception):
    """The device process was killed (BrokenProcessPool) before any replica wrote a result."""


def _run_replicas_once(scenario: str, devices: int, data: dict, timeout_s: float) -> list[dict]:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), XLA_THREAD_POOL_SIZE="8",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               PYTHONFAULTHANDLER="1")  # a crash of the device process leaves its stack in stderr
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
            message = (f"{scenario} on {devices} XLA devices failed (exit {proc.returncode}, {len(records)} replica "
                       "results):\n" + "\n".join(failures) + "\n--- stderr ---\n" + _head_and_tail(proc.stderr))
            # XLA aborting a stuck rendezvous also kills the process: that is a hang, never retried.
            if not records and "BrokenProcessPool" in proc.stderr and "rendezvous" not in proc.stderr:
                raise _AbruptDeath(message)
            raise AssertionError(message)
        return sorted(records, key=lambda r: r["rank"])


def _head_and_tail(text: str, keep: int = 3000) -> str:
    """A crash report (faulthandler) sits at the start of stderr, the launcher's traceback at the end."""
    if len(text) <= 2 * keep:
        return text
    return text[:keep] + f"\n[... {len(text) - 2 * keep} characters ...]\n" + text[-keep:]
