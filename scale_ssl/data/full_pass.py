"""Read every sample of a shard set once, in index order: what evaluation needs.

Training streams drop a remainder so ranks take equal steps; a kNN bank or a test-set score must
instead see every sample exactly once, with a partial last batch. This reader is for one process
(feature extraction for evaluation); its shards are split across DataLoader workers only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate

from scale_ssl.data.shard_index import ShardIndex


class _DecodeLabelled:
    def __init__(self, image_key: str, transform: Callable):
        self.image_key, self.transform = image_key, transform

    def __call__(self, sample: dict) -> tuple[Any, int]:
        with PIL.Image.open(io.BytesIO(sample[self.image_key])) as image:
            image.load()
            return self.transform(image), int(sample["cls"])


def _single_node(urls):
    # Evaluation runs in one process: every shard belongs to it (explicit, as webdataset asks).
    yield from urls


def full_pass_batches(
    source: str | os.PathLike | ShardIndex,
    transform: Callable[[PIL.Image.Image], Any],
    batch_size: int = 512,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches covering every sample of ``source`` exactly once."""
    index = source if isinstance(source, ShardIndex) else ShardIndex.load(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # More workers than shards would leave some with nothing to read.
    workers = min(num_workers, index.num_shards)
    dataset = (
        wds.WebDataset(
            index.urls(),
            shardshuffle=False,
            nodesplitter=_single_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .map(_DecodeLabelled(index.image_key, transform))
        .batched(batch_size, partial=True, collation_fn=default_collate)
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    yield from loader
