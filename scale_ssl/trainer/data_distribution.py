"""The trainer owns data distribution (design contract 8): what a user hands to ``fit``,
``validate``, ``test`` or ``predict`` is split over the ranks here, as Lightning does with its
``use_distributed_sampler=True`` default.

Under a multi-rank strategy a map-style ``DataLoader`` is re-created with the same settings
(batch size, workers, collate, ``drop_last``, ...) and a sampler that gives this rank its share:

* **training**: the epoch's index order (shuffled when the loader shuffled, seeded by the
  trainer's seed and the epoch, so every rank draws the same permutation and ``set_epoch`` gives
  a new one each epoch) is cut to a multiple of the world size and dealt round-robin: rank ``r``
  takes positions ``r, r + W, r + 2W, ...``. Every rank holds the same number of samples, no
  sample is read twice in an epoch, and at most ``W - 1`` samples (a different few each epoch
  when shuffled) are not read. ``torch.utils.data.DistributedSampler(drop_last=True)`` for a
  plain loader. Padding instead (``DistributedSampler``'s default, Lightning's choice) would
  repeat samples inside one global batch: for a contrastive loss a repeated image, differently
  augmented, is a false negative.
* **evaluation** (validate, test, predict): dealt the same way but nothing is cut and nothing
  repeated: ranks' shares differ by at most one sample, so metrics summed over ranks (counts
  and sums, see ``metrics.py``) count every sample exactly once. A rank may then run one batch
  more than another, so a ``validation_step``/``test_step`` must not call collectives; reduce
  in the epoch-end hooks instead (as ``EncoderClassifier`` and the kNN callback do).
* a user's own **sampler** (``WeightedRandomSampler``, a curriculum, ...) keeps deciding the
  order: each epoch every rank runs it under the same seeded RNG (forked, the caller's RNG is
  left alone) and takes its share of the indices it yields, as above. A sampler with its own
  ``generator`` must be seeded identically on every rank.
* a user's own **batch sampler** keeps deciding the batches: rank ``r`` takes batches
  ``r, r + W, ...``, cut to an equal count per rank in training. Its batch sizes may differ, so
  the trainer checks them every step (``lockstep_batches``).
* a sampler that already is a ``DistributedSampler`` for this world is kept.

An ``IterableDataset`` cannot be given a sampler: unless it says it is split by rank (a ``rank``
and ``world_size`` attribute for this run, as ``ShardedImageStream`` has), one warning names the
fix. ``Trainer(use_distributed_sampler=False)`` turns all of this off.

Equal per-rank batches are what every global loss assumes (each rank's rows are a
``rank_offset(b)`` slice of the gather). Where they hold by construction (our stream, a loader
re-created here with a fixed batch size and the default collate) nothing is checked; a list of
batches is checked once when ``fit`` starts (``check_listed_batches``: every batch is known);
anything else is checked every step by ``lockstep_batches``, which gathers the per-rank sizes
before the step runs. Not under XLA: there a per-step host read would split the compiled step
program, which is compiled for one batch shape anyway; feed XLA our stream or equal batches.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

TRAIN, EVAL = "train", "eval"
# DataLoader arguments carried over to the re-created loader (sampler/batch settings are rebuilt).
_CARRIED = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
            "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


class UnequalBatchesError(RuntimeError):
    """Ranks reached one training step with different numbers of samples (or one had none)."""


class RankShareSampler(Sampler[int]):
    """This rank's share of the indices ``base`` yields in an epoch.

    Every rank iterates ``base`` under the global torch RNG seeded with ``seed + epoch`` (forked:
    the caller's RNG state is untouched), so a ``RandomSampler`` or ``WeightedRandomSampler``
    yields the same sequence on every rank. ``even=True`` (training) cuts the sequence to a
    multiple of ``num_replicas`` so every rank gets the same count; ``even=False`` (evaluation)
    keeps every index, shares then differ by at most one.
    """

    def __init__(self, base: Iterable[int], num_replicas: int, rank: int, seed: int = 0, even: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas}")
        self.base, self.num_replicas, self.rank = base, num_replicas, rank
        self.seed, self.even, self.epoch = seed, even, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _all_indices(self) -> list:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            return list(self.base)

    def __iter__(self) -> Iterator[int]:
        indices = self._all_indices()
        if self.even:
            indices = indices[: len(indices) - len(indices) % self.num_replicas]
        return iter(indices[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        total = len(self.base)
        if self.even:
            return total // self.num_replicas
        return len(range(self.rank, total, self.num_replicas))


class RankShareBatchSampler(RankShareSampler):
    """A user's batch sampler split by whole batches: rank ``r`` takes batches ``r, r + W, ...``
    (cut to an equal count per rank when ``even``)."""


def rank_aware(obj: Any, world_size: int) -> bool:
    """Whether an iterable says it splits itself by rank for this world (``ShardedImageStream``,
    or any iterable with ``rank`` and ``world_size`` attributes set for this run)."""
    return getattr(obj, "world_size", None) == world_size and isinstance(getattr(obj, "rank", None), int)


def distribute_loader(loader: Any, stage: str, world_size: int, rank: int, seed: int, what: str) -> Any:
    """``loader`` as this rank should iterate it (see the module docstring). ``stage`` is
    ``TRAIN`` or ``EVAL``; ``what`` names the loader in messages (e.g. "the training loader")."""
    if world_size <= 1:
        return loader
    if not isinstance(loader, DataLoader):
        if isinstance(loader, IterableDataset) and not rank_aware(loader, world_size) and rank == 0:
            _warn_not_rank_aware(loader, what, world_size)
        return loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        if not (rank_aware(dataset, world_size) or rank_aware(loader, world_size)) and rank == 0:
            _warn_not_rank_aware(dataset, what, world_size)
        return loader
    even = stage == TRAIN
    kwargs = {name: getattr(loader, name) for name in _CARRIED if hasattr(loader, name)}
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("prefetch_factor", None)  # DataLoader refuses it without workers
    if _has_own_batch_sampler(loader):
        batch_sampler = RankShareBatchSampler(loader.batch_sampler, world_size, rank, seed=seed, even=even)
        return _rebuild(loader, dataset, dict(kwargs, batch_sampler=batch_sampler), what)
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        if (sampler.num_replicas, sampler.rank) != (world_size, rank):
            raise ValueError(
                f"{what} has a DistributedSampler for rank {sampler.rank} of {sampler.num_replicas}, but this is rank "
                f"{rank} of {world_size}; build it without num_replicas/rank (they default to the process group) or "
                "leave the sampler to the trainer"
            )
        return loader
    if type(sampler) in (RandomSampler, SequentialSampler) and not _replaces_default(sampler, dataset):
        sampler = type(sampler)(dataset)  # a default sampler over the dataset: shuffle or not
    if even and type(sampler) in (RandomSampler, SequentialSampler):
        shares = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                    shuffle=type(sampler) is RandomSampler, seed=seed, drop_last=True)
    else:
        shares = RankShareSampler(sampler, world_size, rank, seed=seed, even=even)
    if not even and len(shares) == 0:
        raise ValueError(
            f"{what} holds {len(sampler)} samples for {world_size} ranks, so rank {rank} would have none; use a "
            f"set of at least {world_size} samples or Trainer(use_distributed_sampler=False) with your own split"
        )
    return _rebuild(loader, dataset, dict(kwargs, sampler=shares, batch_size=loader.batch_size,
                                          drop_last=loader.drop_last), what)


def equal_batches_by_construction(loader: Any, world_size: int) -> bool:
    """True where every rank's step is known to hold the same number of samples without asking
    the other ranks: ``ShardedImageStream`` (full batches, equal steps: contract 5) and loaders
    re-created by ``distribute_loader`` for training with a fixed batch size and the default
    collate (every rank holds the same number of samples, batched alike)."""
    if world_size <= 1:
        return True
    from scale_ssl.data.stream import ShardedImageStream

    if isinstance(loader, ShardedImageStream):
        return True
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    sampler = loader.sampler  # a DistributedSampler pads or cuts to equal shares
    equal_shares = isinstance(sampler, DistributedSampler) or (
        isinstance(sampler, RankShareSampler) and not isinstance(sampler, RankShareBatchSampler) and sampler.even
    )
    return (equal_shares and type(loader.batch_sampler) is BatchSampler and loader.collate_fn is default_collate)


def check_listed_batches(sizes_by_rank: list[list[int]]) -> None:
    """A list of batches on every rank: raise ``UnequalBatchesError`` unless every rank holds the
    same number of batches with the same sizes (``sizes_by_rank[r]``: rank r's batch sizes)."""
    lengths = [len(sizes) for sizes in sizes_by_rank]
    if len(set(lengths)) > 1:
        raise UnequalBatchesError(_unequal_lengths_message(lengths))
    for index, sizes in enumerate(zip(*sizes_by_rank)):
        if len(set(sizes)) > 1:
            raise UnequalBatchesError(_unequal_message(list(sizes), f"batch {index} of the training list"))


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on whatever orders the loader's samples (the loader itself, its sampler, or
    its batch sampler and that one's sampler), so every epoch draws a new order."""
    seen = set()
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
            seen.add(id(obj))
            obj.set_epoch(epoch)


def lockstep_batches(batches: Iterable, collective, device, limit: int | None, first_index: int,
                     describe_step) -> Iterator:
    """Yield ``batches`` only while every rank has a batch of the same size for this step.

    Before each batch is handed to the step, one all-gather of a pair per rank, (this rank's
    batch size, or ``-1`` when it has no batch left or reached ``limit``; its epoch length
    ``limit``, or ``-1`` when unknown), tells every rank every rank's figures. All sizes ``-1``:
    the epoch ends everywhere. Sizes or lengths unequal: every rank raises the same
    ``UnequalBatchesError`` before the step's own collectives (which would otherwise hang, or
    gather rows of different lengths; unequal lengths would split the ranks at the epoch's last
    accumulation step). ``describe_step(i)`` says where batch ``i`` is, for the message.
    """
    iterator = iter(batches)
    index = first_index
    length = -1 if limit is None else limit
    while True:
        batch, size = None, -1
        if limit is None or index < limit:
            try:
                batch = next(iterator)
                size = batch_size_of(batch)
            except StopIteration:
                pass
        pair = torch.tensor([[size, length]], dtype=torch.long, device=device)
        gathered = collective.all_gather(pair, grad=False).tolist()
        sizes, lengths = [row[0] for row in gathered], [row[1] for row in gathered]
        if len(set(lengths)) > 1:
            raise UnequalBatchesError(_unequal_lengths_message(lengths))
        if all(s == -1 for s in sizes):
            return
        if len(set(sizes)) > 1:
            raise UnequalBatchesError(_unequal_message(sizes, describe_step(index)))
        yield batch
        index += 1


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (nested tuples/lists/dicts followed)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)):
        for item in batch:
            return batch_size_of(item)
    if isinstance(batch, dict):
        for item in batch.values():
            return batch_size_of(item)
    return 1


def _unequal_message(sizes: list[int], where: str) -> str:
    per_rank = ", ".join(f"rank {r}: {'no batch' if s == -1 else s}" for r, s in enumerate(sizes))
    if -1 in sizes:
        what = "some ranks ran out of training batches while others still had one"
    else:
        what = "the ranks' training batches differ in size"
    return (
        f"{what} at {where} ({per_rank}). Every rank's step must hold the same number of samples: the global "
        "losses gather equal slices from every rank, and a rank without a batch would leave the others waiting in a "
        "collective. " + _FIX
    )


_FIX = ("Fix: DataLoader(..., drop_last=True), or a data set whose size is a multiple of world size x batch size; "
        "let the trainer split a map-style DataLoader (Trainer(use_distributed_sampler=True), the default) rather "
        "than splitting it yourself; an iterable source must yield the same number of equal batches on every rank "
        "(scale_ssl.data.ShardedImageStream does)")


def _unequal_lengths_message(lengths: list[int]) -> str:
    per_rank = ", ".join(f"rank {r}: {'unknown' if n == -1 else n}" for r, n in enumerate(lengths))
    return (
        f"the ranks' training loaders hold different numbers of batches this epoch ({per_rank}); every rank must "
        "run the same steps. " + _FIX
    )


def _warn_not_rank_aware(obj: Any, what: str, world_size: int) -> None:
    warnings.warn(
        f"{what} iterates {type(obj).__name__}, an IterableDataset the trainer cannot give a sampler, and it does "
        f"not say it is split by rank: under {world_size} ranks every rank may read the same samples (each image "
        f"{world_size} times per global batch: false negatives for a contrastive loss, and no speed-up). Fix: split "
        "it by rank in __iter__ (torch.distributed.get_rank() / get_world_size(); webdataset: "
        "nodesplitter=wds.split_by_node) and give it `rank` and `world_size` attributes (which also silence this "
        "warning), or stream tar shards with scale_ssl.data.ShardedImageStream",
        stacklevel=4,
    )


def _has_own_batch_sampler(loader: DataLoader) -> bool:
    """A batch sampler passed by the user (DataLoader then has ``batch_size=None``)."""
    return loader.batch_size is None and loader.batch_sampler is not None


def _replaces_default(sampler: Sampler, dataset) -> bool:
    """Whether a Random/SequentialSampler carries settings (replacement, num_samples, another
    data source) that a plain shuffle or sequence over the dataset would lose: then it is wrapped,
    not replaced. (A ``generator`` is not such a setting: the replacement is seeded by the trainer.)"""
    if getattr(sampler, "data_source", dataset) is not dataset:
        return True
    return isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None)


def _rebuild(loader: DataLoader, dataset, kwargs: dict, what: str) -> DataLoader:
    cls = type(loader)
    if cls is not DataLoader:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        known = set(inspect.signature(DataLoader.__init__).parameters) - {"self"}
        extra = accepted - known
        if extra and not any(inspect.signature(cls.__init__).parameters[n].kind == inspect.Parameter.VAR_KEYWORD
                             for n in accepted):
            raise ValueError(
                f"{what} is a {cls.__name__} whose __init__ takes arguments a DataLoader does not ({sorted(extra)}), so "
                "the trainer cannot re-create it with a distributed sampler; pass Trainer(use_distributed_sampler=False) "
                "and give it a DistributedSampler yourself (with drop_last=True for training)"
            )
    return cls(dataset, **kwargs)
