"""``trainer.precision: auto``: the fastest precision this process's hardware runs natively.

bf16 autocast halves the bytes of every matmul and convolution, and where the hardware has bf16
units it is the fast choice (measured here: a ResNet SimCLR step 1.6-2.2x faster than fp32 on
CPUs with AVX512-BF16/AMX, issue #20). Where bf16 is *emulated* it is the slow choice: on an
AVX2-only CPU oneDNN converts every bf16 operand to fp32 and back, and the same step runs slower
than plain fp32 (docs/BENCHMARKS.md, "The SimCLR step"). So one precision in a shipped config is
wrong on one of the two machines; ``auto`` asks the hardware:

==========================  ==============  =============================================
device                      auto resolves   why
==========================  ==============  =============================================
TPU (``PJRT_DEVICE=TPU``)   ``bf16-mixed``  the MXUs multiply bf16 natively
CUDA GPU with bf16 (sm80+)  ``bf16-mixed``  tensor cores; no loss scaling needed
CUDA GPU without bf16       ``32``          fp16 needs loss scaling; ask for ``16-mixed``
CPU with AVX512-BF16 / AMX  ``bf16-mixed``  oneDNN's native bf16 kernels
any other CPU               ``32``          bf16 would be emulated, slower than fp32
==========================  ==============  =============================================

Every choice is one of the precisions the equivalence matrix proves (fp32 and bf16-mixed).
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"


def native_cpu_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels natively (AVX512-BF16 / AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fastest_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(precision, reason) for ``trainer.precision=auto`` on the device ``accelerator`` names
    ("auto", "cpu", "gpu"/"cuda", "tpu"/"xla"), following the table in the module docstring."""
    accelerator = str(accelerator).lower()
    if accelerator in ("tpu", "xla") or (accelerator == "auto" and os.environ.get("PJRT_DEVICE", "").upper() == "TPU"):
        if os.environ.get("PJRT_DEVICE", "TPU").upper() == "TPU":
            return "bf16-mixed", "TPU: bf16 is native"
        return "32", f"XLA on {os.environ['PJRT_DEVICE']} devices: bf16 is not native there"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{torch.cuda.get_device_name()} runs bf16 natively"
        return "32", (f"{torch.cuda.get_device_name()} has no native bf16; trainer.precision=16-mixed "
                      "trains in fp16 with loss scaling")
    if native_cpu_bf16():
        return "bf16-mixed", "this CPU runs bf16 natively (AVX512-BF16/AMX)"
    return "32", "this CPU has no native bf16 (no AVX512-BF16 or AMX): emulated bf16 is slower than fp32"


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """``precision`` as given, or what ``auto`` resolves to on this hardware."""
    precision = str(precision)
    return fastest_precision(accelerator)[0] if precision == AUTO else precision
