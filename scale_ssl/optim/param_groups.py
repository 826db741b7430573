"""Split parameters into a decayed/adapted group and an excluded group (biases, norm weights).

SimCLR (Chen et al. 2020, arXiv:2002.05709) and BYOL (Grill et al. 2020, arXiv:2006.07733) apply
neither weight decay nor the LARS trust ratio to biases and batch-norm parameters: these are
1-D, have no scale a trust ratio could track, and decaying them towards zero only hurts. Goyal et
al. 2017 (arXiv:1706.02677) likewise keep them out of weight decay. A Vision Transformer's
position embedding and class token (torchvision's ``pos_embedding`` / ``class_token``) are
excluded too, as in DeiT/BEiT/MAE (timm's ``no_weight_decay``): they are learned embeddings, not
weights whose scale decay should shrink.
"""

from __future__ import annotations

from typing import Iterable

import torch


# Parameter names (last component) that are never decayed whatever their shape: the ViT's tokens.
NO_DECAY_PARAMETER_NAMES = ("pos_embedding", "class_token")


def excluded_from_weight_decay(name: str, param: torch.Tensor, skip_list: tuple[str, ...] = ("bias", "bn")) -> bool:
    """The rule of this module: 1-D (biases, norm weights), a ViT position embedding or class
    token, or a name containing an entry of ``skip_list``."""
    return (param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_PARAMETER_NAMES
            or any(entry in name for entry in skip_list))


def exclude_bn_bias_groups(
    named_params: Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    skip_list: tuple[str, ...] = ("bias", "bn"),
) -> list[dict]:
    """Return two optimizer parameter groups, every trainable parameter in exactly one of them.

    1. ``{"params": [...], "weight_decay": weight_decay, "lars_adaptation": True}`` for the rest.
    2. ``{"params": [...], "weight_decay": 0.0, "lars_adaptation": False}`` for every parameter
       that is 1-D (biases, norm weights), a ViT position embedding or class token, or whose name
       contains an entry of ``skip_list`` (``excluded_from_weight_decay``).

    Parameters with ``requires_grad=False`` (frozen layers) are left out; a parameter passed twice
    (tied weights) is kept once. Either group may be empty. The extra ``lars_adaptation`` key is
    read by ``LARS`` and ignored by ``torch.optim`` optimizers, so the groups also suit SGD/AdamW.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        weight_decay: decay for the first group, >= 0.
        skip_list: substrings of parameter names to exclude whatever their shape, e.g. ``"bn"``
            for norm layers named ``bn1``, or a head's name to spare it entirely.

    Usage: ``LARS(exclude_bn_bias_groups(model.named_parameters(), 1e-6), lr=4.8)``.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"exclude_bn_bias_groups: weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(skip_list, str) or not all(isinstance(entry, str) and entry for entry in skip_list):
        raise TypeError(
            "exclude_bn_bias_groups: skip_list must be a tuple of non-empty name substrings, e.g. "
            f"('bias', 'bn'), got {skip_list!r}"
            + ("; a bare string would be read letter by letter, write (name,)" if isinstance(skip_list, str) else "")
        )
    skip_list = tuple(skip_list)

    decayed: list[torch.Tensor] = []
    excluded: list[torch.Tensor] = []
    seen: set[int] = set()
    for item in named_params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                "exclude_bn_bias_groups: named_params must yield (name, parameter) pairs; pass "
                f"model.named_parameters(), not model.parameters() (got an item of type {type(item).__name__})"
            )
        name, param = item
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if excluded_from_weight_decay(name, param, skip_list):
            excluded.append(param)
        else:
            decayed.append(param)

    return [
        {"params": decayed, "weight_decay": float(weight_decay), "lars_adaptation": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False},
    ]
