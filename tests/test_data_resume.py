"""Mid-epoch resume of ``ShardedImageStream``: a new process that skips the first n batches yields
bitwise the batches an uninterrupted epoch yields after its n-th, with real augmentations, real
tar shards and DataLoader worker processes; and nothing consumed is decoded again."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from scale_ssl.data import ShardedImageStream
from tests._dist_workers_data import (
    pixels_as_tensor,
    play_epoch,
    play_epoch_in_new_process,
    write_uneven_shards,
)

SHARD_SIZES = [23, 7, 15, 31, 4, 18, 11]
BATCH = 4

more_workers_than_cores = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume")
    write_uneven_shards(directory, SHARD_SIZES, image_size=28)
    return directory


def full_epoch(shard_dir, options, epoch, tmp_path):
    out = tmp_path / "full.pt"
    play_epoch(str(shard_dir), options, epoch, 0, None, str(out))
    return torch.load(out, weights_only=False)


def assert_same_batches(resumed, reference):
    assert len(resumed) == len(reference)
    for (views, labels, keys), (ref_views, ref_labels, ref_keys) in zip(resumed, reference):
        assert keys == ref_keys
        assert torch.equal(labels, ref_labels)
        for view, ref_view in zip(views, ref_views):
            assert torch.equal(view, ref_view), "augmentations differ after resume"


@more_workers_than_cores
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "mode, world_size, rank, num_workers, skip, new_process",
    [
        ("exact", 1, 0, 0, 7, False),
        ("exact", 2, 1, 2, 3, False),  # uneven worker quotas: the round-robin order must be restored
        ("exact", 2, 0, 3, 5, True),
        ("resampled", 2, 1, 2, 4, True),
    ],
)
def test_resumed_epoch_in_a_new_process_is_bitwise_the_rest_of_the_uninterrupted_one(
    shard_dir, tmp_path, mode, world_size, rank, num_workers, skip, new_process
):
    options = dict(
        batch_size=BATCH, mode=mode, rank=rank, world_size=world_size, num_workers=num_workers,
        seed=5, shuffle_buffer=20,
    )
    epoch = 2
    full = full_epoch(shard_dir, options, epoch, tmp_path)
    batches = full["batches"]
    assert len(batches) == full["len"] and skip < len(batches)
    assert full["rng_untouched"], "iterating the stream changed the caller's global RNG"

    # A spawned interpreter costs a torch import (seconds on a busy 2-core machine), so only
    # some cases pay for one; the others resume a fresh stream in this process.
    if new_process:
        resumed = play_epoch_in_new_process(str(shard_dir), options, epoch, skip, full["state"])
    else:
        play_epoch(str(shard_dir), options, epoch, skip, full["state"], str(tmp_path / "resumed.pt"))
        resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert resumed["len"] == full["len"]  # the trainer's epoch length does not change
    assert_same_batches(resumed["batches"], batches[skip:])
    stats = resumed["stats"]
    assert stats["resumed_at_batch"] == skip and stats["resume_exact"] is True
    assert stats["samples_reseen_after_resume"] == 0
    if mode == "exact":
        before = Counter(k for _, _, keys in batches[:skip] for k in keys)
        after = Counter(k for _, _, keys in resumed["batches"] for k in keys)
        assert not (set(before) & set(after)), "a sample consumed before the stop came back"
        assert before + after == Counter(k for _, _, keys in batches for k in keys)
        # Consumed samples are read again (undecoded) only from shards that were half done.
        assert stats["resume_samples_reread"] <= skip * BATCH


@more_workers_than_cores
@pytest.mark.timeout(120)
def test_fully_consumed_shards_are_not_reread_on_resume(tmp_path):
    sizes = [8] * 6
    write_uneven_shards(tmp_path, sizes)
    # One reader, no sample shuffle, index order: batches 0-3 are exactly shards 0 and 1 (and a
    # half of shard 2 is batch 4); a resume at batch 5 must not read shards 0 and 1 at all.
    options = dict(rank=0, world_size=1, num_workers=0, shuffle_buffer=0, shuffle_shards=False, return_keys=True)
    stream = ShardedImageStream(tmp_path, BATCH, pixels_as_tensor, **options)
    keys = [k for _, _, batch_keys in stream for k in batch_keys]
    stream = ShardedImageStream(tmp_path, BATCH, pixels_as_tensor, **options)
    for name in ("part-000.tar", "part-001.tar"):
        (tmp_path / name).write_bytes(b"")  # opened, these would count 8 missing samples each
    stream.set_epoch(0)
    stream.skip_batches(5)
    rest = [k for _, _, batch_keys in stream for k in batch_keys]
    assert rest == keys[5 * BATCH :]
    assert stream.epoch_stats()["resume_samples_reread"] == 4  # the first half of shard 2
    assert stream.epoch_stats()["samples_missing"] == 0


def test_resume_with_another_world_size_warns_and_still_gives_the_remaining_steps(shard_dir):
    old = ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, rank=0, world_size=2, seed=5)
    old.set_epoch(1)
    state = old.state_dict()
    new = ShardedImageStream(shard_dir, BATCH, pixels_as_tensor, rank=0, world_size=1, seed=5)
    new.load_state_dict(state)
    new.set_epoch(1)
    with pytest.warns(UserWarning, match=r"world_size 2 -> 1.*up to 8 samples"):
        new.skip_batches(2)
    assert len(list(new)) == len(new) - 2
    stats = new.epoch_stats()
    assert stats["resume_exact"] is False and stats["samples_reseen_after_resume"] == 2 * BATCH
    with pytest.raises(ValueError, match="more than the"):
        new.skip_batches(len(new) + 1)
