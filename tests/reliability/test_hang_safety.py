"""A rank that dies or stalls never leaves the others blocked: they fail within the collective
timeout (``trainer.collective_timeout_s``) with a message naming their rank and step, and exit
non-zero so the elastic agent can restart the group."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.distributed import free_port
from tests.reliability._procs import REPO, subprocess_env

TIMEOUT_S = 6.0


def _start_ranks(fault: str, tmp_path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = subprocess_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.reliability._hang_worker", fault, str(TIMEOUT_S), str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    return procs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["stall", "exit"])
def test_a_stalled_or_dead_peer_gives_a_clear_error_and_nonzero_exit_within_the_timeout(fault, tmp_path):
    procs = _start_ranks(fault, tmp_path)
    survivor, faulty = procs
    try:
        started = time.monotonic()
        # Generous bound (start-up ~10 s on a loaded 2-core box + timeout); without the timeout the
        # survivor would block for torch's default 30 minutes.
        _, err = survivor.communicate(timeout=90 + TIMEOUT_S)
        waited = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert survivor.returncode != 0, err[-3000:]
    assert "CollectiveFailure: rank 0 at global step 3 (epoch 0, batch 3)" in err, err[-3000:]
    assert "collective_timeout_s" in err
    print(f"{fault}: rank 0 exited {survivor.returncode} after {waited:.1f} s (collective timeout {TIMEOUT_S} s)")
