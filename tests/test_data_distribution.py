"""The trainer splits what a user hands it over the ranks (``scale_ssl/trainer/data_distribution.py``).

In one process, for each rank of a world of 2 in turn: the loader the trainer would iterate.
The same code then runs on real gloo ranks through the public ``Trainer`` in
``tests/test_trainer_data_ranks.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from scale_ssl.trainer.data_distribution import (
    EVAL,
    TRAIN,
    RankShareSampler,
    distribute_loader,
    equal_batches_by_construction,
    rank_aware,
    set_loader_epoch,
)

WORLD = 2


def indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def per_rank(loader, stage, epoch=0, seed=0) -> list[list[int]]:
    out = []
    for rank in range(WORLD):
        mine = distribute_loader(loader, stage, WORLD, rank, seed, "the test loader")
        set_loader_epoch(mine, epoch)
        out.append(indices(mine))
    return out


def dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.randn(n, 3))


def test_shuffled_training_loader_gives_every_sample_once_and_a_new_order_each_epoch():
    loader = DataLoader(dataset(24), batch_size=4, shuffle=True)
    first, second = per_rank(loader, TRAIN, epoch=0), per_rank(loader, TRAIN, epoch=1)
    for epoch in (first, second):
        assert sorted(epoch[0] + epoch[1]) == list(range(24))  # each sample once, on one rank
        assert len(epoch[0]) == len(epoch[1]) == 12
    assert first != second
    again = per_rank(loader, TRAIN, epoch=0)
    assert again == first  # the order is a function of (seed, epoch): the same on every rank and on resume
    mine = distribute_loader(loader, TRAIN, WORLD, 0, 0, "x")
    assert isinstance(mine.sampler, DistributedSampler) and mine.batch_size == 4
    assert equal_batches_by_construction(mine, WORLD)


def test_training_drops_fewer_than_world_samples_instead_of_repeating_any():
    """25 samples on 2 ranks: 12 each, one left out (a different one each epoch), none twice."""
    loader = DataLoader(dataset(25), batch_size=5, shuffle=True, drop_last=False)
    left_out = set()
    for epoch in range(4):
        shares = per_rank(loader, TRAIN, epoch=epoch)
        assert len(shares[0]) == len(shares[1]) == 12
        seen = shares[0] + shares[1]
        assert len(set(seen)) == 24
        left_out |= set(range(25)) - set(seen)
    assert len(left_out) > 1  # not always the same sample
    # drop_last carried over: batches of 5 -> 2 full batches + one of 2 per rank, the same on both
    mine = distribute_loader(loader, TRAIN, WORLD, 1, 0, "x")
    assert [len(b[0]) for b in mine] == [5, 5, 2] and mine.drop_last is False


def test_evaluation_split_holds_every_sample_exactly_once():
    loader = DataLoader(dataset(7), batch_size=2)
    shares = per_rank(loader, EVAL)
    assert sorted(shares[0] + shares[1]) == list(range(7))
    assert (len(shares[0]), len(shares[1])) == (4, 3)  # unequal shares: nothing padded, nothing dropped


def test_an_evaluation_set_smaller_than_the_world_is_refused():
    with pytest.raises(ValueError, match="holds 1 samples for 2 ranks, so rank 1 would have none"):
        distribute_loader(DataLoader(dataset(1)), EVAL, WORLD, 1, 0, "the validation loader")


def test_a_users_sampler_keeps_its_order_and_is_split():
    weights = torch.ones(40)
    weights[:20] = 0.0  # only samples 20..39 can be drawn
    loader = DataLoader(dataset(40), batch_size=5, sampler=WeightedRandomSampler(weights, num_samples=30))
    shares = per_rank(loader, TRAIN)
    assert len(shares[0]) == len(shares[1]) == 15
    assert all(i >= 20 for share in shares for i in share)  # still the user's distribution
    # Both ranks drew the same 30 indices (the sampler ran under the same seeded RNG on each),
    # and took alternate positions of them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        drawn = list(WeightedRandomSampler(weights, num_samples=30))
    assert shares[0] == drawn[0::2] and shares[1] == drawn[1::2]
    assert isinstance(distribute_loader(loader, TRAIN, WORLD, 0, 0, "x").sampler, RankShareSampler)


def test_a_users_batch_sampler_is_split_by_whole_batches():
    batches = BatchSampler(SequentialSampler(range(23)), batch_size=4, drop_last=False)  # last batch: 3
    loader = DataLoader(dataset(23), batch_sampler=batches)
    train, evaluation = per_rank(loader, TRAIN), per_rank(loader, EVAL)
    assert train == [list(range(0, 4)) + list(range(8, 12)) + list(range(16, 20)),
                     list(range(4, 8)) + list(range(12, 16)) + list(range(20, 23))]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(23))
    # batch sizes of a user's batch sampler may differ: the trainer checks them every step
    assert not equal_batches_by_construction(distribute_loader(loader, TRAIN, WORLD, 0, 0, "x"), WORLD)


def test_a_distributed_sampler_for_this_world_is_kept_one_for_another_is_refused():
    data = dataset(8)
    mine = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    assert distribute_loader(mine, TRAIN, WORLD, 1, 0, "x") is mine
    with pytest.raises(ValueError, match="DistributedSampler for rank 1 of 2, but this is rank 0 of 2"):
        distribute_loader(mine, TRAIN, WORLD, 0, 0, "the training loader")


def test_custom_collate_is_kept_but_no_longer_counts_as_equal_batches():
    loader = DataLoader(dataset(8), batch_size=2, collate_fn=lambda rows: rows)
    mine = distribute_loader(loader, TRAIN, WORLD, 0, 0, "x")
    assert mine.collate_fn is loader.collate_fn
    assert not equal_batches_by_construction(mine, WORLD)


class Counting(IterableDataset):
    def __iter__(self):
        return iter(range(4))


class RankAwareCounting(Counting):
    rank, world_size = 0, WORLD


def test_an_iterable_dataset_that_is_not_rank_aware_warns_once_naming_the_fix():
    loader = DataLoader(Counting(), batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert distribute_loader(loader, TRAIN, WORLD, 0, 0, "the training loader") is loader
        distribute_loader(loader, TRAIN, WORLD, 1, 0, "the training loader")  # only rank 0 warns
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "the training loader iterates Counting" in text and "split_by_node" in text and "ShardedImageStream" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distribute_loader(DataLoader(RankAwareCounting(), batch_size=2), TRAIN, WORLD, 0, 0, "x")
        distribute_loader(RankAwareCounting(), TRAIN, WORLD, 0, 0, "x")


def test_our_stream_is_rank_aware_and_equal_by_construction(fmnist_shards):
    from scale_ssl.data import ShardedImageStream

    stream = ShardedImageStream(fmnist_shards / "train", batch_size=8, transform=lambda image: 0, rank=1, world_size=WORLD)
    assert rank_aware(stream, WORLD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distribute_loader(stream, TRAIN, WORLD, 1, 0, "x") is stream
    assert equal_batches_by_construction(stream, WORLD)


def test_one_process_leaves_every_loader_alone():
    loader = DataLoader(dataset(8), batch_size=2, shuffle=True)
    assert distribute_loader(loader, TRAIN, 1, 0, 0, "x") is loader
