"""Shared by the weight-averaging callbacks: copying a module that holds a trainer reference, and
recomputing BatchNorm statistics for averaged weights."""

from __future__ import annotations

import contextlib

import torch
from torch.optim.swa_utils import AveragedModel, update_bn


@contextlib.contextmanager
def detached_from_trainer(module):
    """``AveragedModel`` deep-copies the module; the trainer (strategy, process group, loaders)
    must not be copied with it."""
    trainer, module.trainer = module.trainer, None
    try:
        yield module
    finally:
        module.trainer = trainer


def averaged_copy(module, **kwargs) -> AveragedModel:
    with detached_from_trainer(module):
        return AveragedModel(module, **kwargs)


def first_image_tensor(batch):
    """The encoder input inside an SSL batch: ``((view1, view2, ...), labels)`` -> view1."""
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    return batch


def recompute_batchnorm(loader, module, device, max_batches: int | None = None) -> None:
    """BN running statistics for the averaged weights, from one pass over the training data
    (``torch.optim.swa_utils.update_bn`` on the encoder input of each batch)."""

    def inputs():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            yield first_image_tensor(batch).to(device)

    with torch.no_grad():
        update_bn(inputs(), module, device=device)
