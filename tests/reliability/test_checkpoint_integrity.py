"""Checkpoints are atomic and verified: a writer killed mid-save leaves the previous checkpoint
intact; a truncated or altered file is detected with an error naming it (format version and
SHA-256 of the contents are stored in every checkpoint), and resuming from "last" falls back to
the previous good checkpoint, ending with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from scale_ssl.checkpoint.files import (
    CHECKPOINT_FORMAT_VERSION,
    CorruptCheckpointError,
    load_checkpoint_file,
    save_checkpoint_file,
)
from scale_ssl.trainer import Trainer
from tests.reliability._modules import FaultyRegressor, regression_batches
from tests.reliability._procs import REPO, subprocess_env


def _fit(root, max_steps, ckpt_path=None) -> FaultyRegressor:
    module = FaultyRegressor()
    trainer = Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, checkpoint_every_n_steps=1,
                      default_root_dir=str(root))
    trainer.fit(module, regression_batches(8), ckpt_path=ckpt_path)
    return module


def test_every_checkpoint_carries_version_and_checksum_and_keeps_the_previous(tmp_path):
    _fit(tmp_path, max_steps=3)
    last = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(last, weights_only=True)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION and len(raw["content_sha256"]) == 64
    assert raw["global_step"] == 3
    assert torch.load(str(last) + ".prev", weights_only=True)["global_step"] == 2
    assert "content_sha256" not in load_checkpoint_file(str(last))  # verified, then dropped


def test_altered_contents_fail_the_checksum(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint_file({"state_dict": {"w": torch.arange(4.0)}, "global_step": 1}, path)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["w"][2] = 7.0  # one value changed after the checksum was taken
    torch.save(raw, path)
    with pytest.raises(CorruptCheckpointError, match=r"a\.ckpt.*failed its content checksum"):
        load_checkpoint_file(path)
    with pytest.raises(CorruptCheckpointError, match="format_version 99"):
        torch.save({**raw, "format_version": 99}, path)
        load_checkpoint_file(path)


def test_truncated_last_checkpoint_falls_back_to_the_previous_and_resume_stays_exact(tmp_path):
    straight = _fit(tmp_path / "straight", max_steps=6)
    _fit(tmp_path / "run", max_steps=4)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    size = os.path.getsize(last)
    with open(last, "r+b") as handle:  # what a full disk or an interrupted copy leaves behind
        handle.truncate(size // 2)
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt.*truncated, corrupt"):
        load_checkpoint_file(str(last))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(tmp_path / "run", max_steps=6, ckpt_path="last")  # from step 3 (.prev), not 4
    assert any("falling back to the previous checkpoint" in str(w.message) for w in caught)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    # Both damaged: one clear error naming the files, never a silent fresh start.
    for path in (last, str(last) + ".prev"):
        with open(path, "r+b") as handle:
            handle.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint to resume from"):
        _fit(tmp_path / "run", max_steps=8, ckpt_path="last")


@pytest.mark.timeout(120)
def test_writer_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-m", "tests.reliability._slow_writer", str(path), "600"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env())
    try:
        assert writer.stdout.readline().strip() == "saving-large"
        deadline = time.monotonic() + 60
        while True:  # kill -9 as soon as the temporary file holds part of the large state
            temps = [p for p in path.parent.iterdir() if p.name.startswith(".tmp-") and p.stat().st_size > 1 << 20]
            if temps:
                break
            assert writer.poll() is None and time.monotonic() < deadline, "the large save ended before the kill"
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    checkpoint = load_checkpoint_file(str(path))  # the previous one, whole and verified
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.arange(10.0))
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have caught the writer mid-write"
