"""Export a pretrained encoder as a plain state dict that loads into a torchvision ResNet.

``scale-ssl export --ckpt PATH --out encoder.pt`` writes ``torch.save(state_dict)`` of the
method's ``encoder`` (keys ``conv1.weight``, ``bn1.*``, ``layer1.0.*``, ... and no ``fc.*``: the
classifier of an SSL encoder is ``nn.Identity``), plus ``encoder.json`` beside it recording the
architecture and stem options needed to rebuild the model. It loads with ``strict=True`` into
:func:`torchvision_resnet` (torchvision's model with the same stem changes and ``fc`` replaced by
``nn.Identity``; see ``scale_ssl.models.resnet``), or with ``strict=False`` into an unmodified
torchvision model of the same stem, whose ``fc`` then stays newly initialised.

The work is done on state dicts (:func:`encoder_state_dict`, :func:`export_encoder_state`), not on
a checkpoint file, so any source of a full module state dict can be exported. ``--ckpt`` may be
a ``.ckpt`` file or a DeepSpeed ZeRO checkpoint directory (its shards are merged into fp32 weights
in memory by ``scale_ssl.strategies.checkpoint_reader.read_checkpoint``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from scale_ssl.methods import METHODS
from scale_ssl.models import RESNET_ARCHITECTURES, build_resnet_encoder
from scale_ssl.strategies.checkpoint_reader import read_checkpoint

ENCODER_PREFIX = "encoder."
STEM_KEYS = ("arch", "in_channels", "first_conv", "maxpool1")
# build_resnet_encoder's defaults, for checkpoints whose hyper-parameters leave some out.
_STEM_DEFAULTS = {"in_channels": 3, "first_conv": True, "maxpool1": True}


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


def stem_options(hyper_parameters: Mapping) -> dict:
    """``arch``/``in_channels``/``first_conv``/``maxpool1`` from a checkpoint's hyper-parameters."""
    if "arch" not in hyper_parameters:
        raise ValueError(
            "the checkpoint's hyper_parameters name no 'arch'; export rebuilds the encoder from "
            "arch/in_channels/first_conv/maxpool1 of a scale_ssl method checkpoint"
        )
    options = {key: hyper_parameters.get(key, _STEM_DEFAULTS.get(key)) for key in STEM_KEYS}
    if options["arch"] not in RESNET_ARCHITECTURES:
        raise ValueError(f"arch={options['arch']!r} is not a ResNet export knows; one of {RESNET_ARCHITECTURES}")
    return options


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
    prefix: str = ENCODER_PREFIX,
) -> dict:
    """Write the encoder of ``model_state_dict`` to ``out_path`` and its description to
    ``<out_path without suffix>.json``; return that description.

    The encoder is first loaded with ``strict=True`` into one rebuilt from ``hyper_parameters``, so a
    state dict that does not match the architecture fails here, not in the user's code later.
    """
    state = encoder_state_dict(model_state_dict, prefix)
    options = stem_options(hyper_parameters)
    encoder, feature_dim = build_resnet_encoder(**options)
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
    description = {
        **options,
        "feature_dim": feature_dim,
        "num_tensors": len(state),
        "load_with": (
            f"model = scale_ssl.eval.export.torchvision_resnet({options['arch']!r}, in_channels={options['in_channels']}, "
            f"first_conv={options['first_conv']}, maxpool1={options['maxpool1']}); "
            f"model.load_state_dict(torch.load({os.path.basename(out_path)!r}))"
        ),
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
    return export_encoder_state(checkpoint["state_dict"], checkpoint.get("hyper_parameters", {}), out_path, metadata)
