"""What happens to the module before the strategy wraps it: the channels-last memory format and
``torch.compile`` of its encoder, both only where the engine does not lay out or trace the model
itself (``settings.CHANNELS_LAST_STRATEGIES``, ``settings.COMPILE_STRATEGIES``)."""

from __future__ import annotations

import torch
from torch import nn

from scale_ssl.runtime.precision_choice import native_cpu_bf16
from scale_ssl.trainer.settings import CHANNELS_LAST_STRATEGIES, TrainerSettings


def prepare_module(module, settings: TrainerSettings, strategy) -> bool:
    """Convert and compile ``module`` in place as the settings ask; returns whether it is now
    channels-last. Runs before the strategy wraps the module (DDP's gradient buckets follow the
    parameters' layout) and before the optimizers exist; ``Module.to`` keeps the parameter
    objects."""
    channels_last = wants_channels_last(module, settings, strategy)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if settings.compile_model:
        compile_encoder(module)
    return channels_last


def wants_channels_last(module, settings: TrainerSettings, strategy) -> bool:
    """``channels_last`` resolved: as set, or (null) on where it is faster and nothing in the
    engine lays out parameters itself: a 2-D convolutional module under single/ddp, on a CUDA
    device (NVIDIA's guidance for convolutions on tensor cores) or under bf16-mixed on a CPU
    whose oneDNN runs bf16 natively (the hand-written bf16 + channels-last step measured 1.25 s
    against 2.01 s for ours without it on such a CPU, issue #20). Off for fp32 on a CPU,
    where it measured no faster, and where bf16 is emulated (docs/BENCHMARKS.md, "The SimCLR
    step")."""
    if settings.channels_last is not None:
        return settings.channels_last
    if strategy.name not in CHANNELS_LAST_STRATEGIES:
        return False
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return False
    device = strategy.root_device.type
    return device == "cuda" or (device == "cpu" and settings.precision_name == "bf16-mixed" and native_cpu_bf16())


def compile_encoder(module) -> None:
    """Compile ``module.encoder`` in place (``nn.Module.compile``: the module object, its
    parameters and state-dict keys stay, only its call goes through ``torch.compile``), once."""
    encoder = getattr(module, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"trainer.compile=true compiles the method's `encoder` module, and {type(module).__name__} has none; "
            "set trainer.compile=false"
        )
    if getattr(encoder, "_compiled_call_impl", None) is None:
        encoder.compile()
