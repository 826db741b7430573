"""A rank killed with SIGKILL mid-run: torchrun's elastic agent restarts the group, the trainer
resumes from the newest good checkpoint on its own, and the run ends with exactly the weights of a
run that was never interrupted. With checkpoints every step nothing is repeated; with checkpoints
every 3 steps (slow variant) the steps since the last checkpoint are recomputed, exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from tests.reliability._procs import fit_overrides, rank_pid, subprocess_env, torchrun_fit

STEPS = 8


def _checkpoint_step(path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet (the rename is atomic, so never half-read)
        return -1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("every", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkilled_rank_is_restarted_and_resumes_to_the_uninterrupted_weights(fmnist_shards, tmp_path, every):
    env = subprocess_env()
    straight_root, killed_root = tmp_path / "straight", tmp_path / "killed"
    extra = {"trainer.max_steps": STEPS, "trainer.checkpoint_every_n_steps": every}

    started = time.monotonic()
    straight = subprocess.run(torchrun_fit(fit_overrides(fmnist_shards, straight_root, **extra), max_restarts=2),
                              capture_output=True, text=True, timeout=200, cwd=tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_s = time.monotonic() - started

    kill_after = random.Random().randint(2, STEPS - 3)  # a different step on each run of the suite
    last = killed_root / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.out", "w") as out, open(tmp_path / "killed.err", "w") as err:
        launcher = subprocess.Popen(torchrun_fit(fit_overrides(fmnist_shards, killed_root, **extra), max_restarts=2),
                                    stdout=out, stderr=err, cwd=tmp_path, env=env, start_new_session=True)
        try:
            victim = rank_pid(launcher.pid, rank=1, restart_count=0)
            deadline = time.monotonic() + 150
            while _checkpoint_step(last) < kill_after:
                assert launcher.poll() is None, "the run ended before the kill"
                assert time.monotonic() < deadline, "no checkpoint reached the kill step"
                time.sleep(0.2)
            os.kill(victim, signal.SIGKILL)  # what a lost node looks like to the others
            killed_at = _checkpoint_step(last)
            code = launcher.wait(timeout=200)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    stdout, stderr = (tmp_path / "killed.out").read_text(), (tmp_path / "killed.err").read_text()
    assert code == 0, stderr[-3000:]
    assert killed_at < STEPS, f"the kill came too late (checkpoint already at step {killed_at})"
    # The agent really restarted the group, and the restarted trainer resumed rather than restarting.
    assert "exitcode: -9" in stderr and "(restart 1;" in stdout, (stdout[-2000:], stderr[-2000:])
    resumed_at = int(stdout.split("resuming from", 1)[1].split("at global step", 1)[1].split()[0])
    assert kill_after <= resumed_at < STEPS

    a = torch.load(straight_root / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    max_diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item()
                   for k in a["state_dict"] if a["state_dict"][k].is_floating_point())
    print(f"checkpoints every {every}: killed rank 1 after checkpoint {killed_at} (resumed at {resumed_at}); "
          f"max |param diff| vs uninterrupted = "
          f"{max_diff:.3g}; uninterrupted run {straight_s:.0f} s")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key}: max diff {max_diff}"
