"""Read every sample of a shard set exactly once, split over ranks: distributed evaluation input.

``full_pass.py`` reads a whole split in one process. When N ranks extract features together, each
must read a disjoint part so that, gathered in rank order, the parts are the whole split in index
order with nothing dropped and nothing repeated (a training stream drops a remainder instead; a
kNN bank or a test score must not).

The split is cut by *sample position* in index order, not by shard, so ranks get equal work even
with few or uneven shards: with N samples and W ranks every rank owns ``rows_per_rank =
ceil(N / W)`` consecutive positions, the last rank fewer (possibly none). Shards outside a rank's
range are never opened; inside a partly owned shard the samples before the range are skipped
undecoded. Callers that gather across ranks pad to ``rows_per_rank`` (``rank_slice`` tells them
how many rows are real).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import PIL.Image
import torch
from torch.utils.data import default_collate

from scale_ssl.data.full_pass import check_count, decode_labelled, load_labelled_index, raise_on_damage
from scale_ssl.data.sample_fields import AUTO
from scale_ssl.data.shard_index import ShardIndex
from scale_ssl.data.shard_source import iter_shard_samples, load_index, resolve_location


def rank_slice(num_samples: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, stop, rows_per_rank)``: rank ``rank`` owns sample positions ``[start, stop)`` of
    ``num_samples``; every rank's slice has at most ``rows_per_rank = ceil(num_samples / world)``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"rank_slice: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank_slice: rank must be in [0, world_size={world_size}), got {rank!r}")
    rows_per_rank = math.ceil(num_samples / world_size)
    start = min(rank * rows_per_rank, num_samples)
    return start, min(start + rows_per_rank, num_samples), rows_per_rank


def load_shard_index(source: str | os.PathLike | ShardIndex) -> tuple[ShardIndex, list[str]]:
    """The index and the shard urls of a local or remote shard set (see ``shard_source``)."""
    if isinstance(source, ShardIndex):
        return source, source.urls()
    return load_index(resolve_location(source))


def rank_full_pass_batches(
    source: str | os.PathLike | ShardIndex,
    transform: Callable[[PIL.Image.Image], Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 512,
    label_key: str | None = AUTO,
    image_keys: Sequence[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(transform(images), labels)`` batches of this rank's slice of ``source``, in index
    order, with a partial last batch. A rank whose slice is empty yields nothing.

    A sample that cannot be decoded raises (naming shard and key): evaluation figures must come
    from the whole split, so a broken sample is not silently skipped or replaced.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"rank_full_pass_batches: batch_size must be an int >= 1, got {batch_size!r}")
    index, urls, fields = load_labelled_index(source, "evaluation", label_key, image_keys)
    start, stop, _ = rank_slice(index.num_samples, rank, world_size)
    batch: list[tuple[Any, int]] = []
    shard_start = 0
    for shard, url in zip(index.shards, urls):
        shard_stop = shard_start + shard.num_samples
        if shard_stop <= start or shard_start >= stop:
            shard_start = shard_stop
            continue
        # Only this rank's samples are read: the ones before its slice are passed over undecoded.
        first = max(start - shard_start, 0)
        samples = iter_shard_samples(url, skip=first, limit=min(stop, shard_stop) - shard_start - first,
                                     on_damage=raise_on_damage(url))
        read = 0
        for key, members in samples:
            batch.append(decode_labelled(members, fields, transform, url, key))
            read += 1
            if len(batch) == batch_size:
                yield default_collate(batch)
                batch = []
        check_count(url, read, min(stop, shard_stop) - shard_start - first)
        shard_start = shard_stop
    if batch:
        yield default_collate(batch)
