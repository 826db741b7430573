"""Which submodules become FSDP2 units (``fully_shard`` groups), innermost first.

An FSDP unit's parameters are all-gathered together before its forward and freed (resharded)
after it, so the unit is the granularity of peak memory: one residual block or one transformer
block at a time, as torchtitan and Lightning's ``auto_wrap_policy={Block}`` do. The policy:

1. every *block* of a backbone: torchvision's ResNet ``BasicBlock``/``Bottleneck``, ViT
   ``EncoderBlock`` (our ``DropPathEncoderBlock`` included), and every module whose class says
   ``is_shard_block = True`` (AMDIM's ``ResidualConvBlock``, CPC's patch block): backends do not
   import ``scale_ssl.models`` (docs/parts.toml), so our own models declare their blocks;
2. every direct child of the method that contains blocks (its encoders: ``encoder``,
   BYOL's ``target_encoder``, MoCo's ``momentum_encoder``, DINO's ``teacher_encoder``), so their
   stem and final norm are a unit too and an encoder can be called on its own outside the
   training step (the online evaluator, kNN monitors);
3. the method itself, the root: heads, prototypes, everything left.

An EMA target and its online network have the same structure, so they are cut into the same
units and every parameter of the target is sharded exactly like its online twin: the EMA update
then acts on matching local shards, element by element, with no communication.
"""

from __future__ import annotations

import inspect

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

BLOCK_TYPES: tuple[type[nn.Module], ...] = (BasicBlock, Bottleneck, EncoderBlock)


def is_block(module: nn.Module) -> bool:
    return isinstance(module, BLOCK_TYPES) or getattr(type(module), "is_shard_block", False) is True


def fsdp_units(root: nn.Module) -> list[nn.Module]:
    """The modules to ``fully_shard``, children before parents, the root last."""
    blocks = [m for m in root.modules() if m is not root and is_block(m)]
    block_ids = {id(m) for m in blocks}
    encoders = [child for child in root.children()
                if id(child) not in block_ids and any(id(m) in block_ids for m in child.modules())]
    # A block nested in a block (none in our models) would be sharded with its parent only.
    outer = [b for b in blocks if not any(b is not o and any(m is b for m in o.modules()) for o in blocks)]
    return [*outer, *encoders, root]


def entry_methods(module: nn.Module) -> list[str]:
    """Public methods of ``module``'s own classes (below ``nn.Module``) other than ``forward``:
    the other ways a method calls an encoder (AMDIM's ``feature_maps``, CPC's ``feature_grid``,
    the ViT's ``forward_tokens``). FSDP gathers a unit's parameters only around calls it knows,
    so each of these is registered as a forward of its unit."""
    names = []
    for cls in type(module).__mro__:
        if cls in nn.Module.__mro__:
            break
        for name, value in vars(cls).items():
            if not name.startswith("_") and name != "forward" and inspect.isfunction(value) and name not in names:
                names.append(name)
    return names
