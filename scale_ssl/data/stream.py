"""``ShardedImageStream``: webdataset tar shards streamed so that every rank takes the same steps.

Contract 5 of the design: a rank that runs out of samples while another still trains leaves the
other waiting forever in its next collective. Counting on the shards to split evenly does not
work: shards differ in size, there may be more readers (ranks × DataLoader workers) than shards,
and each reader drops its own last partial batch. So the stream plans each epoch from the shard
index alone, identically on every rank and with no communication:

1. The epoch's shard order is ``random.Random(seed + epoch).shuffle`` of the index order (the
   same on every rank).
2. Shard ``i`` of that order goes to rank ``i % world_size``; a rank's ``j``-th shard goes to its
   DataLoader worker ``j % num_workers``. Reader (r, w) therefore holds a known n_{r,w} samples
   and can make floor(n_{r,w} / batch_size) full batches.
3. ``steps_per_epoch = min over ranks r of sum over workers w of floor(n_{r,w} / batch_size)``.
   Each rank splits exactly that many batches among its workers (round-robin over the workers
   that can still make one), each worker stops at its share, and the rank yields exactly
   ``steps_per_epoch`` batches.

Every sample is read by at most one reader per epoch (shards are disjoint across readers), and
``samples_dropped_per_epoch = num_samples - steps_per_epoch * batch_size * world_size`` samples
are skipped that epoch; which ones changes with the epoch's shuffle. With shards of unequal
sizes both numbers can change from one epoch to the next, so read them after ``set_epoch``.

The plan is exact only if the shards hold what the index says: a worker checks the length of
every shard it reads to the end and raises ``ShardIndexMismatchError`` naming the shard, so a
stale index fails loudly on one rank instead of leaving the others hanging.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import PIL.Image
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, default_collate, get_worker_info

from scale_ssl.data.shard_index import ShardIndex


class ShardIndexMismatchError(RuntimeError):
    """A shard on disk does not hold the samples its index promises, so the epoch plan is void."""


class EpochShardPlan:
    """Which shards every reader (rank, worker) reads in one epoch, and how many batches each yields.

    Pure arithmetic on the index's shard sizes: every rank builds the same plan for every rank.
    ``num_workers`` counts readers per rank, so a DataLoader with ``num_workers=0`` (reading in
    the main process) is one reader.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        epoch: int,
        seed: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        shuffle_shards: bool = True,
    ):
        self.shard_sizes = list(shard_sizes)
        self.epoch, self.seed = epoch, seed
        self.world_size, self.num_workers, self.batch_size = world_size, num_workers, batch_size
        self.shard_order = list(range(len(self.shard_sizes)))
        if shuffle_shards:
            random.Random(seed + epoch).shuffle(self.shard_order)
        self.steps_per_epoch = min(
            sum(self.full_batches(rank, worker) for worker in range(num_workers))
            for rank in range(world_size)
        )

    def rank_shards(self, rank: int) -> list[int]:
        """Shard positions (into the index) read by ``rank`` this epoch, in reading order."""
        return self.shard_order[rank :: self.world_size]

    def worker_shards(self, rank: int, worker: int) -> list[int]:
        return self.rank_shards(rank)[worker :: self.num_workers]

    def samples(self, rank: int, worker: int) -> int:
        return sum(self.shard_sizes[shard] for shard in self.worker_shards(rank, worker))

    def rank_samples(self, rank: int) -> int:
        return sum(self.shard_sizes[shard] for shard in self.rank_shards(rank))

    def full_batches(self, rank: int, worker: int) -> int:
        return self.samples(rank, worker) // self.batch_size

    def batch_quotas(self, rank: int) -> list[int]:
        """How many batches each worker of ``rank`` yields; they add up to ``steps_per_epoch``.

        Dealt one at a time round-robin so that the workers share the load evenly, as far as
        their shards allow.
        """
        capacity = [self.full_batches(rank, worker) for worker in range(self.num_workers)]
        quotas = [0] * self.num_workers
        remaining = self.steps_per_epoch
        while remaining:
            for worker in range(self.num_workers):
                if remaining and quotas[worker] < capacity[worker]:
                    quotas[worker] += 1
                    remaining -= 1
        return quotas

    @property
    def samples_dropped(self) -> int:
        return sum(self.shard_sizes) - self.steps_per_epoch * self.batch_size * self.world_size


class ShardedImageStream:
    """Streams ``(transform(image), label)`` batches from webdataset shards, equal steps per rank.

    Args:
        source: a shard directory, its ``shards.json``, or a loaded ``ShardIndex``.
        batch_size: samples per batch on this rank (the per-device batch, not the global one).
        transform: called on each decoded PIL image. A tuple result (e.g. ``SimCLRViews``) is
            collated into a tuple of stacked views: batches are ``((view1, view2), labels)``;
            a tensor result gives ``(images, labels)``. Must be picklable when ``num_workers > 0``.
        rank, world_size: this process's place; both default to the initialised
            ``torch.distributed`` group, or 0 and 1 without one.
        num_workers: DataLoader worker processes on this rank; must be the same on every rank.
        seed: the shard order of epoch ``e`` is a shuffle by ``seed + e``; sample shuffling is
            seeded by (seed, epoch, rank, worker), so an epoch replays exactly.
        shuffle_shards: False keeps the index's shard order every epoch.
        shuffle_buffer: samples held per worker to shuffle within; 0 or 1 turns shuffling off.
        drop_last: must be True: partial batches would give ranks unequal steps.
        return_keys: also yield each batch's sample keys (``(images, labels, keys)``), for
            checking coverage and debugging.
        pin_memory, multiprocessing_context: passed to the DataLoader (the context defaults to
            the process's start method; every stage of the pipeline pickles, so "spawn" works).

    Call ``set_epoch(epoch)`` before iterating each epoch, as with ``DistributedSampler``.
    One ``iter(stream)`` yields exactly ``len(stream) == steps_per_epoch`` batches on every rank.
    """

    def __init__(
        self,
        source: str | os.PathLike | ShardIndex,
        batch_size: int,
        transform: Callable[[PIL.Image.Image], Any],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        return_keys: bool = False,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ):
        self.index = source if isinstance(source, ShardIndex) else ShardIndex.load(source)
        self.urls = self.index.urls()
        _check_count("batch_size", batch_size, minimum=1)
        _check_count("num_workers", num_workers, minimum=0)
        _check_count("shuffle_buffer", shuffle_buffer, minimum=0)
        _check_count("seed", seed, minimum=0)
        if not callable(transform):
            raise TypeError(f"transform must be callable on a PIL image, got {transform!r}")
        if drop_last is not True:
            raise ValueError(
                "drop_last must be True: a partial last batch on some ranks but not others would "
                "give ranks unequal step counts (design contract 5); the dropped samples are "
                "reported by samples_dropped_per_epoch and change every epoch"
            )
        self.rank, self.world_size = _resolve_place(rank, world_size)
        self.batch_size = batch_size
        self.transform = transform
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.return_keys = return_keys
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter(stream)`` plays; recomputes the plan for it."""
        _check_count("epoch", epoch, minimum=0)
        plan = EpochShardPlan(
            [shard.num_samples for shard in self.index.shards],
            epoch=epoch,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=max(1, self.num_workers),
            batch_size=self.batch_size,
            shuffle_shards=self.shuffle_shards,
        )
        if plan.steps_per_epoch == 0:
            raise ValueError(self._too_few_samples_message(plan))
        self.epoch, self.plan = epoch, plan

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch."""
        return self.plan.steps_per_epoch

    @property
    def samples_dropped_per_epoch(self) -> int:
        """Samples no rank sees in the current epoch:
        ``num_samples - steps_per_epoch * batch_size * world_size``."""
        return self.plan.samples_dropped

    @property
    def num_samples(self) -> int:
        """Samples in the whole shard set (all ranks)."""
        return self.index.num_samples

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def __iter__(self) -> Iterator[tuple]:
        loader = DataLoader(
            self._epoch_pipeline(),
            batch_size=None,  # workers batch, so each yields only full batches of its own shards
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
        )
        batches = iter(loader)
        try:
            for step in range(self.steps_per_epoch):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ShardIndexMismatchError(
                        f"rank {self.rank} got only {step} of its {self.steps_per_epoch} planned "
                        f"batches in epoch {self.epoch}; the shards in {self.index.directory} "
                        f"hold fewer samples than shards.json says"
                    ) from None
                yield batch
        finally:
            # Stop the workers now, also when the caller stops early or a worker failed. Left to
            # garbage collection, a worker's exception (which torch keeps in a reference cycle
            # with this iterator) delays the shutdown to a later gc pass that then stalls ~5 s.
            stop_workers = getattr(batches, "_shutdown_workers", None)
            if stop_workers is not None:
                stop_workers()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"the checkpoint's stream seed is {state.get('seed')!r} but this stream's is "
                f"{self.seed}; resuming with another seed would not replay the same data: "
                f"construct the stream with seed={state.get('seed')!r}"
            )
        self.set_epoch(state["epoch"])

    def _epoch_pipeline(self) -> wds.WebDataset:
        plan, rank = self.plan, self.rank
        expected_samples = {url: shard.num_samples for url, shard in zip(self.urls, self.index.shards)}
        return (
            wds.WebDataset(
                self.urls,
                nodesplitter=_RankShardSplitter(plan, rank),
                workersplitter=_WorkerShardSplitter(plan),
                shardshuffle=False,  # the shard order is the plan's, identical on every rank
                empty_check=False,  # a worker left without shards is planned for, not an error
            )
            .compose(_ShardLengthCheck(expected_samples, self.index.directory))
            .compose(
                _SeededSampleShuffle(self.shuffle_buffer, f"{self.seed}:{plan.epoch}:{rank}")
            )
            .map(_SampleDecoder(self.index.image_key, self.transform, self.return_keys))
            .batched(self.batch_size, collation_fn=collate_samples, partial=False)
            .compose(_PlannedBatchCount(plan, rank, self.urls))
        )

    def _too_few_samples_message(self, plan: EpochShardPlan) -> str:
        poorest = min(
            range(self.world_size),
            key=lambda r: sum(plan.full_batches(r, w) for w in range(plan.num_workers)),
        )
        return (
            f"not one full batch per rank: {self.index.num_samples} samples in "
            f"{self.index.num_shards} shards, batch_size={self.batch_size} per rank, "
            f"world_size={self.world_size}, num_workers={self.num_workers}; in epoch {plan.epoch} "
            f"rank {poorest} gets {len(plan.rank_shards(poorest))} shard(s) with "
            f"{plan.rank_samples(poorest)} samples and no worker of it has batch_size of them. "
            f"Lower batch_size or num_workers, or write more, smaller shards "
            f"(at least world_size x max(1, num_workers) of them)"
        )


def collate_samples(samples: list[tuple]) -> tuple:
    """``[(x, label[, key]), ...]`` -> ``(batched x, int64 labels[, keys])``; tuple-valued x (several
    views) is batched view by view and stays a tuple."""
    columns = list(zip(*samples))
    batch = [_stack(columns[0]), torch.tensor(columns[1], dtype=torch.int64)]
    if len(columns) == 3:
        batch.append(list(columns[2]))
    return tuple(batch)


def _stack(items: Sequence[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (tuple, list)):
        return tuple(_stack(views) for views in zip(*items))
    return default_collate(list(items))


def _current_worker(plan: EpochShardPlan) -> int:
    info = get_worker_info()
    if info is None:
        return 0
    if info.num_workers != plan.num_workers:
        raise RuntimeError(
            f"the stream was planned for {plan.num_workers} workers but runs in a DataLoader with "
            f"{info.num_workers}; iterate ShardedImageStream itself rather than wrapping it"
        )
    return info.id


class _RankShardSplitter:
    """webdataset ``nodesplitter``: the shards of this rank, in this epoch's planned order."""

    def __init__(self, plan: EpochShardPlan, rank: int):
        self.plan, self.rank = plan, rank

    def __call__(self, shard_list: Iterator[dict]) -> Iterator[dict]:
        in_index_order = list(shard_list)
        for position in self.plan.rank_shards(self.rank):
            yield in_index_order[position]


class _WorkerShardSplitter:
    """webdataset ``workersplitter``: every ``num_workers``-th shard of the rank's list."""

    def __init__(self, plan: EpochShardPlan):
        self.plan = plan

    def __call__(self, rank_shards: Iterator[dict]) -> Iterator[dict]:
        yield from islice(rank_shards, _current_worker(self.plan), None, self.plan.num_workers)


class _ShardLengthCheck:
    """Raises as soon as a shard read to its end held another count than the index lists."""

    def __init__(self, expected_samples: dict[str, int], index_dir):
        self.expected_samples, self.index_dir = expected_samples, index_dir

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        url, count = None, 0
        for sample in samples:
            if sample["__url__"] != url:
                self._check(url, count)
                url, count = sample["__url__"], 0
            count += 1
            yield sample
        self._check(url, count)

    def _check(self, url: str | None, count: int) -> None:
        if url is not None and count != self.expected_samples[url]:
            raise ShardIndexMismatchError(
                f"shard {url} holds {count} samples but {self.index_dir}/shards.json lists "
                f"{self.expected_samples[url]}; the shard is truncated or the index is stale: "
                f"re-write the shards"
            )


class _SeededSampleShuffle:
    """Shuffles samples in a buffer whose seed is fixed by (seed, epoch, rank, worker)."""

    def __init__(self, buffer_size: int, seed_prefix: str):
        self.buffer_size, self.seed_prefix = buffer_size, seed_prefix

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        if self.buffer_size <= 1:
            yield from samples
            return
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # A string seed hashes the same in every process (unlike hash() of a tuple).
        rng = random.Random(f"scale_ssl.sample_shuffle:{self.seed_prefix}:{worker}")
        # initial=buffer_size: fill the whole buffer first, so the first batch is shuffled too.
        shuffle = wds.filters.shuffle(self.buffer_size, initial=self.buffer_size, rng=rng)
        yield from shuffle(samples)


class _SampleDecoder:
    """Raw sample dict -> ``(transform(PIL image), label[, key])``."""

    def __init__(self, image_key: str, transform: Callable, return_keys: bool):
        self.image_key, self.transform, self.return_keys = image_key, transform, return_keys

    def __call__(self, sample: dict) -> tuple:
        try:
            encoded, label = sample[self.image_key], int(sample["cls"])
        except (KeyError, ValueError):
            raise ValueError(
                f"sample {sample['__key__']} in {sample['__url__']} needs a {self.image_key!r} "
                f"image and an integer 'cls' label, it has members {sorted(sample)}"
            ) from None
        image = PIL.Image.open(io.BytesIO(encoded))
        image.load()
        output = self.transform(image)
        return (output, label, sample["__key__"]) if self.return_keys else (output, label)


class _PlannedBatchCount:
    """Lets a worker yield exactly its planned share of the rank's batches, then stop."""

    def __init__(self, plan: EpochShardPlan, rank: int, urls: Sequence[str]):
        self.plan, self.rank, self.urls = plan, rank, list(urls)

    def __call__(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        worker = _current_worker(self.plan)
        quota = self.plan.batch_quotas(self.rank)[worker]
        made = 0
        for batch in islice(batches, quota):
            made += 1
            yield batch
        if made < quota:
            shards = [self.urls[i] for i in self.plan.worker_shards(self.rank, worker)]
            raise ShardIndexMismatchError(
                f"rank {self.rank} worker {worker} made {made} of its {quota} planned batches "
                f"from shards {shards}: they hold fewer usable samples than the index lists; "
                f"re-write the shards"
            )


def _resolve_place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(
            f"pass both rank and world_size or neither (to use torch.distributed), got "
            f"rank={rank!r} world_size={world_size!r}"
        )
    _check_count("world_size", world_size, minimum=1)
    _check_count("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be in 0..world_size-1 = 0..{world_size - 1}, got {rank}")
    return rank, world_size


def _check_count(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
