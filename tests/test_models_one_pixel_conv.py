"""OnePixelConv2d computes exactly what nn.Conv2d computes, in its matrix form where the output is one
pixel; a ResNet built with it trains like the plain torchvision ResNet and exports to it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from scale_ssl.models import build_resnet_encoder
from scale_ssl.models.one_pixel_conv import OnePixelConv2d, use_one_pixel_convs, use_plain_convs


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every OnePixelConv2d turned back into nn.Conv2d (the reference)."""
    plain = copy.deepcopy(module)
    use_plain_convs(plain)
    return plain


# Every kernel / stride / padding / input size a network builds (padding < kernel, input within the
# conv's reach), one-pixel outputs and larger ones alike.
SHAPES = [(k, s, p, size) for k in (1, 3, 5, 7) for s in (1, 2, 3) for p in range(k)
          for size in ((1, 1), (2, 2), (1, 2), (3, 3), (4, 4)) if min(size) + 2 * p >= k]  # fmt: skip


@pytest.mark.parametrize("kernel, stride, padding, size", SHAPES)
def test_matches_conv2d_on_every_shape_in_float64(kernel, stride, padding, size):
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, bias=True).double()
    ours = copy.deepcopy(reference)
    assert use_one_pixel_convs(ours) == 1 and type(ours) is OnePixelConv2d
    x = torch.randn(4, 6, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=0, atol=1e-12)


def test_matrix_form_is_taken_exactly_where_the_output_is_one_pixel():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    use_one_pixel_convs(conv)
    # 1x1 and 2x2 inputs with stride 2 give one pixel; a 2x2 input with stride 1 gives four.
    assert conv._one_pixel_window(1, 1) == ((1, 1), (1, 1))
    assert conv._one_pixel_window(2, 2) is None
    conv.stride = (2, 2)
    assert conv._one_pixel_window(2, 2) == ((1, 2), (1, 2))
    assert conv._one_pixel_window(3, 3) is None  # one output pixel, but the input reaches past the window


def test_grouped_dilated_and_reflect_padded_convs_are_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
    assert use_one_pixel_convs(model) == 1
    assert [type(m) for m in model] == [nn.Conv2d] * 4 + [OnePixelConv2d]


@pytest.mark.parametrize("image_size, first_conv, maxpool1", [(28, True, True), (32, True, True), (32, False, False)])
def test_resnet_trains_like_the_plain_torchvision_resnet(image_size, first_conv, maxpool1):
    """Three SGD steps in float64 through the whole encoder (BatchNorm in train mode): the same
    features, gradients and weights as the same network built from plain nn.Conv2d."""
    torch.manual_seed(0)
    encoder, _ = build_resnet_encoder("resnet10", in_channels=1, first_conv=first_conv, maxpool1=maxpool1)
    encoder = encoder.double()
    turned = sum(type(m) is OnePixelConv2d for m in encoder.modules())
    assert turned == sum(isinstance(m, nn.Conv2d) for m in encoder.modules())
    reference = _plain_copy(encoder)
    assert not any(type(m) is OnePixelConv2d for m in reference.modules())
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (encoder, reference)]
    x = torch.randn(16, 1, image_size, image_size, dtype=torch.float64)
    for step in range(3):
        features = []
        for model, optimiser in zip((encoder, reference), optimisers):
            h = model(x[step:] if step else x)
            features.append(h.detach())
            optimiser.zero_grad()
            (h.pow(2).mean() + h[:, :7].sum()).backward()
            optimiser.step()
        torch.testing.assert_close(features[0], features[1], rtol=0, atol=1e-10)
    for (name, p), q in zip(encoder.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_one_pixel_path_is_reached_in_the_small_image_resnet():
    """On 28 px images with the ImageNet stem, layer4 runs at 1x1: the matrix form is what runs there."""
    encoder, _ = build_resnet_encoder("resnet10", in_channels=1, first_conv=True, maxpool1=True)
    seen = []
    for name, module in encoder.named_modules():
        if type(module) is OnePixelConv2d:
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.append(name) if m._one_pixel_window(*args[0].shape[-2:]) else None)
    encoder(torch.randn(2, 1, 28, 28))
    assert seen == ["layer4.0.conv1", "layer4.0.conv2"]


def test_checkpoint_is_plain_torchvision_weights():
    encoder, _ = build_resnet_encoder("resnet18", in_channels=3)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(encoder.state_dict(), strict=True)
    assert set(encoder.state_dict()) == set(model.state_dict())
