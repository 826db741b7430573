"""Numeric precision of the forward pass: fp32, or mixed precision through ``torch.autocast``.

fp32 is the correctness reference; ``bf16-mixed`` runs matmuls/convolutions in bfloat16 (2.2x
faster than fp32 on this project's AVX512-bf16 CPUs) while losses compute in fp32 internally.
``16-mixed`` (fp16 with a loss scaler) exists only on CUDA devices.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")


class Precision:
    def __init__(self, precision: str | int, device: torch.device, autocast: bool = True):
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r} is not supported; use one of {PRECISIONS}")
        if precision == "16-mixed" and device.type != "cuda":
            raise ValueError(
                f"trainer.precision='16-mixed' needs a CUDA device (this run is on {device.type}); "
                "use 'bf16-mixed' or '32'"
            )
        self.precision = precision
        self.device = device
        self.autocast_enabled = autocast  # False when the strategy's engine casts (DeepSpeed)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None

    def autocast(self):
        if not self.autocast_enabled:
            return contextlib.nullcontext()
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.precision == "16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, step_fn):
        if self.scaler is None:
            return step_fn()
        out = self.scaler.step(optimizer)
        self.scaler.update()
        return out

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
