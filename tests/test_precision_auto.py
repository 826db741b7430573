"""trainer.precision=auto: bf16-mixed where the hardware runs bf16 natively, fp32 where bf16 would
be emulated; resolved once when the config is loaded (and by the Trainer for the Python API)."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.config import load_config
from scale_ssl.config.load import ConfigError
from scale_ssl.runtime import precision_choice
from scale_ssl.runtime.precision_choice import fastest_precision, resolve_precision
from scale_ssl.trainer import Trainer

CONFIG = "configs/simclr/fmnist_cpu.yaml"


def this_cpu_expects() -> str:
    # Asked of oneDNN directly, not through the function under test.
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32"


def test_auto_on_this_cpu_follows_onednn(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    precision, reason = fastest_precision("cpu")
    assert precision == this_cpu_expects()
    assert ("natively" in reason) == (precision == "bf16-mixed") and reason


def test_explicit_precision_is_kept():
    for precision in ("32", "bf16-mixed", "16-mixed", 32):
        assert resolve_precision(precision) == str(precision)


@pytest.mark.parametrize(
    "pjrt, cuda, cuda_bf16, cpu_bf16, accelerator, expected",
    [
        ("TPU", False, False, False, "auto", "bf16-mixed"),  # a TPU host's CPU does not matter
        ("TPU", False, False, False, "tpu", "bf16-mixed"),
        ("CPU", False, False, True, "xla", "32"),  # XLA on CPU devices: not a TPU
        (None, True, True, False, "auto", "bf16-mixed"),  # A100/H100
        (None, True, False, True, "gpu", "32"),  # V100: fp16 only with loss scaling, asked for explicitly
        (None, True, True, False, "cpu", "32"),  # a GPU present but the run asks for the CPU
        (None, True, True, True, "cpu", "bf16-mixed"),
        (None, False, False, True, "auto", "bf16-mixed"),  # Sapphire Rapids: AMX
        (None, False, False, False, "auto", "32"),  # AVX2 only: bf16 emulated
    ],
)
def test_decision_table(monkeypatch, pjrt, cuda, cuda_bf16, cpu_bf16, accelerator, expected):
    # The hardware probes are replaced (this machine has one CPU kind and no GPU or TPU); the
    # decision under test is the table in precision_choice's docstring.
    if pjrt is None:
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("PJRT_DEVICE", pjrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU0")
    monkeypatch.setattr(precision_choice, "native_cpu_bf16", lambda: cpu_bf16)
    assert fastest_precision(accelerator)[0] == expected


def test_config_resolves_auto_once_when_loaded(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    config = load_config(CONFIG, ["trainer.precision=auto"])
    assert config.trainer.precision == this_cpu_expects()
    assert load_config(CONFIG, ["trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"
    # The schema's default is auto too.
    assert load_config(None, ["method=simclr", "trainer.max_steps=1"]).trainer.precision == this_cpu_expects()


def test_unknown_precision_names_auto_in_the_fix():
    with pytest.raises(ConfigError, match=r"trainer.precision='bf17'.*'auto'"):
        load_config(CONFIG, ["trainer.precision=bf17"])


def test_trainer_resolves_auto(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    trainer = Trainer(precision="auto", max_steps=1, logger=False, enable_progress_bar=False)
    assert trainer.settings.precision_name == this_cpu_expects()
