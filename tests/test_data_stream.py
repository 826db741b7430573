"""ShardedImageStream over real tar shards: equal steps per rank, disjoint samples, seeded order.

Single-process tests simulate every rank of a world by passing rank/world_size explicitly (each
rank's plan is computed from the index alone, so that is what a real rank does too); the gloo
test runs real ranks with DataLoader workers and an all_reduce per step.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from scale_ssl.data import (
    FMNIST_MEAN,
    FMNIST_STD,
    ShardedImageStream,
    DataCorruptionError,
    SimCLRViews,
)
from tests._dist_workers_data import pixels_as_tensor, train_one_epoch_on_rank, write_uneven_shards
from tests.distributed import run_on_ranks

# Uneven on purpose: a naive split of these gives ranks different batch counts.
SHARD_SIZES = [23, 7, 15, 31, 4, 18, 11]
BATCH = 4

# Three workers on a two-core machine is the point of some cases, not a mistake.
more_workers_than_cores = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uneven")
    write_uneven_shards(directory, SHARD_SIZES)
    return directory


def all_keys(sizes):
    return {f"s{shard:03d}-{i:04d}" for shard, size in enumerate(sizes) for i in range(size)}


def run_epoch(source, rank, world_size, epoch=0, **options):
    """Every batch ``rank`` yields in one epoch, as (labels, keys) lists; plus the stream."""
    options.setdefault("seed", 3)
    stream = ShardedImageStream(
        source, BATCH, pixels_as_tensor, rank=rank, world_size=world_size, return_keys=True, **options
    )
    stream.set_epoch(epoch)
    batches = []
    for images, labels, keys in stream:
        assert images.shape == (BATCH, 6, 6) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
        # Labels travel with their own images: the writer gave sample i of a shard label i % 10.
        assert labels.tolist() == [int(key.split("-")[1]) % 10 for key in keys]
        batches.append(keys)
    return batches, stream


def expected_steps(sizes, world_size, readers, epoch, seed):
    """The documented plan: ``N // (world_size * batch)`` steps on every rank; and, to show the
    case is a hard one, the full batches each rank would make if whole shards were dealt to
    ranks and readers round-robin (the shard-granular split this stream replaced)."""
    order = list(range(len(sizes)))
    random.Random(seed + epoch).shuffle(order)
    whole_shard_split = []
    for rank in range(world_size):
        mine = order[rank::world_size]
        whole_shard_split.append(sum(sum(sizes[s] for s in mine[w::readers]) // BATCH for w in range(readers)))
    return sum(sizes) // (world_size * BATCH), whole_shard_split


@more_workers_than_cores
@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 0), (2, 2), (3, 1), (2, 3)])
def test_every_rank_yields_exactly_steps_per_epoch_and_no_sample_twice(shard_dir, world_size, num_workers):
    seen = Counter()
    steps_by_rank = []
    for rank in range(world_size):
        batches, stream = run_epoch(shard_dir, rank, world_size, num_workers=num_workers)
        steps_by_rank.append(len(batches))
        assert len(batches) == len(stream) == stream.steps_per_epoch
        seen.update(key for keys in batches for key in keys)

    steps, per_rank = expected_steps(SHARD_SIZES, world_size, max(1, num_workers), epoch=0, seed=3)
    # The case must be one where whole shards would give ranks different numbers of batches.
    assert world_size == 1 or len(set(per_rank)) > 1
    assert steps_by_rank == [steps] * world_size
    assert max(seen.values()) == 1, "a sample was read twice in one epoch"
    assert set(seen) <= all_keys(SHARD_SIZES)
    assert len(seen) == steps * BATCH * world_size
    assert stream.num_samples == sum(SHARD_SIZES)
    assert stream.samples_dropped_per_epoch == sum(SHARD_SIZES) - steps * BATCH * world_size < world_size * BATCH


def test_shard_order_changes_with_epoch_and_repeats_for_same_seed_and_epoch(shard_dir):
    def key_sequence(epoch, seed=3, shuffle_buffer=0):
        batches, _ = run_epoch(shard_dir, 0, 1, epoch=epoch, seed=seed, shuffle_buffer=shuffle_buffer)
        return [key for keys in batches for key in keys]

    def shard_sequence(keys):
        return list(dict.fromkeys(key.split("-")[0] for key in keys))

    epoch0, epoch1 = key_sequence(0), key_sequence(1)
    assert shard_sequence(epoch0) != shard_sequence(epoch1)
    assert key_sequence(0) == epoch0  # a fresh stream with the same seed and epoch replays it
    assert shard_sequence(key_sequence(0, seed=4)) != shard_sequence(epoch0)
    # With the sample shuffle on, samples are mixed within the buffer yet replay exactly too.
    shuffled = key_sequence(1, shuffle_buffer=50)
    assert shuffled == key_sequence(1, shuffle_buffer=50)
    assert shuffled != epoch1 and sorted(shuffled) != shuffled


def test_shuffle_shards_false_keeps_index_order(shard_dir):
    batches, _ = run_epoch(shard_dir, 0, 1, epoch=5, shuffle_shards=False, shuffle_buffer=0)
    keys = [key for keys in batches for key in keys]
    assert keys == sorted(keys)


@more_workers_than_cores
def test_more_readers_than_shards_gives_equal_steps_and_no_raw_webdataset_error(tmp_path):
    sizes = [13, 6, 9]  # 3 shards for 2 ranks x 3 workers: three readers get nothing
    write_uneven_shards(tmp_path, sizes)
    seen, steps = Counter(), []
    for rank in range(2):
        batches, stream = run_epoch(tmp_path, rank, 2, num_workers=3)
        steps.append(len(batches))
        seen.update(key for keys in batches for key in keys)
    planned, per_rank = expected_steps(sizes, 2, 3, epoch=0, seed=3)
    assert per_rank[0] != per_rank[1], "whole shards should give the ranks unequal batch counts"
    assert steps == [planned, planned] == [stream.steps_per_epoch] * 2 and planned > 0
    assert max(seen.values()) == 1 and len(seen) == planned * BATCH * 2 > sum(sizes) - 2 * BATCH


def test_too_few_samples_for_one_batch_per_rank_is_a_clear_error(tmp_path):
    write_uneven_shards(tmp_path, [5, 6])
    with pytest.raises(ValueError) as error:
        ShardedImageStream(tmp_path, 8, pixels_as_tensor, rank=0, world_size=2)
    message = str(error.value)
    assert "batch_size=8" in message and "world_size=2" in message and "11 samples" in message


def test_shard_shorter_than_its_index_raises_naming_the_shard(tmp_path):
    write_uneven_shards(tmp_path, [10])
    index_file = tmp_path / "shards.json"
    stale = json.loads(index_file.read_text())
    stale["shards"][0]["num_samples"] = stale["num_samples"] = 18  # the tar holds only 10
    index_file.write_text(json.dumps(stale))
    for num_workers in (0, 1):  # also through a DataLoader worker process
        stream = ShardedImageStream(
            tmp_path, BATCH, pixels_as_tensor, rank=0, world_size=1, num_workers=num_workers
        )
        assert len(stream) == 4
        with pytest.raises(DataCorruptionError, match=r"part-000\.tar \(\d+\)") as error:
            list(stream)
        assert "ended after 10 of the 18 samples its index lists" in str(error.value)


def test_two_view_transform_collates_to_a_tuple_of_view_batches_in_a_spawned_worker(tmp_path):
    write_uneven_shards(tmp_path, [9, 9], image_size=28)
    views = SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD)
    # A spawned worker receives the whole pipeline (and the transform) by pickle.
    stream = ShardedImageStream(
        tmp_path, BATCH, views, rank=0, world_size=1, num_workers=1, multiprocessing_context="spawn"
    )
    batches = list(stream)
    assert len(batches) == 4
    (first, second), labels = batches[0]
    assert first.shape == second.shape == (BATCH, 1, 28, 28) and first.dtype == torch.float32
    assert labels.shape == (BATCH,)
    assert not torch.equal(first, second)


def test_place_defaults_state_dict_and_argument_errors(shard_dir):
    stream = ShardedImageStream(shard_dir, BATCH, pixels_as_tensor)
    assert (stream.rank, stream.world_size) == (0, 1)  # no process group initialised
    stream.set_epoch(3)
    state = stream.state_dict()
    assert state["epoch"] == 3 and state["seed"] == 0 and state["world_size"] == 1
    resumed = ShardedImageStream(shard_dir, BATCH, pixels_as_tensor)
    resumed.load_state_dict(state)
    assert resumed.epoch == 3 and resumed.plan.shard_order == stream.plan.shard_order
    with pytest.raises(ValueError, match="seed=0"):
        ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="drop_last must be True"):
        ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, drop_last=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ShardedImageStream(shard_dir, 0, pixels_as_tensor)
    with pytest.raises(ValueError, match="both rank and world_size"):
        ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, rank=1)
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.world_size-1 = 0\.\.1, got 2"):
        ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, rank=2, world_size=2)


@pytest.mark.timeout(120)
def test_real_gloo_ranks_with_workers_take_equal_steps_and_share_no_sample(shard_dir):
    world_size, num_workers, epoch = 2, 2, 1
    results = run_on_ranks(train_one_epoch_on_rank, world_size, str(shard_dir), BATCH, num_workers, epoch)

    steps, per_rank = expected_steps(SHARD_SIZES, world_size, num_workers, epoch=epoch, seed=7)
    assert per_rank[0] != per_rank[1], "whole shards should give the ranks unequal batch counts"
    assert [r["rank_seen_by_stream"] for r in results] == [0, 1]
    assert all(r["world_size_seen_by_stream"] == 2 for r in results)
    assert [r["steps"] for r in results] == [steps, steps]
    assert all(r["len"] == steps and r["all_steps"] == [steps, steps] for r in results)
    keys = results[0]["keys"] + results[1]["keys"]
    assert len(keys) == len(set(keys)) == steps * BATCH * world_size
    assert results[0]["dropped"] == sum(SHARD_SIZES) - steps * BATCH * world_size


def test_config_data_fields_reach_the_stream_and_bad_values_are_named(tmp_path):
    from omegaconf import OmegaConf

    from scale_ssl.cli.assembly import build_train_stream
    from scale_ssl.config import RunConfig
    from scale_ssl.config.load import ConfigError, validate_config

    write_uneven_shards(tmp_path, [40, 40], image_size=28)
    config = OmegaConf.structured(RunConfig)
    config.data.train_shards = str(tmp_path)
    config.trainer.max_steps = 10
    config.data.mode, config.data.max_corrupt_fraction, config.data.retries = "resampled", 0.25, 5
    validate_config(config)

    class Place:
        global_rank, world_size = 1, 2

    stream = build_train_stream(config, Place(), batch_size=4)
    assert (stream.mode, stream.max_corrupt_fraction, stream.io_options["retries"]) == ("resampled", 0.25, 5)
    assert (stream.rank, stream.world_size, len(stream)) == (1, 2, 10)
    for key, value, message in [
        ("mode", "sometimes", "data.mode must be 'exact'"),
        ("max_corrupt_fraction", 2.0, "data.max_corrupt_fraction is a share in"),
        ("io_timeout", -1.0, "data.io_timeout must be >= 0"),
    ]:
        bad = config.copy()
        bad.data[key] = value
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)


@more_workers_than_cores
def test_resampled_mode_gives_every_rank_the_nominal_epoch_and_seeded_draws(shard_dir):
    nominal = sum(SHARD_SIZES) // (BATCH * 3)
    per_rank = []
    for rank in range(3):
        batches, stream = run_epoch(shard_dir, rank, 3, mode="resampled", num_workers=2)
        assert len(batches) == len(stream) == nominal
        per_rank.append([key for keys in batches for key in keys])
    assert per_rank[0] != per_rank[1] != per_rank[2]  # each reader draws from its own generator
    # Draws are proportional to shard size and with replacement: over all ranks some sample repeats.
    everything = Counter(key for keys in per_rank for key in keys)
    assert max(everything.values()) > 1 and set(everything) <= all_keys(SHARD_SIZES)
    again, _ = run_epoch(shard_dir, 1, 3, mode="resampled", num_workers=2)
    assert [key for keys in again for key in keys] == per_rank[1]
    other_epoch, _ = run_epoch(shard_dir, 1, 3, epoch=1, mode="resampled", num_workers=2)
    assert [key for keys in other_epoch for key in keys] != per_rank[1]
