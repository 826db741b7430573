"""Losses. None imports torch.distributed: each receives a ``Collective``."""

from scale_ssl.losses.nt_xent import NTXentLoss

__all__ = ["NTXentLoss"]
