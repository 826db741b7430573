"""Remove BatchNorm from a method's networks, for tests of what happens *across* micro-batches.

BatchNorm normalises each (micro-)batch with its own statistics, so with BN no gradient
accumulation equals one process on the whole batch, and on tiny test batches (8 rows, 4x4 maps)
BN also amplifies float round-off step after step: one process against itself with the rows of
each batch in another order differs by ~1e-3 relative after 4 SwAV steps with BN, ~1e-7 without
(measured on resnet10, 28 px). Tests of queues under accumulation therefore use the real method
classes with their BatchNorm layers replaced by the identity; BN itself is tested elsewhere.
"""

from __future__ import annotations

from torch import nn


def remove_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d inside ``module`` by ``nn.Identity`` (in place); return it."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, nn.Identity())
        else:
            remove_batchnorm(child)
    return module
