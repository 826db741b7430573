"""Layers whose parameters an engine hands over in bf16 while the rest stays fp32.

FSDP's ``MixedPrecisionPolicy(param_dtype=bf16)`` gathers parameters in bf16 but leaves buffers
(BatchNorm's running statistics) in fp32; DeepSpeed's bf16 casts the whole module. Both broke a
real-recipe cell of the equivalence matrix before these fixes: a ResNet under FSDP bf16 died in
its first BatchNorm, CPC v2 under DeepSpeed bf16 in its context network.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import LocalCollective
from scale_ssl.collectives.global_batchnorm import GlobalBatchNorm
from scale_ssl.losses.cpc import CPCTask


def _bn_with_bf16_affine(training: bool) -> GlobalBatchNorm:
    torch.manual_seed(0)
    bn = GlobalBatchNorm(3, collective=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.1, 0.1)
    # What FSDP's bf16 param_dtype does to the parameters alone: the buffers stay fp32.
    bn.weight = nn.Parameter(bn.weight.detach().bfloat16())
    bn.bias = nn.Parameter(bn.bias.detach().bfloat16())
    return bn.train(training)


def test_plain_batchnorm_refuses_bf16_parameters_with_fp32_statistics():
    """Why the fix exists: torch's own BatchNorm does not run in this state."""
    bn = nn.BatchNorm2d(3)
    bn.weight = nn.Parameter(bn.weight.detach().bfloat16())
    bn.bias = nn.Parameter(bn.bias.detach().bfloat16())
    with pytest.raises(RuntimeError):
        bn(torch.randn(4, 3, 5, 5).bfloat16())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_batchnorm_with_bf16_parameters_equals_its_fp32_computation(training, input_dtype):
    bn = _bn_with_bf16_affine(training)
    x = torch.randn(8, 3, 5, 5).to(input_dtype).requires_grad_()
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x)
    assert y.dtype == input_dtype
    expected_mean, expected_var = mean0.clone(), var0.clone()
    expected = F.batch_norm(x.detach().float(), expected_mean, expected_var, bn.weight.detach().float(),
                            bn.bias.detach().float(), training, bn.momentum, bn.eps)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == int(training)
    y.float().square().sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
    assert bn.bias.grad.abs().sum() > 0 and x.grad is not None


def test_cpc_task_cast_to_bf16_by_an_engine_runs_and_scores_in_fp32():
    """DeepSpeed bf16 casts the task's convolutions to bf16: they run in bf16, the scores and
    the softmax in fp32, and the loss stays near the fp32 task's."""
    torch.manual_seed(3)
    task = CPCTask(6, target_dim=4, steps_to_ignore=1, steps_to_predict=2, collective=LocalCollective())
    z = torch.randn(3, 6, 4, 3)
    reference = task(z)
    task_bf16 = task.to(torch.bfloat16)
    loss = task_bf16(z.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in task_bf16.parameters())
