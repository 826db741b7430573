"""A user's ``Trainer(strategy="ddp").fit()`` script leaves cleanly on every rank, with no teardown
code of its own, whether it ends normally or in an exception (``scale_ssl/strategies/ddp.py``
explains the abort this prevents: a gloo worker thread freeing a finished collective after the
interpreter began finalising).

The abort itself is a race (1 in 40 two-rank runs of this script before the fix, on a loaded
machine), so what is checked deterministically is its precondition: when the interpreter exits,
the process group the trainer created has been destroyed *and its gloo worker threads joined*,
i.e. no thread is left that could free a collective later.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

VENV_BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_user_fit_script.py")


def run_script(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", SCRIPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)


@pytest.mark.timeout(300)
def test_a_user_script_ends_after_fit_with_every_rank_exiting_0_and_no_gloo_thread_left(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} fit done" in proc.stdout
        assert f"rank {rank} gloo threads at exit: []" in proc.stdout, proc.stdout


@pytest.mark.timeout(300)
def test_a_user_script_that_fails_in_a_step_exits_with_its_error_not_an_abort(tmp_path):
    proc = run_script(tmp_path, "--fail")
    assert "ValueError: a bug in training_step" in proc.stderr
    assert "exitcode  : 1" in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} gloo threads at exit: []" in proc.stdout, proc.stdout
