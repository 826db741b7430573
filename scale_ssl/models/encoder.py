"""One entry point for every method's backbone: a torchvision ResNet or a Vision Transformer.

``build_encoder(arch, ...)`` returns ``(encoder, feature_dim)``; ``encoder(x)`` maps images
(N, C, H, W) to pooled features (N, feature_dim), whatever the family, so a method's heads, losses
and evaluation do not care which one it got.

* ``arch`` a ResNet name (``RESNET_ARCHITECTURES``): ``in_channels``, ``first_conv`` and
  ``maxpool1`` shape the stem (``build_resnet_encoder``); ``options`` may hold
  ``zero_init_residual``.
* ``arch`` ``vit_<size>_<patch>`` (``scale_ssl.models.vit``): ``options`` may hold ``image_size``
  (the side the position embedding is stored for; default 224), ``drop_path_rate`` and ``pool``
  (``cls`` or ``mean``). ``first_conv``/``maxpool1`` describe a ResNet stem and must stay at
  their defaults: a ViT's stem is its patch embedding, whose size is in the name.

Methods pass their config's ``model.encoder_options`` as ``options``; error messages name it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from scale_ssl.models.resnet import RESNET_ARCHITECTURES, build_resnet_encoder
from scale_ssl.models.vit import VIT_OPTIONS, build_vit_encoder, is_vit_arch, parse_vit_arch

RESNET_OPTIONS = ("zero_init_residual",)


def build_encoder(
    arch: str,
    in_channels: int = 3,
    first_conv: bool = True,
    maxpool1: bool = True,
    options: Mapping | None = None,
    owner: str = "model",
) -> tuple[nn.Module, int]:
    """Build the backbone named ``arch`` (see the module docstring); ``owner`` prefixes errors."""
    options = dict(options or {})
    if is_vit_arch(arch):
        try:
            parse_vit_arch(arch)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        _check_options(owner, arch, options, VIT_OPTIONS)
        for name, value in (("first_conv", first_conv), ("maxpool1", maxpool1)):
            if value is not True:
                raise ValueError(
                    f"{owner}: {name}={value!r} is a ResNet stem option, but arch={arch!r} is a ViT whose stem is its "
                    f"patch embedding (the patch size is the number in the name); leave model.{name} unset or true"
                )
        try:
            return build_vit_encoder(arch, in_channels=in_channels, **options)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
    if arch in RESNET_ARCHITECTURES:
        _check_options(owner, arch, options, RESNET_OPTIONS)
        return build_resnet_encoder(arch, in_channels=in_channels, first_conv=first_conv, maxpool1=maxpool1, **options)
    raise ValueError(
        f"{owner}: unknown arch {arch!r}; use a ResNet ({', '.join(RESNET_ARCHITECTURES)}) or a ViT "
        f"vit_<size>_<patch> (e.g. vit_s_16, vit_b_16, vit_mini_4)"
    )


def _check_options(owner: str, arch: str, options: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{owner}: model.encoder_options has {unknown}, which arch={arch!r} does not take; valid: {list(valid)}"
        )
