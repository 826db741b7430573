"""Mid-epoch resume through the whole stack: ``Trainer.fit`` on 2 DDP ranks streaming real tar
shards stops mid-epoch, a *new* set of processes resumes from ``ckpt_path="last"``, and the
samples trained on before the stop plus after the resume are exactly one uninterrupted epoch's
samples, in the same order, on every rank (the trainer seeks the stream with ``skip_batches``
from the checkpoint's data position; nothing is replayed or re-seen)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from scale_ssl.data import ShardedImageStream
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, SSLModule, Trainer
from tests._dist_workers_data import pixels_as_tensor, write_uneven_shards
from tests.distributed import run_on_ranks

# Uneven shards, 2 ranks x 1 worker, batch 4: the plan gives each rank the same number of steps.
SHARD_SIZES = [13, 7, 11, 9, 12, 8]
BATCH = 4
STOP_AT_STEP = 3


class KeyRecorder(SSLModule):
    """A linear layer on the pixels; records the ``__key__`` of every sample it trains on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(36, 4)
        self.keys: list[str] = []

    def training_step(self, batch, batch_idx):
        images, _, keys = batch
        self.keys.extend(keys)
        return self.layer(images.float().flatten(1) / 255).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def _fit(rank, world, shard_dir, root, stop_at, resume):
    # Built before the trainer starts the process group, as a user script does: the stream must
    # still split the data between the ranks once the group exists.
    stream = ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, num_workers=1, seed=11, shuffle_buffer=8,
                                return_keys=True)
    module = KeyRecorder()
    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu"), max_epochs=1, logger=False, enable_progress_bar=False,
                      default_root_dir=root, callbacks=[StopAt(stop_at)] if stop_at else [])
    trainer.fit(module, stream, ckpt_path="last" if resume else None)
    return {"keys": module.keys, "steps": trainer.global_step, "stats": stream.epoch_stats(),
            "weights": {k: v.clone() for k, v in module.state_dict().items()}}


@pytest.mark.timeout(300)
def test_fit_stopped_mid_epoch_and_resumed_in_new_processes_sees_each_sample_once(tmp_path):
    shards = tmp_path / "shards"
    write_uneven_shards(shards, SHARD_SIZES)
    straight = run_on_ranks(_fit, 2, str(shards), str(tmp_path / "straight"), 0, False)
    before = run_on_ranks(_fit, 2, str(shards), str(tmp_path / "stopped"), STOP_AT_STEP, False)
    after = run_on_ranks(_fit, 2, str(shards), str(tmp_path / "stopped"), 0, True)

    assert not set(straight[0]["keys"]) & set(straight[1]["keys"]), "both ranks read the same samples"
    steps = straight[0]["steps"]
    assert steps == straight[1]["steps"] > STOP_AT_STEP  # equal steps per rank, the stop is mid-epoch
    for rank in range(2):
        assert before[rank]["steps"] == STOP_AT_STEP and after[rank]["steps"] == steps
        assert len(before[rank]["keys"]) == STOP_AT_STEP * BATCH
        # the same samples in the same order as never stopping: nothing replayed, nothing skipped
        assert before[rank]["keys"] + after[rank]["keys"] == straight[rank]["keys"]
        stats = after[rank]["stats"]
        assert stats["resumed_at_batch"] == STOP_AT_STEP and stats["samples_reseen_after_resume"] == 0
        for key, value in straight[rank]["weights"].items():
            assert torch.equal(value, after[rank]["weights"][key]), key
    # across ranks: each sample at most once in the epoch
    seen = Counter(k for result in (*before, *after) for k in result["keys"])
    assert max(seen.values()) == 1
    assert sum(seen.values()) == 2 * steps * BATCH <= sum(SHARD_SIZES)
