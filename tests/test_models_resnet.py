"""ResNet encoder stems, torchvision state-dict compatibility, and the projection head."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from scale_ssl.models import RESNET_ARCHITECTURES, ProjectionHead, build_resnet_encoder


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # These forwards are tiny: with 2 threads on a shared 2-core machine the OpenMP hand-off
    # costs ~40x the convolution itself. Restore the setting for the modules that follow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _layer4_spatial_size(encoder: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    seen = {}
    handle = encoder.layer4.register_forward_hook(lambda module, inputs, output: seen.update(shape=output.shape))
    encoder(images)
    handle.remove()
    return tuple(seen["shape"][-2:])


# Expected layer4 map size: the stem divides by 2 (7x7 s2 conv) and 2 (max-pool), layers 2-4 by 8.
@pytest.mark.parametrize(
    "image_shape, first_conv, maxpool1, layer4_size",
    [
        ((1, 28, 28), True, True, (1, 1)),
        ((1, 28, 28), True, False, (2, 2)),
        ((1, 28, 28), False, True, (2, 2)),
        ((1, 28, 28), False, False, (4, 4)),
        ((3, 32, 32), True, True, (1, 1)),
        ((3, 32, 32), True, False, (2, 2)),
        ((3, 32, 32), False, True, (2, 2)),
        ((3, 32, 32), False, False, (4, 4)),
    ],
)
def test_encoder_output_shape_and_stem_resolution(image_shape, first_conv, maxpool1, layer4_size):
    in_channels = image_shape[0]
    encoder, feature_dim = build_resnet_encoder("resnet10", in_channels=in_channels, first_conv=first_conv, maxpool1=maxpool1)
    assert isinstance(encoder, torchvision.models.ResNet)
    assert feature_dim == 512
    assert encoder.conv1.in_channels == in_channels
    assert encoder.conv1.kernel_size == ((7, 7) if first_conv else (3, 3))
    assert isinstance(encoder.maxpool, nn.MaxPool2d) is maxpool1
    images = torch.randn(2, *image_shape)
    with torch.no_grad():
        assert encoder(images).shape == (2, feature_dim)
        assert _layer4_spatial_size(encoder, images) == layer4_size


def test_resnet10_and_bottleneck_feature_dims():
    small, small_dim = build_resnet_encoder("resnet10", first_conv=False, maxpool1=False)
    assert small_dim == 512
    assert [len(getattr(small, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    big, big_dim = build_resnet_encoder("resnet50")
    assert big_dim == 2048
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)
        assert big(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    assert set(RESNET_ARCHITECTURES) == {
        "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    }


def test_zero_init_residual_zeroes_last_block_norm():
    encoder, _ = build_resnet_encoder("resnet10", zero_init_residual=True)
    assert torch.count_nonzero(encoder.layer1[0].bn2.weight) == 0
    default, _ = build_resnet_encoder("resnet10")
    assert torch.count_nonzero(default.layer1[0].bn2.weight) > 0


def test_state_dict_loads_into_torchvision_model_with_same_stem():
    torch.manual_seed(0)
    encoder, _ = build_resnet_encoder("resnet18", in_channels=1, first_conv=False, maxpool1=False)
    # Move BN running statistics off their defaults so eval outputs depend on the buffers too.
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(8, 1, 28, 28))

    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    reference.load_state_dict(encoder.state_dict(), strict=True)

    encoder.eval()
    reference.eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reference(images), encoder(images), rtol=0, atol=0)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="unknown arch 'resnet19'.*resnet10.*wide_resnet50_2"):
        build_resnet_encoder("resnet19")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(in_channels=0), ValueError, "in_channels must be a positive int"),
        (dict(in_channels=3.0), ValueError, "in_channels must be a positive int"),
        (dict(first_conv="no"), TypeError, "first_conv must be True or False"),
    ],
)
def test_encoder_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_resnet_encoder("resnet10", **kwargs)


@pytest.mark.parametrize("num_layers, batch_norm, last_bn, n_linear, n_bn", [
    (1, True, False, 1, 0),
    (2, True, False, 2, 1),
    (3, True, True, 3, 3),
    (2, False, False, 2, 0),
])
def test_projection_head_shapes_and_layers(num_layers, batch_norm, last_bn, n_linear, n_bn):
    head = ProjectionHead(512, 256, 128, num_layers=num_layers, batch_norm=batch_norm, last_bn=last_bn)
    modules = list(head.modules())
    assert sum(isinstance(m, nn.Linear) for m in modules) == n_linear
    assert sum(isinstance(m, nn.BatchNorm1d) for m in modules) == n_bn
    assert isinstance(head.layers[-1], nn.BatchNorm1d if last_bn else nn.Linear)
    # A hidden layer followed by batch norm has no (redundant) bias.
    first = head.layers[0]
    assert (first.bias is None) == (batch_norm and num_layers > 1 or last_bn and num_layers == 1)
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_projection_head_on_encoder_features():
    encoder, feature_dim = build_resnet_encoder("resnet10", first_conv=False, maxpool1=False)
    head = ProjectionHead(feature_dim, feature_dim, 64)
    assert head(encoder(torch.randn(4, 3, 32, 32))).shape == (4, 64)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_dim=0), ValueError, "input_dim must be a positive int"),
        (dict(output_dim=12.5), ValueError, "output_dim must be a positive int"),
        (dict(num_layers=0), ValueError, "num_layers must be a positive int"),
        (dict(last_bn=1), TypeError, "last_bn must be True or False"),
    ],
)
def test_projection_head_argument_errors(kwargs, error, message):
    arguments = dict(input_dim=8, hidden_dim=8, output_dim=4) | kwargs
    with pytest.raises(error, match=message):
        ProjectionHead(**arguments)


def test_projection_head_rejects_wrong_feature_width():
    with pytest.raises(ValueError, match=r"expected features of shape \(batch, 8\)"):
        ProjectionHead(8, 8, 4)(torch.randn(2, 9))
