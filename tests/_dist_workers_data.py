"""Helpers for the data tests that must live in an importable module: spawned ranks and
DataLoader workers import them by name, which a function defined inside a test cannot offer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import webdataset as wds

from scale_ssl.data import ShardedImageStream, ShardIndex, ShardInfo

NUM_CLASSES = 10


def write_uneven_shards(directory: Path, sizes: list[int], image_size: int = 6) -> ShardIndex:
    """Real tar shards with the given sample counts (which write_image_shards, with one
    shard_size, cannot make) and their index. Keys are ``s<shard>-<i>``; pixels are random."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for shard, size in enumerate(sizes):
        name = f"part-{shard:03d}.tar"
        with wds.TarWriter(str(directory / name), mtime=0) as writer:
            for i in range(size):
                pixels = rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)
                image = PIL.Image.fromarray(pixels)
                writer.write({"__key__": f"s{shard:03d}-{i:04d}", "png": image, "cls": i % NUM_CLASSES})
        shards.append(ShardInfo(name, size, (directory / name).stat().st_size))
    classes = [str(c) for c in range(NUM_CLASSES)]
    index = ShardIndex(shards=shards, classes=classes, image_key="png", source="test")
    index.save(directory)
    return index


def pixels_as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """A cheap picklable transform: the decoded pixels, unchanged, as a uint8 tensor."""
    return torch.from_numpy(np.array(image))


def train_one_epoch_on_rank(
    rank: int, world_size: int, shard_dir: str, batch_size: int, num_workers: int, epoch: int
):
    """One epoch on a real gloo rank, with an all_reduce per step as a training step would do.

    If ranks took different step counts, the rank with more steps would block in its extra
    all_reduce (the test's timeout catches it) or fail when its peer leaves the group.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")  # run_on_ranks sets MASTER_ADDR/PORT
    # rank and world_size deliberately not passed: the stream must take them from the group.
    stream = ShardedImageStream(
        shard_dir,
        batch_size,
        pixels_as_tensor,
        num_workers=num_workers,
        seed=7,
        return_keys=True,
        # Ranks made by mp.spawn default their own children to spawn too, and each spawned worker
        # re-imports torch (seconds on 2 cores); ranks launched by torchrun fork their workers.
        multiprocessing_context="fork",
    )
    stream.set_epoch(epoch)
    keys, steps = [], 0
    for images, labels, batch_keys in stream:
        assert images.shape[0] == batch_size
        gradient_stand_in = images.float().mean().reshape(1)
        dist.all_reduce(gradient_stand_in)
        keys.extend(batch_keys)
        steps += 1
    all_steps = [None] * world_size
    dist.all_gather_object(all_steps, steps)
    return {
        "rank_seen_by_stream": stream.rank,
        "world_size_seen_by_stream": stream.world_size,
        "steps": steps,
        "len": len(stream),
        "all_steps": all_steps,
        "keys": keys,
        "dropped": stream.samples_dropped_per_epoch,
    }


def train_epochs_on_rank(rank: int, world_size: int, shard_dir: str, batch_size: int, num_workers: int, epochs: int):
    """``train_one_epoch_on_rank`` for epochs ``0..epochs-1`` in one process group: per epoch the
    steps of every rank (all-gathered), this rank's keys and the planned drop."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    stream = ShardedImageStream(shard_dir, batch_size, pixels_as_tensor, num_workers=num_workers, seed=7,
                                return_keys=True, multiprocessing_context="fork")
    per_epoch = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        keys, steps = [], 0
        for images, labels, batch_keys in stream:
            assert images.shape[0] == batch_size
            dist.all_reduce(images.float().mean().reshape(1))  # a step's collective
            keys.extend(batch_keys)
            steps += 1
        all_steps = [None] * world_size
        dist.all_gather_object(all_steps, steps)
        per_epoch.append({"steps": steps, "all_steps": all_steps, "len": len(stream), "keys": keys,
                          "labels_seen": sorted(set(labels.tolist())), "dropped": stream.samples_dropped_per_epoch})
    return per_epoch


def play_epoch(shard_dir: str, options: dict, epoch: int, skip: int, state: dict | None, out_path: str):
    """Play one epoch of a fresh ``ShardedImageStream`` (SimCLR views of 28 px images) and save
    its batches to ``out_path``: what a resumed run does in its own process (``load_state_dict``,
    ``set_epoch``, ``skip_batches`` in the trainer's order), or, with ``skip=0``, a full epoch."""
    from scale_ssl.data import FMNIST_MEAN, FMNIST_STD, SimCLRViews

    torch.manual_seed(1234)  # the caller's RNG: must not change the data, nor be changed by it
    views = SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD)
    stream = ShardedImageStream(shard_dir, transform=views, return_keys=True, **options)
    if state is not None:
        stream.load_state_dict(state)
    stream.set_epoch(epoch)
    if skip:
        stream.skip_batches(skip)
    rng_before = torch.get_rng_state()
    batches = [((v1, v2), labels, keys) for (v1, v2), labels, keys in stream]
    torch.save(
        {
            "batches": batches,
            "len": len(stream),
            "stats": stream.epoch_stats(),
            "state": stream.state_dict(),
            "rng_untouched": torch.equal(rng_before, torch.get_rng_state()),
        },
        out_path,
    )


def play_epoch_in_new_process(*args) -> dict:
    """``play_epoch`` in a freshly spawned interpreter (nothing shared with the caller)."""
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out_path = str(Path(scratch) / "epoch.pt")
        process = multiprocessing.get_context("spawn").Process(target=play_epoch, args=(*args, out_path))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"the resumed process failed with exit code {process.exitcode}")
        return torch.load(out_path, weights_only=False)
