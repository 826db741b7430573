"""``Trainer(channels_last=...)``: where it turns on by default, that it trains the same model,
and that its checkpoints load into a module in the default layout."""

from __future__ import annotations

import pytest
import torch

from scale_ssl.methods import SimCLR
from scale_ssl.trainer import Trainer
from scale_ssl.trainer.model_preparation import native_cpu_bf16


def tiny_simclr() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(arch="resnet10", first_conv=False, maxpool1=False, hidden_mlp=32, feat_dim=16, optimizer="sgd",
                  learning_rate=0.1, warmup_steps=1)


class Batches:
    def __init__(self, steps: int):
        g = torch.Generator().manual_seed(1)
        self.batch = ((torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)),
                      torch.zeros(8, dtype=torch.long))
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def conv_weights_channels_last(module) -> bool:
    # (1x1 kernels are contiguous in both layouts, so only larger ones can tell them apart)
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight[0, 0].numel() > 1]
    return all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)


def fit(tmp_path, steps=3, **options):
    module = tiny_simclr()
    trainer = Trainer(strategy="single", max_steps=steps, logger=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path), **options)
    trainer.fit(module, Batches(steps))
    return trainer, module


@pytest.mark.parametrize("options, expected", [
    ({}, False),                                              # fp32 on a CPU: measured no faster
    # oneDNN's native bf16 convolutions want it; where bf16 is emulated it stays off
    ({"precision": "bf16-mixed"}, native_cpu_bf16()),
    ({"precision": "bf16-mixed", "channels_last": False}, False),
    ({"channels_last": True}, True),
])
def test_default_is_on_where_it_measured_faster(tmp_path, options, expected):
    trainer, module = fit(tmp_path, steps=1, **options)
    assert trainer.channels_last is expected
    assert conv_weights_channels_last(module.encoder) is expected


def test_strategies_that_lay_out_parameters_themselves_refuse_it():
    with pytest.raises(ValueError, match="channels_last=true is supported with"):
        Trainer(strategy="dp", strategy_options={"devices": 2}, channels_last=True, logger=False)


def test_channels_last_trains_the_same_model_and_its_checkpoint_loads_anywhere(tmp_path):
    """Layout only: a step gives the same weights (to float rounding: the convolution kernels sum
    in another order; over several steps of this tiny, high-lr model the rounding grows
    chaotically, so one step is compared), and the checkpoint restores into a module in the
    default layout."""
    _, plain = fit(tmp_path / "plain", steps=1, channels_last=False)
    trainer, last = fit(tmp_path / "last", steps=1, channels_last=True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), last.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    restored = SimCLR.load_from_checkpoint(str(tmp_path / "last" / "checkpoints" / "last.ckpt"))
    assert not conv_weights_channels_last(restored.encoder)
    for (name, a), (_, b) in zip(restored.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_on_a_cpu_without_native_bf16_says_fp32_is_faster(tmp_path):
    """Every shipped config asks for bf16-mixed; where oneDNN emulates bf16 that is the slow choice,
    and the user is told so (once, as a warning) rather than left to find out."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, steps=1, precision="bf16-mixed")
    said = any("bf16 is emulated" in str(w.message) for w in caught)
    assert said is (not native_cpu_bf16())
