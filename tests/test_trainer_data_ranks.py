"""What a Lightning-habit user hands the public ``Trainer`` is distributed correctly on 2 real gloo
ranks: ``fit(model, DataLoader(shuffle=True))`` and ``fit(model, datamodule=dm)`` shard the data
(each sample once per epoch, a new order every epoch), validation counts each sample exactly once
in its metrics, and unequal per-rank batches stop with one clear error on every rank instead of
a hung or garbled gather.

All scenarios of one rank run in one spawn (``rank_results``) to keep the suite's time down.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import SSLModule, Trainer
from scale_ssl.trainer.data_distribution import UnequalBatchesError
from tests.distributed import run_on_ranks

WORLD = 2
TRAIN_SAMPLES = 2 * 12  # 2·k samples
EPOCHS = 2


def indexed(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(n)
    return TensorDataset(torch.arange(n), torch.randn(n, 3, generator=g))


class IndexRecorder(SSLModule):
    """A BatchNorm regression that records which sample indices every step and validation saw;
    its step gathers over the ranks, as every global loss does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        self.seen: dict[int, list[int]] = {}
        self.val_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        index, x = batch
        self.seen.setdefault(self.current_epoch, []).extend(index.tolist())
        z = self.all_gather(self.net(x), sync_grads=True)  # equal rows per rank are assumed here
        return z.pow(2).mean()

    def validation_step(self, batch, batch_idx):
        index, _ = batch
        self.val_seen.extend(index.tolist())
        # The mean of index**2 over the whole set: exact only if every sample counts once and the
        # ranks' unequal shares are weighted by their sizes.
        self.log("val/index_sq", index.float().pow(2).mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CallLog:
    """A datamodule recording its hooks in a file shared by the ranks."""

    def __init__(self, path: str):
        self.path = path

    def _note(self, text: str) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{text} rank{os.environ['RANK']}\n")

    def prepare_data(self):
        self._note("prepare_data")

    def setup(self, stage):
        self._note(f"setup {stage}")

    def train_dataloader(self):
        return DataLoader(indexed(16), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(indexed(7), batch_size=2)


class RankBatches(IterableDataset):
    """A rank-aware iterable of pre-made batches, ``counts[rank]`` of them, without a length."""

    def __init__(self, rank: int, counts: tuple):
        self.rank, self.world_size, self.count = rank, WORLD, counts[rank]

    def __iter__(self):
        for i in range(self.count):
            yield torch.arange(4) + 4 * i, torch.randn(4, 3)


def quiet(**kwargs) -> Trainer:
    kwargs.setdefault("strategy", DDPStrategy(accelerator="cpu"))
    return Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   log_every_n_steps=1, **kwargs)


def _error_of(fit) -> str:
    try:
        fit()
    except UnequalBatchesError as err:
        return str(err)
    return "no error"


def _scenarios(rank, world, call_log):
    out = {}
    # 1. fit(model, DataLoader(shuffle=True)) over 2·k samples, two epochs, then validate over 7.
    model = IndexRecorder()
    trainer = quiet(max_epochs=EPOCHS)
    trainer.fit(model, DataLoader(indexed(TRAIN_SAMPLES), batch_size=4, shuffle=True))
    out["seen"] = model.seen
    out["sampler"] = type(trainer.train_dataloader.sampler).__name__
    out["equal_by_construction"] = trainer.loaders.batches_equal_by_construction
    metrics = trainer.validate(model, DataLoader(indexed(7), batch_size=2))
    out["val_seen"], out["val_index_sq"] = model.val_seen, metrics[0]["val/index_sq"]

    # 2. The opt-out: every rank then reads the whole loader.
    model = IndexRecorder()
    quiet(max_epochs=1, use_distributed_sampler=False).fit(model, DataLoader(indexed(TRAIN_SAMPLES), batch_size=4))
    out["seen_without_sampler"] = model.seen[0]

    # 3. fit(model, datamodule=dm): prepare_data once per node, setup on every rank, data sharded.
    model = IndexRecorder()
    quiet(max_epochs=1).fit(model, datamodule=CallLog(call_log))
    out["datamodule_seen"] = model.seen[0]

    # 4. Unequal batches: a last batch of 3 on rank 1 only; then loaders of different lengths;
    #    then an iterable that runs dry on rank 1 first.
    own = indexed(12 if rank == 0 else 11)
    out["uneven_last_batch"] = _error_of(lambda: quiet(max_epochs=1, use_distributed_sampler=False).fit(
        IndexRecorder(), DataLoader(own, batch_size=4)))
    own = indexed(12 if rank == 0 else 8)
    out["uneven_lengths"] = _error_of(lambda: quiet(max_epochs=1, use_distributed_sampler=False).fit(
        IndexRecorder(), DataLoader(own, batch_size=4)))
    out["ran_dry"] = _error_of(lambda: quiet(max_steps=5).fit(IndexRecorder(), RankBatches(rank, (3, 2))))
    #    A list of batches is known in full: compared once, before the first step.
    listed = [(torch.arange(4), torch.randn(4, 3)) for _ in range(2)] + [(torch.arange(4 - rank), torch.randn(4 - rank, 3))]
    model = IndexRecorder()
    out["listed"] = _error_of(lambda: quiet(max_epochs=1).fit(model, listed))
    out["listed_steps_taken"] = model.seen
    return out


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    call_log = str(tmp_path_factory.mktemp("datamodule") / "calls.txt")
    results = run_on_ranks(_scenarios, WORLD, call_log)
    with open(call_log) as handle:
        calls = handle.read().splitlines()
    return results, calls


@pytest.mark.timeout(300)
def test_a_shuffled_dataloader_gives_each_sample_once_per_epoch_and_a_new_order_next_epoch(rank_results):
    results, _ = rank_results
    assert [r["sampler"] for r in results] == ["DistributedSampler"] * WORLD
    for epoch in range(EPOCHS):
        shares = [r["seen"][epoch] for r in results]
        assert len(shares[0]) == len(shares[1]) == TRAIN_SAMPLES // WORLD
        assert sorted(shares[0] + shares[1]) == list(range(TRAIN_SAMPLES)), f"epoch {epoch}: a sample missed or repeated"
    for r in results:
        assert r["seen"][0] != r["seen"][1]  # set_epoch: a different order in the next epoch
    # A re-created loader with a fixed batch size holds equal batches by construction: no
    # per-step size check is paid for it.
    assert all(r["equal_by_construction"] for r in results)


@pytest.mark.timeout(300)
def test_without_the_distributed_sampler_every_rank_reads_everything(rank_results):
    results, _ = rank_results
    for r in results:  # what use_distributed_sampler=False means (and what the default prevents)
        assert r["seen_without_sampler"] == list(range(TRAIN_SAMPLES))


@pytest.mark.timeout(300)
def test_validation_counts_each_sample_once_and_its_metric_is_exact(rank_results):
    results, _ = rank_results
    assert sorted(results[0]["val_seen"] + results[1]["val_seen"]) == list(range(7))
    exact = sum(i * i for i in range(7)) / 7  # 13.0; the mean of the ranks' means would be 12.83
    for r in results:
        assert r["val_index_sq"] == pytest.approx(exact, rel=1e-6)


@pytest.mark.timeout(300)
def test_datamodule_prepares_once_per_node_sets_up_on_every_rank_and_is_sharded(rank_results):
    results, calls = rank_results
    assert sorted(c for c in calls if c.startswith("prepare_data")) == ["prepare_data rank0"]
    assert sorted(c for c in calls if c.startswith("setup")) == ["setup fit rank0", "setup fit rank1"]
    shares = [r["datamodule_seen"] for r in results]
    assert sorted(shares[0] + shares[1]) == list(range(16))


@pytest.mark.timeout(300)
def test_unequal_batches_are_one_clear_error_on_every_rank(rank_results):
    results, _ = rank_results
    for r in results:
        message = r["uneven_last_batch"]
        assert "the ranks' training batches differ in size at global step 2 (epoch 0, batch 2)" in message, message
        assert "rank 0: 4, rank 1: 3" in message and "drop_last=True" in message
        assert "rank 0: 3, rank 1: 2" in r["uneven_lengths"] and "different numbers of batches" in r["uneven_lengths"]
        assert "some ranks ran out of training batches" in r["ran_dry"] and "rank 1: no batch" in r["ran_dry"]
        assert "differ in size at batch 2 of the training list (rank 0: 4, rank 1: 3)" in r["listed"], r["listed"]
        assert r["listed_steps_taken"] == {}  # refused before the first step
    assert results[0]["uneven_last_batch"] == results[1]["uneven_last_batch"]  # the same decision everywhere
