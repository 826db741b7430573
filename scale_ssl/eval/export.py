"""Export a pretrained encoder as a plain state dict that loads into torchvision (ResNet or ViT).

``scale-ssl export --ckpt PATH --out encoder.pt`` writes ``torch.save(state_dict)`` of the
method's ``encoder`` (keys ``conv1.weight``, ``bn1.*``, ``layer1.0.*``, ... and no ``fc.*``: the
classifier of an SSL encoder is ``nn.Identity``), plus ``encoder.json`` beside it recording the
architecture and stem options needed to rebuild the model. It loads with ``strict=True`` into
:func:`torchvision_resnet` (torchvision's model with the same stem changes and ``fc`` replaced by
``nn.Identity``; see ``scale_ssl.models.resnet``), or with ``strict=False`` into an unmodified
torchvision model of the same stem, whose ``fc`` then stays newly initialised.

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
from scale_ssl.models import RESNET_ARCHITECTURES, build_encoder, build_resnet_encoder, is_vit_arch
from scale_ssl.models.vit import TORCHVISION_VITS
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


def _arch(hyper_parameters: Mapping):
    # SimCLR/SwAV/SimSiam/DINO call it ``arch``, BYOL and MoCo ``base_encoder`` (pl_bolts' names).
    return hyper_parameters.get("arch", hyper_parameters.get("base_encoder"))


def vit_options(hyper_parameters: Mapping) -> dict:
    """``arch``/``in_channels``/``encoder_options`` of a ViT checkpoint's hyper-parameters."""
    return {"arch": _arch(hyper_parameters), "in_channels": hyper_parameters.get("in_channels", 3),
            "encoder_options": dict(hyper_parameters.get("encoder_options") or {})}


def stem_options(hyper_parameters: Mapping) -> dict:
    """``arch``/``in_channels``/``first_conv``/``maxpool1`` from a checkpoint's hyper-parameters."""
    if _arch(hyper_parameters) is not None and "arch" not in hyper_parameters:
        hyper_parameters = {**hyper_parameters, "arch": _arch(hyper_parameters)}
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
    vit = is_vit_arch(_arch(hyper_parameters))
    options = vit_options(hyper_parameters) if vit else stem_options(hyper_parameters)
    if vit:
        encoder, feature_dim = build_encoder(options["arch"], in_channels=options["in_channels"],
                                             options=options["encoder_options"], owner="export")
    else:
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
        **extra,
        "feature_dim": feature_dim,
        "num_tensors": len(state),
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
    return export_encoder_state(checkpoint["state_dict"], checkpoint.get("hyper_parameters", {}), out_path, metadata)
