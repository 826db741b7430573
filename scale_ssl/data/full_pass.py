"""Read every sample of a shard set once: what evaluation needs.

Training streams drop a remainder so ranks take equal steps; a kNN bank or a test-set score must
instead see every sample exactly once, with a partial last batch. This reader is for one process
(feature extraction for evaluation); its shards are split across DataLoader workers only. It
reads through ``shard_source`` (local, HTTP, object stores) and needs labels: a set without them
is refused by name, and a sample that cannot be used (undecodable, no label, lost to a damaged
stretch of its tar) raises rather than being skipped, since the figure must cover the whole split.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import PIL.Image
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from scale_ssl.data.sample_fields import AUTO, SampleFields, require_labels
from scale_ssl.data.shard_index import ShardIndex
from scale_ssl.data.shard_source import iter_shard_samples, load_index


def load_labelled_index(source, what: str, label_key: str | None = AUTO,
                        image_keys: Sequence[str] | None = None) -> tuple[ShardIndex, list[str], SampleFields]:
    """The index, shard URLs and sample fields of an evaluation split; ``MissingLabelsError``
    naming ``what`` when the split has no labels."""
    index, urls = (source, source.urls()) if isinstance(source, ShardIndex) else load_index(source)
    fields = SampleFields.for_index(index, image_keys, label_key)
    require_labels(fields.label_key, str(source if not isinstance(source, ShardIndex) else index.base or index.directory), what)
    return index, urls, fields


def decode_labelled(members: dict[str, bytes], fields: SampleFields, transform, url: str, key: str) -> tuple[Any, int]:
    """``(transform(image), label)`` of one sample; a sample that cannot be used raises, naming it."""
    try:
        label = fields.label(members)
        with PIL.Image.open(io.BytesIO(fields.image_bytes(members))) as image:
            image.load()
            return transform(image), label
    except Exception as error:
        raise ValueError(
            f"sample {key!r} of shard {url} cannot be read for evaluation ({type(error).__name__}: {error}); "
            f"repair or re-write the shard"
        ) from error


def raise_on_damage(url: str):
    def report(damage) -> None:
        raise ValueError(f"shard {url}: {damage.describe()}; evaluation needs every sample of the split: repair the shard")

    return report


def check_count(url: str, read: int, expected: int) -> None:
    if read != expected:
        raise ValueError(
            f"shard {url} gave {read} samples where its index lists {expected}; evaluation needs every sample "
            f"of the split: repair the shard or re-index it (scale-ssl index-shards)"
        )


class _ShardsInOrder(IterableDataset):
    def __init__(self, urls: list[str], sizes: list[int], fields: SampleFields, transform, batch_size: int):
        self.urls, self.sizes, self.fields = urls, sizes, fields
        self.transform, self.batch_size = transform, batch_size

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        mine = range(len(self.urls)) if info is None else range(info.id, len(self.urls), info.num_workers)
        batch = []
        for shard in mine:
            url, read = self.urls[shard], 0
            for key, members in iter_shard_samples(url, on_damage=raise_on_damage(url)):
                batch.append(decode_labelled(members, self.fields, self.transform, url, key))
                read += 1
                if len(batch) == self.batch_size:
                    yield default_collate(batch)
                    batch = []
            check_count(url, read, self.sizes[shard])
        if batch:
            yield default_collate(batch)


def full_pass_batches(
    source: str | os.PathLike | ShardIndex,
    transform: Callable[[PIL.Image.Image], Any],
    batch_size: int = 512,
    num_workers: int = 0,
    label_key: str | None = AUTO,
    image_keys: Sequence[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches covering every sample of ``source`` exactly once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index, urls, fields = load_labelled_index(source, "a full pass for evaluation", label_key, image_keys)
    # More workers than shards would leave some with nothing to read.
    workers = min(num_workers, index.num_shards)
    sizes = [shard.num_samples for shard in index.shards]
    loader = DataLoader(_ShardsInOrder(urls, sizes, fields, transform, batch_size), batch_size=None, num_workers=workers)
    yield from loader
