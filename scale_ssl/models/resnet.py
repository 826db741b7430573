"""ResNet encoders for self-supervised pretraining, built from ``torchvision.models``.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385).
Zagoruyko, Komodakis. "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146).

The encoder maps an image batch x of shape (N, C, H, W) to the globally average-pooled features
h = f(x) of shape (N, feature_dim): the representation SimCLR, MoCo, BYOL and SwAV evaluate,
taken before any projection head (the classifier ``fc`` is replaced by ``nn.Identity``).

Small-image stem: on 32x32 CIFAR images the ImageNet stem (7x7 stride-2 conv, then a stride-2
max-pool) shrinks the input 4x before the first residual stage. The CIFAR variant of SimCLR
(Chen et al. 2020, arXiv:2002.05709, CIFAR-10 appendix) swaps the conv for a 3x3 stride-1 one and drops
the max-pool; ``first_conv=False`` and ``maxpool1=False`` do exactly that.

Checkpoint compatibility: the returned module *is* a ``torchvision.models.ResNet`` whose only
changes are (a) ``conv1`` when ``first_conv=False`` or ``in_channels != 3``, (b) ``maxpool`` set to
``nn.Identity()`` when ``maxpool1=False`` and (c) ``fc`` set to ``nn.Identity()``; its convs are
``OnePixelConv2d``, an ``nn.Conv2d`` with the same parameters that only computes a 1x1 output
faster (``scale_ssl/models/one_pixel_conv.py``). Its
``state_dict()`` therefore loads with ``strict=True`` into a torchvision model given the same
changes, e.g. for ``build_resnet_encoder("resnet18", in_channels=1, first_conv=False,
maxpool1=False)``::

    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()          # or keep fc and load with strict=False (fc.* then missing)
    model.load_state_dict(encoder.state_dict())
"""

from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from scale_ssl.models.one_pixel_conv import use_one_pixel_convs


def _resnet10(**kwargs) -> ResNet:
    # One BasicBlock per stage: a ~5M-parameter encoder that trains in minutes on a CPU demo.
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


_ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet10": _resnet10,
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
}

RESNET_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)
"""The names ``build_resnet_encoder`` accepts for ``arch``."""


def build_resnet_encoder(
    arch: str = "resnet18",
    in_channels: int = 3,
    first_conv: bool = True,
    maxpool1: bool = True,
    zero_init_residual: bool = False,
) -> tuple[ResNet, int]:
    """Build a randomly initialised ResNet encoder and return ``(encoder, feature_dim)``.

    ``encoder(x)`` with x of shape (N, in_channels, H, W) returns pooled features of shape
    (N, feature_dim): 512 for resnet10/18/34, 2048 for resnet50/101/152 and wide_resnet50_2.

    Args:
        arch: one of ``RESNET_ARCHITECTURES``. ``resnet10`` is torchvision's
            ``ResNet(BasicBlock, [1, 1, 1, 1])``, a small encoder for CPU demos and tests.
        in_channels: channels of the input images, e.g. 1 for grayscale. The first conv is built
            for them directly, so grayscale data need not be repeated into fake RGB.
        first_conv: True keeps the ImageNet stem (7x7 conv, stride 2); False uses a 3x3 stride-1
            conv, the SimCLR CIFAR variant for small (28-64 px) images.
        maxpool1: True keeps the stride-2 max-pool after the stem; False replaces it with
            ``nn.Identity()`` (also the CIFAR variant).
        zero_init_residual: start the last BatchNorm of every residual branch at zero so each block
            begins as the identity (Goyal et al. 2017, arXiv:1706.02677), which helps large-batch
            training.

    No pretrained weights are ever downloaded (``weights=None``); self-supervised pretraining
    starts from scratch. See the module docstring for loading the state dict into torchvision.
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"build_resnet_encoder: unknown arch {arch!r}; choose one of {', '.join(RESNET_ARCHITECTURES)}"
        )
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(
            f"build_resnet_encoder: in_channels must be a positive int (3 for RGB, 1 for grayscale), "
            f"got {in_channels!r}"
        )
    for name, value in (("first_conv", first_conv), ("maxpool1", maxpool1), ("zero_init_residual", zero_init_residual)):
        if not isinstance(value, bool):
            raise TypeError(f"build_resnet_encoder: {name} must be True or False, got {value!r}")

    if arch == "resnet10":
        encoder = _ARCHITECTURES[arch](zero_init_residual=zero_init_residual)
    else:
        encoder = _ARCHITECTURES[arch](weights=None, zero_init_residual=zero_init_residual)

    stem_width = encoder.conv1.out_channels
    if not first_conv or in_channels != 3:
        kernel, stride, padding = (7, 2, 3) if first_conv else (3, 1, 1)
        encoder.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=kernel, stride=stride, padding=padding, bias=False)
        # Give the new conv the initialisation torchvision gives every ResNet conv, so choosing a
        # stem does not also silently choose a different init (nn.Conv2d defaults to uniform).
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")

    if not maxpool1:
        encoder.maxpool = nn.Identity()

    feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    # On small images the last stage runs at 1 x 1, where a 3 x 3 conv's backward is ~15x dearer
    # than the same arithmetic as a matrix product (models/one_pixel_conv.py): same weights, same result.
    use_one_pixel_convs(encoder)
    return encoder, feature_dim
