"""``adaptive_avg_pool2d`` (the averaging-matrix form XLA traces) equals PyTorch's adaptive
average pooling, values and gradients, for sizes that divide and sizes that do not."""

import pytest
import torch
import torch.nn.functional as F

from scale_ssl.models.adaptive_pool import adaptive_avg_pool2d


@pytest.mark.parametrize("shape, size", [((7, 7), (5, 5)), ((8, 8), 7), ((9, 5), (4, 3)), ((13, 11), (5, 4)),
                                         ((6, 6), 3), ((5, 5), 1), ((3, 4), (5, 7))])
def test_equals_torch_adaptive_avg_pool_values_and_gradients(shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(F.adaptive_avg_pool2d(x, size).shape, generator=g, dtype=torch.float64)
    ours = adaptive_avg_pool2d(x, size)
    reference = F.adaptive_avg_pool2d(x, size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-14)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-14)


def test_keeps_dtype_and_device():
    x = torch.randn(1, 2, 7, 7, dtype=torch.bfloat16)
    assert adaptive_avg_pool2d(x, 5).dtype == torch.bfloat16
