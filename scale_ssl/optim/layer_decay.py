"""Layer-wise learning-rate decay for Vision Transformers.

Clark et al. "ELECTRA", ICLR 2020 (arXiv:2003.10555); Bao et al. "BEiT", ICLR 2022
(arXiv:2106.08254), which made it the standard ViT fine-tuning recipe (MAE, DINOv2):

    lr_l = lr x rate^(L + 1 - l)

with L transformer blocks and layer ids l = 0 for the patch embedding, position embedding and
class token, l = i + 1 for block i, and l = L + 1 for everything after the last block (the final
norm and any head), which therefore keeps the full lr. Layers near the input move least.

Layer ids are read from parameter names as torchvision's ``VisionTransformer`` (and so our
``ViTEncoder``) spells them: ``conv_proj.*``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BLOCK = re.compile(r"(?:^|\.)encoder_layer_(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:conv_proj\.|class_token$|pos_embedding$)")


def vit_layer_ids(names: Iterable[str]) -> tuple[dict[str, int], int]:
    """``({name: layer id}, L)`` for the parameter ``names`` of a module holding one ViT.

    Raises ``ValueError`` when no name belongs to a transformer block (there is no ViT to decay)."""
    names = list(names)
    blocks = {name: int(match.group(1)) for name in names if (match := _BLOCK.search(name))}
    if not blocks:
        raise ValueError(
            "layer-wise lr decay needs a ViT encoder (parameters named ...encoder_layer_<i>...), and this "
            f"model has none (its parameters look like {', '.join(names[:4])}, ...); remove optim.layer_decay or "
            "use a vit_* arch"
        )
    num_layers = max(blocks.values()) + 1
    ids = {}
    for name in names:
        if name in blocks:
            ids[name] = blocks[name] + 1
        elif _EMBEDDING.search(name):
            ids[name] = 0
        else:
            ids[name] = num_layers + 1
    return ids, num_layers


def layer_lr_scale(layer_id: int, num_layers: int, rate: float) -> float:
    """rate^(L + 1 - layer_id): 1 for the layers after the last block."""
    return float(rate) ** (num_layers + 1 - layer_id)
