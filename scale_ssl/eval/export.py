"""Export a pretrained encoder as a plain state dict that loads into torchvision (ResNet or ViT).

``scale-ssl export --ckpt PATH --out encoder.pt`` writes ``torch.save(state_dict)`` of the
method's ``encoder`` (keys ``conv1.weight``, ``bn1.*``, ``layer1.0.*``, ... and no ``fc.*``: the
classifier of an SSL encoder is ``nn.Identity``), plus ``encoder.json`` beside it recording the
architecture and stem options needed to rebuild the model. It loads with ``strict=True`` into
:func:`torchvision_resnet` (torchvision's model with the same stem changes and ``fc`` replaced by
``nn.Identity``; see ``scale_ssl.models.resnet``), or with ``strict=False`` into an unmodified
torchvision model of the same stem, whose ``fc`` then stays newly initialised.

Every method with a ResNet encoder exports: SimCLR, SwAV and SimSiam name it ``arch``; MoCo v2
and BYOL ``base_encoder`` (pl_bolts' names; their momentum/target copies are not exported);
AMDIM with ``encoder=<resnet>`` (the trunk under its feature-map heads) and CPC v2 with
``encoder_name=<resnet>`` (the ResNet that encodes each patch). AMDIM's and CPC's own encoders
are not ResNets, and say so. :func:`resnet_source` holds that table.

A ViT encoder (``arch`` ``vit_<size>_<patch>``, ``scale_ssl.models.vit``) exports the same way: its
keys are torchvision's ``VisionTransformer`` keys (``conv_proj.*``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_<i>.*``, ``encoder.ln.*``; no
``heads.*``), and it loads with ``strict=True`` into ``torchvision.models.vit_b_16(weights=None,
image_size=...)`` (or the other torchvision names) with ``heads = nn.Identity()``, or into
:func:`scale_ssl.models.torchvision_vit` for every size and channel count. That model's forward
returns the class token: the encoder's features when it was trained with ``pool="cls"``.

The work is done on state dicts (:func:`encoder_state_dict`, :func:`export_encoder_state`), not on
a checkpoint file, so any source of a full module state dict can be exported. ``--ckpt`` may be
a ``.ckpt`` file or a DeepSpeed ZeRO checkpoint directory (its shards are merged into fp32 weights
in memory by ``scale_ssl.checkpoint.reader.read_checkpoint``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from scale_ssl.methods import METHODS
from scale_ssl.models import RESNET_ARCHITECTURES, build_encoder, build_resnet_encoder, is_vit_arch
from scale_ssl.models.vit import TORCHVISION_VITS
from scale_ssl.checkpoint.reader import read_checkpoint

ENCODER_PREFIX = "encoder."
# build_resnet_encoder's defaults, for checkpoints whose hyper-parameters leave some out.
_STEM_DEFAULTS = {"in_channels": 3, "first_conv": True, "maxpool1": True}


@dataclass(frozen=True)
class _ResNetSource:
    """Where a method keeps its ResNet and what its hyper-parameters call the stem options."""

    prefix: str = ENCODER_PREFIX
    arch: str = "arch"
    in_channels: str = "in_channels"
    fixed: tuple = ()  # stem options the method always builds with, e.g. (("first_conv", False),)
    defaults: tuple = ()  # the method's own defaults for options its hyper-parameters may omit


# module class -> its ResNet. The names follow each method's constructor (pl_bolts' for MoCo/BYOL).
_RESNET_SOURCES = {
    "SimCLR": _ResNetSource(),
    "SwAV": _ResNetSource(),
    "SimSiam": _ResNetSource(),
    "MoCoV2": _ResNetSource(arch="base_encoder"),
    "BYOL": _ResNetSource(arch="base_encoder"),
    "AMDIM": _ResNetSource(prefix="encoder.trunk.", arch="encoder", in_channels="image_channels",
                           defaults=(("first_conv", False), ("maxpool1", False))),
    "CPCV2": _ResNetSource(prefix="encoder.patch_encoder.", arch="encoder_name", in_channels="image_channels",
                           fixed=(("first_conv", False), ("maxpool1", False))),
}


def encoder_state_dict(model_state_dict: Mapping[str, torch.Tensor], prefix: str = ENCODER_PREFIX) -> OrderedDict:
    """The entries of a full module state dict under ``prefix`` (the online/query encoder, not a
    momentum or target copy), with the prefix removed and tensors detached onto the CPU."""
    out = OrderedDict(
        (key[len(prefix) :], value.detach().cpu().clone())
        for key, value in model_state_dict.items()
        if key.startswith(prefix)
    )
    if not out:
        roots = sorted({key.split(".")[0] for key in model_state_dict})
        raise ValueError(
            f"the state dict has no entries under {prefix!r} (it holds {roots}); export needs a module "
            f"whose pretrained encoder is its attribute 'encoder'"
        )
    return out


def resnet_source(module_class: str | None, hyper_parameters: Mapping) -> tuple[str, dict]:
    """(state-dict prefix, ``arch``/``in_channels``/``first_conv``/``maxpool1``) of the ResNet a
    checkpoint of ``module_class`` holds, from its hyper-parameters. A module class this table
    does not list is read like SimCLR (``encoder.`` and ``arch``)."""
    source = _RESNET_SOURCES.get(module_class or "", _ResNetSource())
    who = module_class or "the checkpoint's module"
    if source.arch not in hyper_parameters:
        raise ValueError(
            f"{who}'s hyper_parameters name no {source.arch!r}; export rebuilds the encoder from "
            f"{source.arch}/{source.in_channels}/first_conv/maxpool1 of a scale_ssl method checkpoint"
        )
    arch = hyper_parameters[source.arch]
    if arch not in RESNET_ARCHITECTURES:
        raise ValueError(
            f"{who} was trained with {source.arch}={arch!r}, which is not a ResNet; export writes torchvision ResNets "
            f"({', '.join(RESNET_ARCHITECTURES)}). Load the whole module with {who}.load_from_checkpoint(...) and use "
            "its .encoder instead"
        )
    defaults = {**_STEM_DEFAULTS, **dict(source.defaults)}
    options = {
        "arch": arch,
        "in_channels": hyper_parameters.get(source.in_channels, defaults["in_channels"]),
        "first_conv": hyper_parameters.get("first_conv", defaults["first_conv"]),
        "maxpool1": hyper_parameters.get("maxpool1", defaults["maxpool1"]),
    }
    options.update(dict(source.fixed))
    return source.prefix, options


def vit_source(module_class: str | None, hyper_parameters: Mapping) -> dict | None:
    """``arch``/``in_channels``/``encoder_options`` when the checkpoint's encoder is a ViT, else None."""
    source = _RESNET_SOURCES.get(module_class or "", _ResNetSource())
    arch = hyper_parameters.get(source.arch)
    if not is_vit_arch(arch):
        return None
    return {"arch": arch, "in_channels": hyper_parameters.get(source.in_channels, 3),
            "encoder_options": dict(hyper_parameters.get("encoder_options") or {})}


def torchvision_resnet(arch: str, in_channels: int = 3, first_conv: bool = True, maxpool1: bool = True) -> ResNet:
    """A plain torchvision ResNet (random init) with the stem changes ``build_resnet_encoder``
    documents and ``fc = nn.Identity()``: what an exported encoder loads into with ``strict=True``."""
    if arch == "resnet10":
        model = ResNet(BasicBlock, [1, 1, 1, 1])  # torchvision's class; it ships no resnet10 builder
    else:
        model = getattr(torchvision.models, arch)(weights=None)
    if not first_conv or in_channels != 3:
        kernel, stride, padding = (7, 2, 3) if first_conv else (3, 1, 1)
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel, stride, padding, bias=False)
    if not maxpool1:
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def export_encoder_state(
    model_state_dict: Mapping[str, torch.Tensor],
    hyper_parameters: Mapping,
    out_path: str | os.PathLike,
    metadata: Mapping | None = None,
    module_class: str | None = None,
) -> dict:
    """Write the ResNet encoder of ``model_state_dict`` (a ``module_class`` module, see
    :func:`resnet_source`) to ``out_path`` and its description to ``<out_path without
    suffix>.json``; return that description.

    The encoder is first loaded with ``strict=True`` into one rebuilt from ``hyper_parameters``, so a
    state dict that does not match the architecture fails here, not in the user's code later.
    """
    options = vit_source(module_class, hyper_parameters)
    vit = options is not None
    if vit:
        prefix = ENCODER_PREFIX
        encoder, feature_dim = build_encoder(options["arch"], in_channels=options["in_channels"],
                                             options=options["encoder_options"], owner="export")
    else:
        prefix, options = resnet_source(module_class, hyper_parameters)
        encoder, feature_dim = build_resnet_encoder(**options)
    state = encoder_state_dict(model_state_dict, prefix)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the encoder weights do not fit a {options['arch']} with {options}: "
            f"{str(error).splitlines()[0]}"
        ) from None
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)  # never leave a half-written encoder under the final name
    load = f"model.load_state_dict(torch.load({os.path.basename(out_path)!r}))"
    if vit:
        arch, channels = options["arch"], options["in_channels"]
        if arch in TORCHVISION_VITS and channels == 3:
            build = f"model = torchvision.models.{arch}(weights=None, image_size={encoder.image_size}); model.heads = torch.nn.Identity()"
        else:
            build = f"model = scale_ssl.models.torchvision_vit({arch!r}, in_channels={channels}, image_size={encoder.image_size})"
        extra = {"image_size": encoder.image_size, "patch_size": encoder.patch_size, "pool": encoder.pool,
                 "features": "the class token (torchvision's forward)" if encoder.pool == "cls" else
                             "the mean of the patch tokens: torchvision's forward returns the class token instead"}
    else:
        build = (f"model = scale_ssl.eval.export.torchvision_resnet({options['arch']!r}, in_channels={options['in_channels']}, "
                 f"first_conv={options['first_conv']}, maxpool1={options['maxpool1']})")
        extra = {}
    description = {
        **options,
        "feature_dim": feature_dim,
        "num_tensors": len(state),
        **extra,
        "load_with": f"{build}; {load}",
        **dict(metadata or {}),
    }
    with open(os.path.splitext(out_path)[0] + ".json", "w") as handle:
        json.dump(description, handle, indent=2)
    return description


def export_encoder(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, method: str | None = None) -> dict:
    """Export the encoder of a scale_ssl checkpoint (see the module docstring).

    ``method``: the checkpoint must hold this module (a config name such as ``"simclr"``, or a class
    name such as ``"MoCoV2"``);
    ``None`` accepts any module with an ``encoder``. A truncated or foreign file is a ``ValueError``.
    """
    checkpoint = read_checkpoint(ckpt_path)
    stored = checkpoint.get("module_class")
    expected = METHODS[method].__name__ if method in METHODS else method
    if method is not None and stored != expected:
        raise ValueError(
            f"checkpoint {os.fspath(ckpt_path)!r} holds a {stored} module, not {method}; "
            f"pass --method {stored} or the checkpoint of a {method} run"
        )
    metadata = {"method": stored, "source_checkpoint": os.path.abspath(ckpt_path), "global_step": checkpoint.get("global_step")}
    return export_encoder_state(checkpoint["state_dict"], checkpoint.get("hyper_parameters", {}), out_path, metadata,
                                module_class=stored)
