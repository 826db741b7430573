"""``ShardedImageStream``: webdataset tar shards streamed so that every rank takes the same steps.

Contract 5 of the design: a rank that runs out of samples while another still trains leaves the
other waiting forever in its next collective. Counting on the shards to split evenly does not
work: shards differ in size, there may be more readers (ranks × DataLoader workers) than shards,
and each reader drops its own last partial batch. So the stream plans each epoch from the shard
index alone, identically on every rank and with no communication. Two modes:

**exact** (``EpochShardPlan``): every sample at most once per epoch, and fewer than
``world_size x batch_size`` samples left out, however uneven the shards are.

1. The epoch's shard order is ``random.Random(seed + epoch).shuffle`` of the index order (the
   same on every rank). Laid end to end in that order, the shards' samples form the epoch's
   sequence of ``N`` samples.
2. ``steps_per_epoch = N // (world_size * batch_size)``. Each rank's steps are dealt over its
   readers (DataLoader workers) as evenly as possible, ``q_w`` batches for worker ``w``, and
   reader (rank r, worker w) owns the next ``q_w * batch_size`` samples of the sequence (readers
   in rank-major order). A reader's share is therefore a run of whole shards plus, at either
   end, part of a shard: shards are split at *sample* granularity, using the index's counts.
3. A reader opens each shard of its share at its first owned sample and stops after its last:
   when the index records sample offsets (``scale-ssl index-shards`` writes them) it seeks there
   (a range request for remote shards) and stops at the next reader's offset; otherwise it
   reads from the start and passes over the samples it does not own without decoding them.

   ``samples_dropped_per_epoch = N - steps_per_epoch * batch_size * world_size`` (< world_size
   x batch_size) samples, the end of the epoch's sequence, are not read that epoch (which ones
   changes with the shuffle). Every rank yields exactly ``steps_per_epoch`` batches, whatever
   the number of shards or workers; only ``N < world_size * batch_size`` is an error.

**resampled** (``ResampledShardPlan``): each reader draws shards with replacement (probability
proportional to their sample counts) from its own seeded generator, forever, like webdataset's
``ResampledShards``; a nominal epoch is cut at ``num_samples // (batch_size * world_size)`` steps on
every rank (webdataset's ``with_epoch``). Samples can repeat within an epoch; ranks never run dry.

**Order, augmentation and resume.** Within a reader, samples pass a shuffle buffer seeded by
(seed, epoch, rank, worker). Because that shuffle only depends on sample *counts*, the reader
computes its whole epoch order as positions ``(draw, member index)`` from the index (a draw is
one part of a shard the reader reads: its share of a shard in exact mode), before
reading a byte; batch ``j`` of a reader is positions ``[j*B, (j+1)*B)`` of that order. Each
sample's augmentation runs under the global torch / ``random`` RNGs seeded from (seed, epoch,
rank, worker, position) (saved and restored around the call, so the main process's RNG is left
as it was with ``num_workers=0``). A batch is therefore a pure function of (seed, epoch, rank,
worker, j) and the bytes on disk. ``skip_batches(n)`` (mid-epoch resume) works out which of the
rank's batches the first ``n`` were (the DataLoader takes them round-robin over the workers) and
each reader starts after its own: positions already consumed are not decoded, shards whose every
sample was consumed are not even opened, and a part that was half consumed is read from its
start and its consumed samples thrown away undecoded (``resume_samples_reread``). Resume is
therefore exact to the sample: the remaining batches are bitwise those of an uninterrupted run
and no sample is seen twice, provided world size, workers, batch size, mode and shuffle buffer
are unchanged (otherwise the rest of the epoch is played under the new plan; see
``skip_batches``).

**Labels and keys.** Labels are optional: ``label_key`` (default: what the index says) reads them
from a ``cls`` member or a ``json`` field; an unlabelled set streams with label ``-1`` for
pretraining. Image members are looked up by ``image_keys`` (jpg, jpeg, png, webp, ...). See
``sample_fields``.

**Corrupt data.** A sample that fails to decode (or lacks its image or requested label), or that
is missing because its shard is truncated, damaged (the tar reader skips a damaged stretch and
resynchronises on the next valid header) or shorter than the index says, leaves its slot in the
batch empty; the slot is filled with a copy of another sample of the same batch (augmented with
the slot's own seed), or of the reader's previous batch when none of this batch is usable, so
batch shapes, step counts and resume positions do not depend on decoding. Every such sample is
counted (``epoch_stats()``: ``samples_lost`` is the one figure, ``corrupt_skipped`` +
``samples_missing``); once a rank's count in an epoch exceeds ``max_corrupt_fraction`` of the
samples it reads that epoch, it raises ``DataCorruptionError`` naming the shards and the setting
(raised in the training process with that one message also when a DataLoader worker found it).
Two consecutive batches of a reader with no usable sample are an error whatever the fraction. A
shard holding *more* samples than the index lists, or more bytes than an index with sample
offsets records, raises ``ShardIndexMismatchError`` (the index is stale).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import logging
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any, NamedTuple

import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from scale_ssl.collectives import default_collective
from scale_ssl.data.sample_fields import AUTO, MissingLabelsError, SampleFields, check_label_key
from scale_ssl.data.shard_index import ShardIndex
from scale_ssl.data.shard_source import (
    ShardIndexMismatchError,
    ShardSourceError,
    ShardTruncatedError,
    iter_shard_samples,
    load_index,
    resolve_location,
)
from scale_ssl.data.tar_members import TarDamage

log = logging.getLogger(__name__)

MODES = ("exact", "resampled")
# How many unusable samples a DataCorruptionError lists by name.
_EXAMPLES_IN_ERRORS = 5


class DataCorruptionError(RuntimeError):
    """More samples than ``max_corrupt_fraction`` allows could not be decoded or read."""


# Errors a DataLoader worker hands to the training process as (name, message), re-raised there
# with the message alone (torch would wrap them with the worker's whole traceback).
_FORWARDED_ERRORS = {cls.__name__: cls for cls in (DataCorruptionError, ShardIndexMismatchError, ShardSourceError)}


class Segment(NamedTuple):
    """Samples ``[start, stop)`` (by position in the shard) of the shard at index ``shard``."""

    shard: int
    start: int
    stop: int


class EpochShardPlan:
    """Exact mode: which samples of which shards every reader (rank, worker) reads in one epoch,
    and how many batches each yields (see the module docstring).

    Pure arithmetic on the index's shard sizes: every rank builds the same plan for every rank.
    ``num_workers`` counts readers per rank, so a DataLoader with ``num_workers=0`` (reading in
    the main process) is one reader.
    """

    mode = "exact"

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
        self.num_samples = sum(self.shard_sizes)
        self.steps_per_epoch = self.num_samples // (world_size * batch_size)
        # Where each shard of the epoch's order starts in the epoch's sample sequence.
        self._shard_starts = list(itertools.accumulate((self.shard_sizes[s] for s in self.shard_order), initial=0))
        quotas = self.batch_quotas(0)
        self._span_starts = list(itertools.accumulate(
            (quotas[worker] * batch_size for _ in range(world_size) for worker in range(num_workers)), initial=0
        ))

    def batch_quotas(self, rank: int) -> list[int]:
        """How many batches each worker of ``rank`` yields; they add up to ``steps_per_epoch``
        (the same on every rank: ``steps_per_epoch`` dealt as evenly as possible)."""
        share, extra = divmod(self.steps_per_epoch, self.num_workers)
        return [share + (worker < extra) for worker in range(self.num_workers)]

    def reader_span(self, rank: int, worker: int) -> tuple[int, int]:
        """``[start, stop)`` of reader (rank, worker) in the epoch's sample sequence."""
        reader = rank * self.num_workers + worker
        return self._span_starts[reader], self._span_starts[reader + 1]

    def reader_segments(self, rank: int, worker: int) -> list[Segment]:
        """The parts of shards reader (rank, worker) reads, in reading order."""
        start, stop = self.reader_span(rank, worker)
        segments = []
        first = bisect.bisect_right(self._shard_starts, start) - 1
        for position in range(max(first, 0), len(self.shard_order)):
            shard_start = self._shard_starts[position]
            if shard_start >= stop:
                break
            shard = self.shard_order[position]
            begin, end = max(start, shard_start) - shard_start, min(stop, self._shard_starts[position + 1]) - shard_start
            if end > begin:
                segments.append(Segment(shard, begin, end))
        return segments

    def rank_samples(self, rank: int) -> int:
        return self.steps_per_epoch * self.batch_size

    @property
    def samples_dropped(self) -> int:
        return self.num_samples - self.steps_per_epoch * self.batch_size * self.world_size


class ResampledShardPlan:
    """Resampled mode: every reader draws shards with replacement, forever, from a generator
    seeded by (seed, epoch, rank, worker); an epoch is ``num_samples // (batch_size * world_size)``
    steps on every rank, dealt evenly over the workers.

    A shard is drawn with probability proportional to its sample count, so every sample is
    equally likely however uneven the shards are.
    """

    mode = "resampled"

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        epoch: int,
        seed: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
    ):
        self.shard_sizes = list(shard_sizes)
        self.epoch, self.seed = epoch, seed
        self.world_size, self.num_workers, self.batch_size = world_size, num_workers, batch_size
        self.steps_per_epoch = sum(self.shard_sizes) // (batch_size * world_size)
        self._cumulative = list(itertools.accumulate(self.shard_sizes))

    def reader_segments(self, rank: int, worker: int) -> Iterator[Segment]:
        """Whole shards drawn with replacement, forever."""
        rng = random.Random(f"scale_ssl.resample:{self.seed}:{self.epoch}:{rank}:{worker}")
        total = self._cumulative[-1]
        while True:
            shard = bisect.bisect_right(self._cumulative, rng.randrange(total))
            yield Segment(shard, 0, self.shard_sizes[shard])

    def batch_quotas(self, rank: int) -> list[int]:
        share, extra = divmod(self.steps_per_epoch, self.num_workers)
        return [share + (worker < extra) for worker in range(self.num_workers)]

    @property
    def samples_dropped(self) -> int:
        """Samples a nominal epoch is short of one pass (not which samples: draws repeat some)."""
        return sum(self.shard_sizes) - self.steps_per_epoch * self.batch_size * self.world_size


def batch_order(quotas: Sequence[int]) -> list[tuple[int, int]]:
    """The order in which a rank yields its workers' batches: ``(worker, j)`` round-robin over
    the workers that still have batches (the order a DataLoader takes them in)."""
    order, made = [], [0] * len(quotas)
    while len(order) < sum(quotas):
        for worker, quota in enumerate(quotas):
            if made[worker] < quota:
                order.append((worker, made[worker]))
                made[worker] += 1
    return order


class ShardedImageStream:
    """Streams ``(transform(image), label)`` batches from webdataset shards, equal steps per rank.

    Args:
        source: a shard location (see ``shard_source``): a directory or its index file, a brace
            list or glob of shards, ``http(s)://``, ``s3://``, ``gs://`` or ``pipe:...{name}...``;
            or a loaded ``ShardIndex``. A small set without an index is indexed on the fly
            (one notice); a large one needs ``scale-ssl index-shards`` first.
        batch_size: samples per batch on this rank (the per-device batch, not the global one).
        transform: called on each decoded PIL image. A tuple result (e.g. ``SimCLRViews``) is
            collated into a tuple of stacked views: batches are ``((view1, view2), labels)``;
            a tensor result gives ``(images, labels)``. Must be picklable when ``num_workers > 0``.
            Its randomness must come from torch's or Python's global RNG (torchvision's does),
            which the stream seeds per sample. A transform with a ``decode(bytes)`` method gets
            what that returns instead of a PIL image (decode errors count as corrupt samples).
        mode: ``"exact"`` (each sample at most once per epoch) or ``"resampled"``; see the
            module docstring.
        rank, world_size: this process's place, given by the caller; both default to the place
            ``scale_ssl.collectives.default_collective()`` reports (the initialised process
            group, or 0 and 1 without one), re-read until the group exists.
        num_workers: DataLoader worker processes on this rank; must be the same on every rank.
        seed: the shard order of epoch ``e`` is a shuffle by ``seed + e``; sample order and
            augmentations are seeded by (seed, epoch, rank, worker, position).
        shuffle_shards: False keeps the index's shard order every epoch (exact mode).
        shuffle_buffer: samples held per worker to shuffle within; 0 or 1 turns shuffling off.
        drop_last: must be True: partial batches would give ranks unequal steps.
        max_corrupt_fraction: the share of a rank's samples in an epoch that may be unusable
            (undecodable, or missing from a truncated shard) before ``DataCorruptionError``.
        retries, retry_delay, io_timeout: for remote shards: attempts after the first, the first
            back-off in seconds (doubling), and the seconds a read may stall.
        return_keys: also yield each batch's sample keys (``(images, labels, keys)``), for
            checking coverage and debugging.
        image_keys: member extensions holding the image, tried in order (default: the index's
            ``image_key``, then jpg, jpeg, png, webp, ...).
        label_key: ``"auto"`` (the index's: ``cls``, ``json:<field>`` or none), ``"cls"``,
            ``"json:<field>"``, or None to ignore labels (every label is -1: pretraining).
        pin_memory, multiprocessing_context: passed to the DataLoader (the context defaults to
            the process's start method; every stage of the pipeline pickles, so "spawn" works).

    Call ``set_epoch(epoch)`` before iterating each epoch, as with ``DistributedSampler``.
    One ``iter(stream)`` yields exactly ``len(stream) == steps_per_epoch`` batches on every rank,
    or ``len(stream) - n`` after ``skip_batches(n)``. ``epoch_stats()`` returns this rank's counts
    for the epoch (dropped, corrupt, missing, padded, resume figures) for the logs.
    """

    def __init__(
        self,
        source: str | os.PathLike | ShardIndex,
        batch_size: int,
        transform: Callable[[PIL.Image.Image], Any],
        *,
        mode: str = "exact",
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        max_corrupt_fraction: float = 0.001,
        retries: int = 3,
        retry_delay: float = 1.0,
        io_timeout: float = 60.0,
        return_keys: bool = False,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        image_keys: Sequence[str] | None = None,
        label_key: str | None = AUTO,
    ):
        _check_count("batch_size", batch_size, minimum=1)
        _check_count("num_workers", num_workers, minimum=0)
        _check_count("shuffle_buffer", shuffle_buffer, minimum=0)
        _check_count("seed", seed, minimum=0)
        _check_count("retries", retries, minimum=0)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(max_corrupt_fraction, bool) or not (
            isinstance(max_corrupt_fraction, (int, float)) and 0 <= max_corrupt_fraction <= 1
        ):
            raise ValueError(
                f"max_corrupt_fraction must be a number in [0, 1] (0.001 = 0.1%), got {max_corrupt_fraction!r}"
            )
        for name, value in (("retry_delay", retry_delay), ("io_timeout", io_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not callable(transform):
            raise TypeError(f"transform must be callable on a PIL image, got {transform!r}")
        if drop_last is not True:
            raise ValueError(
                "drop_last must be True: a partial last batch on some ranks but not others would "
                "give ranks unequal step counts (design contract 5); the dropped samples are "
                "reported by samples_dropped_per_epoch and change every epoch"
            )
        label_key = check_label_key(label_key)
        # Without an explicit place the stream follows torch.distributed, also when it is built
        # before init_process_group (then it re-plans once the group exists; see _follow_group).
        self._follows_group = rank is None and world_size is None
        self.rank, self.world_size = _resolve_place(rank, world_size)
        if isinstance(source, ShardIndex):
            self.index, self.urls = source, source.urls()
            self.location = str(source.base or source.directory)
        else:
            location = resolve_location(source)
            self.index, self.urls = load_index(
                location, retries=retries, retry_delay=retry_delay, timeout=io_timeout,
                notice=None if self.rank == 0 else log.info,
            )
            self.location = location.describe()
        if label_key not in (None, AUTO) and not self.index.labelled:
            raise MissingLabelsError(
                f"label_key={label_key!r} but the index of {self.location} found no labels in its shards "
                f"(label_key: null); re-index with `scale-ssl index-shards ... --label-key {label_key}` if "
                f"they are there, or stream without labels (label_key=None)"
            )
        self.fields = SampleFields.for_index(self.index, image_keys, label_key)
        self.mode = mode
        self.batch_size = batch_size
        self.transform = transform
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.max_corrupt_fraction = float(max_corrupt_fraction)
        self.io_options = {"retries": retries, "retry_delay": float(retry_delay), "timeout": float(io_timeout)}
        self.return_keys = return_keys
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self._loaded_state: dict | None = None
        self.set_epoch(0)

    # -- epoch plan --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter(stream)`` plays from its start; recomputes the plan."""
        _check_count("epoch", epoch, minimum=0)
        self._follow_group()
        sizes = [shard.num_samples for shard in self.index.shards]
        common = dict(
            epoch=epoch,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=max(1, self.num_workers),
            batch_size=self.batch_size,
        )
        if self.mode == "exact":
            plan = EpochShardPlan(sizes, shuffle_shards=self.shuffle_shards, **common)
        else:
            plan = ResampledShardPlan(sizes, **common)
        if plan.steps_per_epoch == 0:
            raise ValueError(_too_few_samples_message(plan, self.index, self.batch_size, self.world_size))
        self.epoch, self.plan = epoch, plan
        self._skip = 0
        self._resume_exact = True
        self._stats = _fresh_stats(self.epoch, self.plan, resumed_at=0)

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch."""
        self._replan_if_group_changed()
        return self.plan.steps_per_epoch

    @property
    def samples_dropped_per_epoch(self) -> int:
        """Samples no rank sees in the current epoch (exact mode; a nominal count when resampled):
        ``num_samples - steps_per_epoch * batch_size * world_size``."""
        return self.plan.samples_dropped

    @property
    def num_samples(self) -> int:
        """Samples in the whole shard set (all ranks)."""
        return self.index.num_samples

    def __len__(self) -> int:
        self._replan_if_group_changed()
        return self.plan.steps_per_epoch

    def _follow_group(self) -> bool:
        """Take rank and world size from torch.distributed if no place was given; True if moved.

        A stream built before ``init_process_group`` saw no group and planned for one process;
        left alone, every rank would then read the whole data set (every sample N times per
        "epoch") without any error. Re-reading the group here prevents that silent duplication.
        """
        if not self._follows_group:
            return False
        place = _resolve_place(None, None)
        if place == (self.rank, self.world_size):
            return False
        self.rank, self.world_size = place
        return True

    def _replan_if_group_changed(self) -> None:
        if self._follow_group():
            skip = self._skip
            self.set_epoch(self.epoch)
            if skip:
                self.skip_batches(skip)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the epoch plan depends on; the trainer stores the batch position beside it."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "mode": self.mode,
            "world_size": self.world_size,
            "num_workers": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            "num_samples": self.num_samples,
            # How exact mode splits the epoch: by sample (this version) or by whole shard (before).
            "split": "samples",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"the checkpoint's stream seed is {state.get('seed')!r} but this stream's is "
                f"{self.seed}; resuming with another seed would not replay the same data: "
                f"construct the stream with seed={state.get('seed')!r}"
            )
        self.set_epoch(state["epoch"])
        self._loaded_state = dict(state)

    def skip_batches(self, n: int) -> None:
        """Make the next ``iter(stream)`` start after the first ``n`` batches of this epoch.

        Call after ``set_epoch`` (the trainer does, with the batches it had consumed when it
        checkpointed). The iteration then yields ``len(stream) - n`` batches: exactly the ones an
        uninterrupted epoch would have yielded after its ``n``-th (see the module docstring).

        If the checkpoint's plan differs from this stream's (another world size, worker count,
        batch size, mode, shuffle buffer or data set size), the consumed batches cannot be mapped
        onto the new plan: the epoch continues with the new plan's batches ``n..`` (equal steps
        still hold), a warning says so, and up to ``n * batch_size`` samples of this rank may be
        seen twice this epoch (``epoch_stats()["samples_reseen_after_resume"]`` is that bound).
        """
        _check_count("n", n, minimum=0)
        if n > self.steps_per_epoch:
            raise ValueError(
                f"skip_batches({n}) is more than the {self.steps_per_epoch} batches of epoch "
                f"{self.epoch} on this rank: the checkpoint belongs to another data set or plan"
            )
        changed = self._plan_changes()
        self._skip = n
        self._resume_exact = not changed
        self._stats = _fresh_stats(self.epoch, self.plan, resumed_at=n)
        if changed and n:
            self._stats["samples_reseen_after_resume"] = n * self.batch_size
            warnings.warn(
                f"resuming epoch {self.epoch} at batch {n} with a different data plan "
                f"({', '.join(changed)}): the rest of the epoch follows the new plan, so up to "
                f"{n * self.batch_size} samples of rank {self.rank} may be seen twice this epoch",
                stacklevel=2,
            )

    def _plan_changes(self) -> list[str]:
        if self._loaded_state is None or self._loaded_state.get("epoch") != self.epoch:
            return []
        current = self.state_dict()
        changes = [
            f"{key} {self._loaded_state[key]!r} -> {current[key]!r}"
            for key in ("mode", "world_size", "num_workers", "batch_size", "shuffle_buffer",
                        "shuffle_shards", "num_samples")
            if key in self._loaded_state and self._loaded_state[key] != current[key]
        ]
        # A checkpoint from before the sample-granular split planned its epoch by whole shards.
        split = self._loaded_state.get("split", "shards")
        if self.mode == "exact" and self._loaded_state.get("mode") == "exact" and split != current["split"]:
            changes.append(f"exact-mode split {split!r} -> {current['split']!r}")
        return changes

    # -- statistics -------------------------------------------------------------------------------
    def epoch_stats(self) -> dict[str, Any]:
        """This rank's figures for the current epoch, for the progress bar and the run's metrics.

        ``samples_dropped`` (all ranks, by the plan), ``samples_lost`` (this rank's samples that
        could not be used: ``corrupt_skipped`` + ``samples_missing``), ``corrupt_skipped`` (samples
        that failed to decode or lack their image or label), ``samples_missing`` (listed by the
        index but absent: truncated, damaged or short shards),
        ``samples_padded`` (batch slots filled with a copy because of the two before),
        ``resumed_at_batch``, ``resume_samples_reread`` (consumed samples read again, undecoded,
        to reach the resume point), ``samples_reseen_after_resume`` (0 when the resume was exact,
        else a bound), ``resume_exact``. Counts cover the batches yielded so far.
        """
        stats = {key: value for key, value in self._stats.items() if key not in ("bad_by_shard", "examples")}
        stats["resume_exact"] = self._resume_exact
        return stats

    @property
    def corrupt_budget(self) -> int:
        """Unusable samples this rank tolerates in one epoch (``max_corrupt_fraction`` of its share)."""
        return int(self.max_corrupt_fraction * self.steps_per_epoch * self.batch_size)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple]:
        self._replan_if_group_changed()
        skip, self._skip = self._skip, 0
        order = batch_order(self.plan.batch_quotas(self.rank))
        start_batches = [0] * self.plan.num_workers
        for worker, _ in order[:skip]:
            start_batches[worker] += 1
        remaining = order[skip:]
        if not remaining:
            return
        reader = _EpochReader(
            plan=self.plan,
            rank=self.rank,
            urls=self.urls,
            fields=self.fields,
            bounds=self._segment_bounds(),
            transform=self.transform,
            shuffle_buffer=self.shuffle_buffer,
            return_keys=self.return_keys,
            start_batches=start_batches,
            # The DataLoader serves its workers round-robin from worker 0: rotating which worker
            # plays which reader makes its natural order the plan's order after the skip.
            rotation=remaining[0][0],
            corrupt_policy=(self.max_corrupt_fraction, self.steps_per_epoch * self.batch_size, self.corrupt_budget),
            io_options=self.io_options,
        )
        loader = DataLoader(
            reader,
            batch_size=None,  # readers batch, so each yields only full batches of its own shards
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
            # Its own generator: the DataLoader draws its workers' base seed from it, and drawing
            # from the global RNG would make a resumed run's RNG diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch),
        )
        batches = iter(loader)
        pending: dict[tuple[int, int], tuple] = {}
        reader_stats: dict[int, dict] = {}
        try:
            for expected in remaining:
                # The plan's order is guaranteed here, whatever order the DataLoader delivers in.
                while expected not in pending:
                    try:
                        batch, meta = next(batches)
                    except StopIteration:
                        raise ShardIndexMismatchError(
                            f"rank {self.rank} is missing batch {expected[1]} of worker "
                            f"{expected[0]} in epoch {self.epoch}; the shards of {self.location} "
                            f"hold fewer samples than shards.json says"
                        ) from None
                    if "error" in meta:  # a worker's data error, re-raised here with its message only
                        name, message = meta["error"]
                        raise _FORWARDED_ERRORS[name](message)
                    pending[(meta["worker"], meta["batch"])] = batch
                    self._account(meta, reader_stats)
                yield pending.pop(expected)
        finally:
            # Stop the workers now, also when the caller stops early or a worker failed. Left to
            # garbage collection, a worker's exception (which torch keeps in a reference cycle
            # with this iterator) delays the shutdown to a later gc pass that then stalls ~5 s.
            stop_workers = getattr(batches, "_shutdown_workers", None)
            if stop_workers is not None:
                stop_workers()

    def _segment_bounds(self) -> dict[Segment, dict] | None:
        """Byte bounds of this rank's exact-mode segments whose shard has sample offsets in the
        index: where a reader opens the shard and where it stops (the next owner's first sample),
        with the shard's size to detect a stale index. Only this rank's (a few per worker), so
        that the offsets of a large index are not copied to every DataLoader worker."""
        if not isinstance(self.plan, EpochShardPlan):
            return None
        bounds = {}
        for worker in range(self.plan.num_workers):
            for segment in self.plan.reader_segments(self.rank, worker):
                info = self.index.shards[segment.shard]
                if info.offsets is None:
                    continue
                bounds[segment] = {
                    "start_offset": info.offsets[segment.start],
                    "stop_offset": info.offsets[segment.stop] if segment.stop < info.num_samples else None,
                    "expected_bytes": info.bytes,
                }
        return bounds

    def _account(self, meta: dict, reader_stats: dict[int, dict]) -> None:
        reader_stats[meta["worker"]] = meta["stats"]
        for key in ("corrupt_skipped", "samples_missing", "samples_padded", "resume_samples_reread"):
            self._stats[key] = sum(stats[key] for stats in reader_stats.values())
        self._stats["samples_lost"] = self._stats["corrupt_skipped"] + self._stats["samples_missing"]
        for url, key, reason in meta["bad"]:
            self._stats["bad_by_shard"][url] += 1
            # One warning per shard and epoch; each further sample only at debug level (a damaged
            # stretch can cost hundreds, and the count is in epoch_stats()["samples_lost"]).
            level = logging.WARNING if self._stats["bad_by_shard"][url] == 1 else logging.DEBUG
            log.log(level, "rank %d epoch %d: skipped sample %s of %s: %s", self.rank, self.epoch, key, url, reason)
        self._stats["examples"] = (self._stats["examples"] + meta["bad"])[:_EXAMPLES_IN_ERRORS]
        bad = self._stats["corrupt_skipped"] + self._stats["samples_missing"]
        if bad > self.corrupt_budget:
            raise DataCorruptionError(
                _corruption_message(
                    f"rank {self.rank}", self.epoch, bad, self._stats["corrupt_skipped"], self._stats["samples_missing"],
                    self.max_corrupt_fraction, self.steps_per_epoch * self.batch_size, self.corrupt_budget,
                    self._stats["bad_by_shard"], self._stats["examples"],
                )
            )


def _too_few_samples_message(plan, index, batch_size: int, world_size: int) -> str:
    if isinstance(plan, ResampledShardPlan):
        return (
            f"not one full batch per rank: {index.num_samples} samples with "
            f"batch_size={batch_size} per rank and world_size={world_size} make "
            f"{plan.steps_per_epoch} steps per epoch; lower batch_size"
        )
    return (
        f"not one full batch per rank: {index.num_samples} samples in "
        f"{index.num_shards} shards, batch_size={batch_size} per rank and "
        f"world_size={world_size} need at least {batch_size * world_size} per epoch. "
        f"Lower batch_size (trainer.global_batch_size) or add data"
    )


def _fresh_stats(epoch: int, plan, resumed_at: int) -> dict[str, Any]:
    """The counters ``epoch_stats`` reports, at the start of an epoch (or of a resumed one)."""
    return {
        "epoch": epoch,
        "steps_per_epoch": plan.steps_per_epoch,
        "samples_dropped": plan.samples_dropped,
        "samples_lost": 0,
        "corrupt_skipped": 0,
        "samples_missing": 0,
        "samples_padded": 0,
        "resumed_at_batch": resumed_at,
        "resume_samples_reread": 0,
        "samples_reseen_after_resume": 0,
        "bad_by_shard": Counter(),
        "examples": [],
    }


def _corruption_message(who, epoch, bad, corrupt, missing, fraction, samples, budget, by_shard, examples) -> str:
    shards = ", ".join(f"{url} ({count})" for url, count in by_shard.most_common(10))
    first = "; ".join(f"{key} in {url}: {reason}" for url, key, reason in examples)
    return (
        f"{who}, epoch {epoch}: {bad} samples were unusable ({corrupt} failed to decode, "
        f"{missing} missing from truncated or short shards), more than max_corrupt_fraction="
        f"{fraction:g} of the rank's {samples} samples this epoch allows ({budget}). Shards: "
        f"{shards}. First problems: {first}. Repair or re-write these shards, or raise "
        f"data.max_corrupt_fraction if the loss is acceptable"
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


def _current_worker(num_workers: int) -> int:
    info = get_worker_info()
    if info is None:
        return 0
    if info.num_workers != num_workers:
        raise RuntimeError(
            f"the stream was planned for {num_workers} workers but runs in a DataLoader with "
            f"{info.num_workers}; iterate ShardedImageStream itself rather than wrapping it"
        )
    return info.id


def _stable_seed(*parts: Any) -> int:
    # A string hashed the same in every process (unlike hash() of a tuple), folded to 63 bits.
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def _seeded_global_rng(seed: int):
    """Run a transform under torch's and Python's global RNGs seeded with ``seed``, then put both
    back: the caller's RNG (the training process's, when ``num_workers=0``) is left untouched.
    Only the CPU generator is touched (torchvision's transforms draw from it)."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class _Unusable:
    """A batch slot whose sample could not be used, and why."""

    def __init__(self, url: str, key: str, reason: str, missing: bool):
        self.url, self.key, self.reason, self.missing = url, key, reason, missing


class _ShardCursor:
    """Reads one reader's segments (parts of shards) in their planned order, on demand, and hands
    out samples by position ``(draw, member)``.

    Samples read before they are asked for wait in ``stash`` (at most about the shuffle buffer);
    positions in ``consumed`` (before a resume point) are dropped unread where a whole segment
    allows, else read and thrown away undecoded. A segment is read by byte bounds when
    ``bounds`` has it (the index recorded sample offsets), else by counting samples from the
    shard's start; both count the samples that survive a damaged stretch in the same order, so
    two readers splitting a damaged shard never both take a sample.
    """

    def __init__(self, segments: Iterable[Segment], sizes, urls, consumed: set, io_options: dict,
                 keep: set = frozenset(), bounds: dict | None = None):
        self.segments = enumerate(segments)
        self.sizes, self.urls, self.consumed, self.io_options = sizes, urls, consumed, io_options
        self.bounds = bounds or {}
        self.keep = keep  # consumed, but stashed all the same (they may be asked for)
        self.consumed_per_draw = Counter(draw for draw, member in consumed if (draw, member) not in keep)
        self.stash: dict[tuple[int, int], tuple[str, dict, str]] = {}
        self.ended: dict[int, str] = {}  # draw -> why it ended before its last sample
        self.segment_of: dict[int, Segment] = {}
        self.damage: dict[int, dict[int, TarDamage]] = {}  # draw -> damaged stretches by offset
        self.draw, self.segment, self.samples, self.member = -1, None, None, 0
        self.reread = 0

    def get(self, token: tuple[int, int]) -> tuple[str, dict, str] | _Unusable:
        draw, member = token
        while token not in self.stash and draw >= self.draw:
            if draw in self.ended:
                break
            if self.samples is None or self.draw < draw:
                self._finish_current()
                self._open_next()
                continue
            self._read_one()
        if token in self.stash:
            return self.stash.pop(token)
        why = self.ended.get(draw, "never read")
        segment = self.segment_of.get(draw)
        url = self.urls[segment.shard] if segment is not None else "?"
        return _Unusable(url, f"sample #{member}", f"missing: {why}", missing=True)

    def _open_next(self) -> None:
        while True:
            self.draw, self.segment = next(self.segments)
            self.segment_of[self.draw] = self.segment
            if self.consumed_per_draw[self.draw] < self.segment.stop - self.segment.start:
                break  # a segment every sample of which was consumed is not opened at all
        shard, start, stop = self.segment
        bound = self.bounds.get(self.segment)
        if bound is not None:
            reading = dict(bound)
        else:
            # Count from the shard's start; the last part reads to the end, so that a shard holding
            # more samples than its index lists is noticed.
            reading = {"skip": start, "limit": stop - start if stop < self.sizes[shard] else None}
        draw = self.draw
        self.samples = iter_shard_samples(
            self.urls[shard], on_damage=lambda damage: self.damage.setdefault(draw, {}).setdefault(damage.offset, damage),
            **reading, **self.io_options,
        )
        self.member = start

    def _read_one(self) -> None:
        (shard, start, stop), url = self.segment, self.urls[self.segment.shard]
        size = self.sizes[shard]
        try:
            key, members = next(self.samples)
        except StopIteration:
            if stop == size or self.segment not in self.bounds:  # counted from the shard's start
                why = f"the shard ended after {self.member} of the {size} samples its index lists"
            else:
                why = f"only {self.member - start} of samples [{start}, {stop}) of the shard could be read"
            self._end(why + (" (a truncated or damaged tar, or a stale index)" if not self.damage.get(self.draw) else ""))
            return
        except ShardTruncatedError as error:
            self._end(f"{error.reason}; the index lists {size}")
            return
        if self.member >= stop:
            raise ShardIndexMismatchError(
                f"shard {url} holds more than the {size} samples its index lists; the index is stale: "
                f"re-run `scale-ssl index-shards` on its location"
            )
        token = (self.draw, self.member)
        self.member += 1
        if token in self.consumed:
            self.reread += 1
        if token not in self.consumed or token in self.keep:
            self.stash[token] = (key, members, url)

    def _end(self, why: str) -> None:
        damage = self.damage.get(self.draw)
        if damage:
            why += "; " + "; ".join(stretch.describe() for stretch in list(damage.values())[:3])
        self.ended[self.draw] = why
        self.samples = None

    def _finish_current(self) -> None:
        """Read the rest of the current segment into the stash (its samples will be asked for)."""
        while self.samples is not None:
            self._read_one()


class _EpochReader(IterableDataset):
    """One epoch of one rank, as seen by one DataLoader worker (or the main process): yields
    ``(batch, meta)`` for the worker's share of the rank's batches."""

    def __init__(self, *, plan, rank, urls, fields, bounds, transform, shuffle_buffer, return_keys,
                 start_batches, rotation, corrupt_policy, io_options):
        self.plan, self.rank, self.urls, self.fields, self.bounds = plan, rank, list(urls), fields, bounds
        self.transform, self.shuffle_buffer, self.return_keys = transform, shuffle_buffer, return_keys
        self.start_batches, self.rotation = list(start_batches), rotation
        self.corrupt_policy, self.io_options = corrupt_policy, io_options

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        try:
            yield from self._batches()
        except tuple(_FORWARDED_ERRORS.values()) as error:
            if get_worker_info() is None:
                raise
            # In a worker: hand the error over as data, so the training process raises it with
            # this message alone rather than torch's re-raise carrying the worker's traceback.
            yield None, {"error": (type(error).__name__, str(error))}

    def _batches(self) -> Iterator[tuple[tuple, dict]]:
        plan, batch_size = self.plan, self.plan.batch_size
        worker = (_current_worker(plan.num_workers) + self.rotation) % plan.num_workers
        quota = plan.batch_quotas(self.rank)[worker]
        start = self.start_batches[worker]
        if start >= quota:
            return
        order = self._sample_order(worker)
        consumed = list(islice(order, start * batch_size))
        # The batch before the resume point is kept within reach: a batch with no usable sample
        # is filled from the one before it, also right after a resume.
        before_start = consumed[-batch_size:] if start else []
        cursor = _ShardCursor(plan.reader_segments(self.rank, worker), plan.shard_sizes, self.urls,
                              set(consumed), self.io_options, keep=set(before_start), bounds=self.bounds)
        previous_usable = None
        augment_seed = _stable_seed("scale_ssl.augment", plan.seed, plan.epoch, self.rank, worker)
        stats = {"corrupt_skipped": 0, "samples_missing": 0, "samples_padded": 0, "resume_samples_reread": 0}
        bad_by_shard, examples = Counter(), []
        fraction, rank_samples, budget = self.corrupt_policy
        for j in range(start, quota):
            slots = [self._decode(cursor.get(token)) for token in islice(order, batch_size)]
            unusable = [slot for slot in slots if isinstance(slot, _Unusable)]
            usable = [slot for slot in slots if not isinstance(slot, _Unusable)]
            stats["corrupt_skipped"] += sum(not slot.missing for slot in unusable)
            stats["samples_missing"] += sum(slot.missing for slot in unusable)
            stats["samples_padded"] += len(unusable)
            stats["resume_samples_reread"] = cursor.reread
            bad = [(slot.url, slot.key, slot.reason) for slot in unusable]
            bad_by_shard.update(url for url, _, _ in bad)
            examples = (examples + bad)[:_EXAMPLES_IN_ERRORS]
            if j == start and before_start:
                if not usable:
                    previous_usable = [slot for slot in map(self._decode, map(cursor.get, before_start))
                                       if not isinstance(slot, _Unusable)]
                for token in before_start:
                    cursor.stash.pop(token, None)
            fill_from = usable or previous_usable
            if not fill_from:
                raise DataCorruptionError(
                    f"rank {self.rank} worker {worker}, epoch {plan.epoch}: no sample of batch {j} "
                    f"could be used, nor of the batch before it, e.g. {bad[0][1]} in {bad[0][0]}: {bad[0][2]}"
                )
            # Only this batch's own samples: the rule must not depend on batches before the
            # previous one, which a resumed reader does not read.
            previous_usable = usable
            # Checked here too (the main process checks the rank's total): a worker that alone
            # exceeds the rank's budget stops now instead of decoding on.
            if stats["corrupt_skipped"] + stats["samples_missing"] > budget:
                raise DataCorruptionError(
                    _corruption_message(
                        f"rank {self.rank} (worker {worker})", plan.epoch,
                        stats["corrupt_skipped"] + stats["samples_missing"], stats["corrupt_skipped"],
                        stats["samples_missing"], fraction, rank_samples, budget, bad_by_shard, examples,
                    )
                )
            samples, fill = [], itertools.cycle(fill_from)
            for offset, slot in enumerate(slots):
                image, label, key = next(fill) if isinstance(slot, _Unusable) else slot
                with _seeded_global_rng((augment_seed + j * batch_size + offset) % 2**63):
                    output = self.transform(image)
                samples.append((output, label, key) if self.return_keys else (output, label))
            yield collate_samples(samples), {"worker": worker, "batch": j, "stats": dict(stats), "bad": bad}

    def _sample_order(self, worker: int) -> Iterator[tuple[int, int]]:
        """The reader's positions ``(draw, member)`` in the order its samples are used."""
        positions = (
            (draw, member)
            for draw, segment in enumerate(self.plan.reader_segments(self.rank, worker))
            for member in range(segment.start, segment.stop)
        )
        if self.shuffle_buffer <= 1:
            return positions
        rng = random.Random(
            f"scale_ssl.sample_shuffle:{self.plan.seed}:{self.plan.epoch}:{self.rank}:{worker}"
        )
        # initial=buffer_size: fill the whole buffer first, so the first batch is shuffled too.
        return wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(positions)

    def _decode(self, got) -> tuple[PIL.Image.Image, int, str] | _Unusable:
        if isinstance(got, _Unusable):
            return got
        key, members, url = got
        try:
            label = self.fields.label(members)
            encoded = self.fields.image_bytes(members)
        except ValueError as error:
            return _Unusable(url, key, str(error), missing=False)
        try:
            # A transform with its own decoder (e.g. AugmentedViews: OpenCV, reduced-size JPEG)
            # gets what that returns; its errors count as corrupt samples like PIL's.
            decode = getattr(self.transform, "decode", None)
            if decode is not None:
                image = decode(encoded)
            else:
                image = PIL.Image.open(io.BytesIO(encoded))
                image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError...: all mean unusable
            # (PIL names the in-memory file object it read from: noise in a message about a shard.)
            text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
            reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
            return _Unusable(url, key, reason, missing=False)
        return image, label, key


def _resolve_place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        # The process's place as the collectives layer knows it (the default process group, or a
        # world of one): data never asks torch.distributed itself.
        place = default_collective()
        return place.rank, place.world_size
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
