"""Where the trainer's loaders come from and how each rank gets its share.

The training loader is fetched once and lazily (``configure_optimizers`` may ask for
``estimated_stepping_batches`` before the loop starts, as in Lightning): from ``fit``'s argument,
the datamodule or the module, then distributed over the ranks (``data_distribution.py``).
"""

from __future__ import annotations

import torch

from scale_ssl.trainer.data_distribution import (
    EVAL,
    TRAIN,
    batch_size_of,
    check_listed_batches,
    distribute_loader,
    equal_batches_by_construction,
)


class LoaderSource:
    def __init__(self, trainer):
        self.trainer = trainer
        self.train_source = None  # what fit() was given
        self.datamodule = None
        # Whether every rank's batches are known equal without a per-step check (see fit_loop).
        self.batches_equal_by_construction = True

    def train_loader(self):
        trainer = self.trainer
        if trainer.train_dataloader is None and trainer.state == "fit" and trainer.module is not None:
            if self.train_source is not None:
                loader = self.train_source
            elif self.datamodule is not None and hasattr(self.datamodule, "train_dataloader"):
                loader = self.datamodule.train_dataloader()
            else:
                loader = trainer.module.train_dataloader()
            trainer.train_dataloader = self.distribute(loader, TRAIN, "the training loader")
            self.batches_equal_by_construction = self._batches_known_equal(trainer.train_dataloader)
        return trainer.train_dataloader

    def _batches_known_equal(self, loader) -> bool:
        """Whether every rank's batches are known to be equal in size without a per-step check:
        by construction, or, for a list of batches, by one comparison of all sizes now."""
        if equal_batches_by_construction(loader, self.trainer.world_size):
            return True
        if isinstance(loader, (list, tuple)):
            check_listed_batches(self.trainer.strategy.all_gather_object([batch_size_of(b) for b in loader]))
            return True
        return False

    def distribute(self, loader, stage: str, what: str):
        settings = self.trainer.settings
        if loader is None or not settings.use_distributed_sampler:
            return loader
        return distribute_loader(loader, stage, self.trainer.world_size, self.trainer.global_rank,
                                 settings.seed if settings.seed is not None else 0, what)

    def loaders(self, given, hook: str, datamodule) -> list:
        """Validation/test/predict loaders: as given, else from the datamodule or the module."""
        if given is None:
            source = datamodule if datamodule is not None and hasattr(datamodule, hook) else self.trainer.module
            given = getattr(source, hook)()
        if given is None:
            return []
        loaders = list(given) if isinstance(given, (list, tuple)) and given and is_loader(given[0]) else [given]
        what = hook.replace("_dataloader", "").replace("val", "validation")
        return [self.distribute(loader, EVAL, f"the {what} loader" + (f" {i}" if len(loaders) > 1 else ""))
                for i, loader in enumerate(loaders)]


def is_loader(obj) -> bool:
    """A loader (DataLoader, stream, list of batches) as opposed to one batch (tuple, tensor, dict):
    ``[loader_a, loader_b]`` means several loaders, ``[(x, y), ...]`` is one in-memory loader."""
    return hasattr(obj, "__iter__") and not isinstance(obj, (tuple, torch.Tensor, dict, str))


def limited_length(loader, limit) -> int | None:
    """Batches to run of ``loader`` under ``limit_*_batches`` (an int count or a float fraction)."""
    if loader is None:
        return None
    try:
        n = len(loader)
    except TypeError:
        n = None
    if limit is None:
        return n
    if isinstance(limit, float):
        if n is None:
            raise ValueError("a fractional limit_*_batches needs a loader with a length; give an int batch count")
        return int(n * limit)
    return limit if n is None else min(n, limit)
