"""World-aware collectives: the only layer that touches ``torch.distributed``."""

from scale_ssl.collectives.base import Collective, LocalCollective, REDUCE_OPS
from scale_ssl.collectives.global_batchnorm import GlobalBatchNorm, convert_to_global_batchnorm
from scale_ssl.collectives.torch_distributed import TorchDistributedCollective


def default_collective() -> Collective:
    """The collective a loss uses when none is passed: the default process group if one is
    initialised, otherwise a world of one. Resolved at call time, so a loss built before
    ``init_process_group`` still computes the global loss once it runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistributedCollective()
    return LocalCollective()


__all__ = [
    "Collective",
    "LocalCollective",
    "TorchDistributedCollective",
    "default_collective",
    "GlobalBatchNorm",
    "convert_to_global_batchnorm",
    "REDUCE_OPS",
]
