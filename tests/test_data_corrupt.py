"""The corrupt-data policy on real files: JPEGs cut in half inside a shard, and a tar shard cut
short. Below ``max_corrupt_fraction`` they are skipped, counted and their batch slots filled;
above it the rank stops with an error naming the shards; nothing hangs."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from scale_ssl.data import DataCorruptionError, EncodedImage, ShardedImageStream, write_image_shards
from tests._data_images import corrupt_jpeg, fmnist_jpegs
from tests._dist_workers_data import pixels_as_tensor

BATCH = 4
CLASSES = [str(c) for c in range(10)]
CORRUPT_KEYS = {"img-025", "img-031"}  # both in shard 1


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """3 shards x 20 Fashion-MNIST JPEGs; two JPEGs of shard 1 are cut in half."""
    out = tmp_path_factory.mktemp("corrupt") / "shards"
    samples = []
    for i, (data, label) in enumerate(fmnist_jpegs(60)):
        key = f"img-{i:03d}"
        samples.append((key, EncodedImage(corrupt_jpeg(data) if key in CORRUPT_KEYS else data, "jpg"), label))
    write_image_shards(samples, out, shard_size=20, classes=CLASSES)
    return out


def play(source, **options):
    options = {"rank": 0, "world_size": 1, "shuffle_shards": False, "shuffle_buffer": 0, "return_keys": True, **options}
    stream = ShardedImageStream(source, BATCH, pixels_as_tensor, **options)
    batches = [(images, keys) for images, _, keys in stream]
    return batches, stream


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_jpegs_below_the_threshold_are_skipped_counted_and_padded(jpeg_shards, num_workers):
    batches, stream = play(jpeg_shards, num_workers=num_workers, max_corrupt_fraction=0.05)
    assert len(batches) == len(stream) == 15  # all 60 samples planned; nothing dropped
    assert all(images.shape == (BATCH, 28, 28) for images, _ in batches)
    keys = Counter(key for _, batch_keys in batches for key in batch_keys)
    assert not CORRUPT_KEYS & set(keys)
    assert len(keys) == 58 and sum(keys.values()) == 60  # two good samples fill the two slots
    stats = stream.epoch_stats()
    assert (stats["corrupt_skipped"], stats["samples_missing"], stats["samples_padded"]) == (2, 0, 2)
    # The copy sits in the corrupt sample's own batch (slot-local padding keeps positions fixed).
    for images, batch_keys in batches:
        if len(set(batch_keys)) < BATCH:
            assert {int(k[4:]) // BATCH for k in batch_keys} <= {25 // BATCH, 31 // BATCH}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_jpegs_above_the_threshold_stop_with_the_shard_named(jpeg_shards, num_workers):
    with pytest.raises(DataCorruptionError) as error:
        play(jpeg_shards, num_workers=num_workers, max_corrupt_fraction=0.02)  # budget: 1 of 60
    message = str(error.value)
    assert "shard-000001.tar (2)" in message and "img-025" in message and "img-031" in message
    assert "max_corrupt_fraction=0.02" in message and "2 failed to decode" in message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", ["file", "pipe"])
def test_a_truncated_tar_is_counted_as_missing_samples_and_never_hangs(jpeg_shards, tmp_path, via):
    cut = tmp_path / "cut"
    shutil.copytree(jpeg_shards, cut)
    shard = cut / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    source = cut if via == "file" else f"pipe:cat {cut}/{{name}}"

    batches, stream = play(source, num_workers=1, max_corrupt_fraction=0.5)
    assert len(batches) == 15
    stats = stream.epoch_stats()
    # A cut inside a tar header reads as a clean end of the tar, so the sample before it may
    # arrive without its image: then it counts as corrupt rather than missing.
    lost = stats["samples_missing"] + stats["corrupt_skipped"] - len(CORRUPT_KEYS)
    assert stats["samples_missing"] >= 4 and 5 <= lost < 20
    assert stats["samples_padded"] == stats["samples_missing"] + stats["corrupt_skipped"]
    seen = {key for _, batch_keys in batches for key in batch_keys}
    assert seen >= {f"img-{i:03d}" for i in range(40)} - CORRUPT_KEYS
    assert len(seen & {f"img-{i:03d}" for i in range(40, 60)}) == 20 - lost

    with pytest.raises(DataCorruptionError, match=r"shard-000002\.tar \(\d+\).*truncated"):
        play(source, num_workers=1, max_corrupt_fraction=0.05)


@pytest.mark.timeout(60)
def test_a_batch_with_no_usable_sample_is_filled_from_the_previous_one_else_an_error(tmp_path):
    good = fmnist_jpegs(4)
    samples = [(f"good-{i}", EncodedImage(data, "jpg"), label) for i, (data, label) in enumerate(good)]
    samples += [(f"bad-{i}", EncodedImage(b"not a jpeg", "jpg"), 0) for i in range(8)]
    write_image_shards(samples, tmp_path / "s", shard_size=12, classes=CLASSES)
    # batch 1 is all bad: filled with batch 0's samples; batch 2 is all bad after an all-bad one
    with pytest.raises(DataCorruptionError, match=r"no sample of batch 2 could be used, nor of the batch before"):
        play(tmp_path / "s", max_corrupt_fraction=1.0)
    stream = ShardedImageStream(tmp_path / "s", BATCH, pixels_as_tensor, rank=0, world_size=1, shuffle_shards=False,
                                shuffle_buffer=0, return_keys=True, max_corrupt_fraction=1.0)
    batches = iter(stream)
    assert next(batches)[2] == next(batches)[2] == [f"good-{i}" for i in range(4)]
    # also right after a resume at batch 1: the batch before the resume point is re-read
    stream.set_epoch(0)
    stream.skip_batches(1)
    assert next(iter(stream))[2] == [f"good-{i}" for i in range(4)]
