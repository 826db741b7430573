"""A NaN/inf loss on one rank is seen by every rank at once (an all-reduced flag): the step is
skipped everywhere (never one rank stepping while another skips), and under the default policy
the run stops after N consecutive bad steps with a checkpoint of the last good state and a
message naming the step and the rank."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.checkpoint.files import load_checkpoint_file
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.nonfinite_guard import NonFiniteLossError
from tests.distributed import run_on_ranks
from tests.reliability._modules import FaultyRegressor, regression_batches


def _trainer(root, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(strategy="ddp", logger=False, enable_progress_bar=False, default_root_dir=str(root), **kwargs)


def _skip_worker(rank, world_size, root):
    module = FaultyRegressor(fault="nan", fault_rank=1, fault_batches=(2, 5))
    trainer = _trainer(root, max_steps=6, on_nonfinite_loss="skip")
    trainer.fit(module, regression_batches(8, rank=rank))
    return {"params": [p.detach().clone() for p in module.parameters()], "step": trainer.global_step,
            "skipped": trainer.nonfinite_steps_skipped}


@pytest.mark.timeout(120)
def test_skip_policy_skips_the_step_on_every_rank_when_one_rank_has_nan(tmp_path):
    ranks = run_on_ranks(_skip_worker, 2, str(tmp_path))
    for result in ranks:
        assert result["step"] == 6 and result["skipped"] == 2  # rank 0 had finite losses and still skipped
        assert all(torch.isfinite(p).all() for p in result["params"])
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # the replicas never diverged


def _stop_worker(rank, world_size, root):
    module = FaultyRegressor(fault="nan", fault_rank=1, fault_batches=(2, 3))
    trainer = _trainer(root + "/faulty", max_steps=6, max_consecutive_nonfinite=2, enable_checkpointing=True)
    try:
        trainer.fit(module, regression_batches(8, rank=rank))
        message = None
    except NonFiniteLossError as err:
        message = str(err)
    clean = FaultyRegressor()
    _trainer(root + "/clean", max_steps=2).fit(clean, regression_batches(8, rank=rank))
    return {"message": message, "clean": {k: v.clone() for k, v in clean.state_dict().items()}}


@pytest.mark.timeout(120)
def test_stop_policy_checkpoints_the_last_good_state_and_names_the_step(tmp_path):
    ranks = run_on_ranks(_stop_worker, 2, str(tmp_path))
    for result in ranks:  # both ranks stop together, with the same message
        assert result["message"] is not None
        assert "2 consecutive steps, the last at step 2 (epoch 0, batch 3); non-finite on rank(s) [1]" in result["message"]
        assert "last.ckpt" in result["message"]
    checkpoint = load_checkpoint_file(str(tmp_path / "faulty" / "checkpoints" / "last.ckpt"))
    assert checkpoint["global_step"] == 2 and checkpoint["batch_in_epoch"] == 4  # resume starts after the bad batches
    for key, value in ranks[0]["clean"].items():  # = the weights after the two good steps
        assert torch.equal(checkpoint["state_dict"][key], value), key
