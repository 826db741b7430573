"""``ImagePatches`` (index_select, so it traces under torch_xla) cuts exactly the patches
``Tensor.unfold`` cuts: patch (i, j) of image n is x[n, :, i*s : i*s + p, j*s : j*s + p]."""

import pytest
import torch

from scale_ssl.data.patches import ImagePatches


@pytest.mark.parametrize("image_size, patch_size, overlap", [(28, 8, 4), (32, 8, 4), (16, 4, 0), (9, 3, 1)])
def test_patches_equal_unfold_and_gradients_flow(image_size, patch_size, overlap):
    x = torch.randn(3, 2, image_size, image_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    patches = ImagePatches(image_size, patch_size, overlap)(x)
    s = patch_size - overlap
    expected = x.unfold(2, patch_size, s).unfold(3, patch_size, s).permute(0, 2, 3, 1, 4, 5)
    assert torch.equal(patches, expected)
    g = patches.shape[1]
    i, j = g - 1, g // 2
    assert torch.equal(patches[1, i, j], x[1, :, i * s:i * s + patch_size, j * s:j * s + patch_size])
    (grad,) = torch.autograd.grad(patches.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert torch.equal(grad, expected_grad)  # every pixel counted once per patch it is in


def test_a_single_image_gives_one_grid():
    image = torch.randn(1, 28, 28)
    assert ImagePatches(28, 8, 4)(image).shape == (6, 6, 1, 8, 8)
