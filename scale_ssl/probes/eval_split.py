"""A labelled split read for evaluation: this rank's share, decoded once, features on demand.

Callbacks that score the encoder every few epochs (kNN, the online evaluator) read the same images
each time; ``cache=True`` keeps this rank's decoded tensors in memory after the first pass
(Fashion-MNIST's 60k train images are 188 MB of float32 in total, split over the ranks).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch
from torch import nn

from scale_ssl.data.full_pass import load_labelled_index
from scale_ssl.data.rank_full_pass import rank_full_pass_batches, rank_slice
from scale_ssl.probes.features import extract_features


class EvalSplit:
    """This rank's ``(images, labels)`` batches of ``source`` (a shard directory, ``shards.json``,
    remote location or ``ShardIndex``) under ``transform`` (e.g. ``EvalTransform``).

    Every sample of the split belongs to exactly one rank (:func:`rank_slice`); gathered in rank
    order the ranks' rows are the split in index order.
    """

    def __init__(self, source: str | os.PathLike | Any, transform: Callable, batch_size: int = 512, cache: bool = True):
        # A split without labels is refused here, by name, before any feature is computed.
        self.index, _, _ = load_labelled_index(source, "evaluation on a labelled split (kNN, online or linear evaluation)")
        self.source = self.index if not isinstance(source, (str, os.PathLike)) else source
        self.transform = transform
        self.batch_size = batch_size
        self.cache = cache
        self._cached: dict[tuple[int, int], list] = {}

    @property
    def num_samples(self) -> int:
        return self.index.num_samples

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    def rows_per_rank(self, world_size: int) -> int:
        return rank_slice(self.num_samples, 0, world_size)[2]

    def batches(self, rank: int, world_size: int):
        """This rank's batches: a list held in memory with ``cache=True``, else a re-iterable that
        decodes on every pass (a ``len`` is given, so the trainer can use it as a loader)."""
        key = (rank, world_size)
        if key in self._cached:
            return self._cached[key]
        loader = RankSplitLoader(self, rank, world_size)
        if not self.cache:
            return loader
        self._cached[key] = list(loader)
        return self._cached[key]


class RankSplitLoader:
    """Re-iterable ``(images, labels)`` batches of one rank's slice of an :class:`EvalSplit`."""

    def __init__(self, split: EvalSplit, rank: int, world_size: int):
        self.split, self.rank, self.world_size = split, rank, world_size

    def __len__(self) -> int:
        start, stop, _ = rank_slice(self.split.num_samples, self.rank, self.world_size)
        return -(-(stop - start) // self.split.batch_size)

    def __iter__(self):
        return rank_full_pass_batches(self.split.source, self.split.transform, rank=self.rank,
                                      world_size=self.world_size, batch_size=self.split.batch_size)  # fmt: skip


def rank_features(
    encoder: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    collective=None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of this rank's ``batches`` (not gathered). A rank with no
    batches gets a (0, D) tensor, D learned from the other ranks, so that every rank can take part
    in the collectives that follow."""
    features = labels = None
    if batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            features, labels = extract_features(encoder, batches, device=device)
    dim = torch.tensor([features.shape[1] if features is not None else -1], device=device)
    if collective is not None and collective.world_size > 1:
        dim = collective.all_reduce(dim, op="max")
    if int(dim) < 0:
        raise ValueError("rank_features: the split is empty on every rank; point it at shards with samples")
    if features is None:
        features = torch.zeros(0, int(dim), device=device)
        labels = torch.zeros(0, dtype=torch.long, device=device)
    return features, labels
