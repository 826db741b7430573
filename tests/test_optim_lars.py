"""LARS against its formula, against plain SGD for excluded parameters, and parameter grouping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scale_ssl.models import ProjectionHead, build_resnet_encoder
from scale_ssl.optim import LARS, exclude_bn_bias_groups

LR, MOMENTUM, WEIGHT_DECAY, ETA = 0.5, 0.9, 0.01, 0.02


def _toy_layer() -> nn.Linear:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||W|| = 5
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    return layer


def _set_gradients(layer: nn.Linear, weight_grad, bias_grad) -> None:
    layer.weight.grad = torch.tensor(weight_grad)
    layer.bias.grad = torch.tensor(bias_grad)


def test_adapted_weight_follows_trust_ratio_formula_over_two_steps():
    layer = _toy_layer()
    optimizer = LARS(
        [
            {"params": [layer.weight]},
            {"params": [layer.bias], "weight_decay": 0.0, "lars_adaptation": False},
        ],
        lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA,
    )
    w0 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    g0 = torch.tensor([[0.0, 0.97], [0.0, -0.04]])

    # Step 1 by hand: g' = g + wd*W = [[0.03, 0.97], [0, 0]]; ||g'|| = sqrt(0.0009 + 0.9409)
    decayed = torch.tensor([[0.03, 0.97], [0.0, 0.0]])
    trust = ETA * 5.0 / (0.03**2 + 0.97**2) ** 0.5
    buffer = trust * decayed
    w1 = w0 - LR * buffer
    _set_gradients(layer, g0.tolist(), [0.0, 0.0])
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), w1)
    assert trust != pytest.approx(1.0, abs=0.5)  # the step is visibly not plain SGD

    # Step 2 with the same gradient: momentum accumulates the new trust-scaled update.
    decayed2 = g0 + WEIGHT_DECAY * w1
    trust2 = ETA * torch.linalg.vector_norm(w1) / torch.linalg.vector_norm(decayed2)
    buffer = MOMENTUM * buffer + trust2 * decayed2
    w2 = w1 - LR * buffer
    _set_gradients(layer, g0.tolist(), [0.0, 0.0])
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), w2)
    torch.testing.assert_close(optimizer.state[layer.weight]["momentum_buffer"], buffer)


def test_trust_ratio_is_one_when_a_norm_is_zero():
    zero_param = nn.Parameter(torch.zeros(2, 2))
    still_param = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([zero_param, still_param], lr=LR, momentum=0.0, eta=ETA)
    zero_param.grad = torch.full((2, 2), 2.0)
    still_param.grad = torch.zeros(2, 2)
    optimizer.step()
    torch.testing.assert_close(zero_param.detach(), torch.full((2, 2), -LR * 2.0))
    torch.testing.assert_close(still_param.detach(), torch.ones(2, 2))


def _plain_sgd_reference(nesterov: bool) -> list[torch.Tensor]:
    layer = _toy_layer()
    optimizer = torch.optim.SGD([layer.bias], lr=LR, momentum=MOMENTUM, nesterov=nesterov)
    history = []
    for step in range(3):
        layer.bias.grad = torch.tensor([0.3 * (step + 1), -0.1])
        optimizer.step()
        history.append(layer.bias.detach().clone())
    return history


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("exclusion", ["group", "callable"])
def test_excluded_parameters_follow_sgd_with_momentum_and_no_decay(exclusion, nesterov):
    layer = _toy_layer()
    if exclusion == "group":
        optimizer = LARS(
            [
                {"params": [layer.weight]},
                {"params": [layer.bias], "weight_decay": 0.0, "lars_adaptation": False},
            ],
            lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA, nesterov=nesterov,
        )
    else:
        optimizer = LARS(
            layer.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA, nesterov=nesterov,
            exclude_from_adaptation=lambda p: p.ndim == 1,
        )
    history = []
    for step in range(3):
        _set_gradients(layer, [[0.1, 0.2], [0.3, 0.4]], [0.3 * (step + 1), -0.1])
        optimizer.step()
        history.append(layer.bias.detach().clone())
    for ours, reference in zip(history, _plain_sgd_reference(nesterov)):
        torch.testing.assert_close(ours, reference)


def test_state_dict_round_trip_resumes_identically():
    def gradients(step: int):
        return [[0.1 * step, -0.2], [0.05, 0.3]], [0.2, -0.1 * step]

    def make():
        layer = _toy_layer()
        groups = exclude_bn_bias_groups(layer.named_parameters(), WEIGHT_DECAY)
        return layer, LARS(groups, lr=LR, momentum=MOMENTUM, eta=ETA, nesterov=True)

    straight, straight_optimizer = make()
    for step in range(1, 5):
        _set_gradients(straight, *gradients(step))
        straight_optimizer.step()

    first, first_optimizer = make()
    for step in range(1, 3):
        _set_gradients(first, *gradients(step))
        first_optimizer.step()
    saved_model, saved_optimizer = first.state_dict(), first_optimizer.state_dict()

    resumed, resumed_optimizer = make()
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.param_groups[1]["lars_adaptation"] is False
    for step in range(3, 5):
        _set_gradients(resumed, *gradients(step))
        resumed_optimizer.step()

    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, straight.bias, rtol=0, atol=0)


def test_closure_is_evaluated_with_gradients_and_its_loss_returned():
    layer = _toy_layer()
    optimizer = LARS(layer.parameters(), lr=LR)
    inputs = torch.tensor([[1.0, 2.0]])

    def closure():
        optimizer.zero_grad()
        loss = layer(inputs).pow(2).sum()
        loss.backward()
        return loss

    before = layer.weight.detach().clone()
    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(((before @ inputs.T).squeeze() + torch.tensor([1.0, -1.0])).pow(2).sum().item())
    assert not torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(lr=-0.1), ValueError, "lr must be >= 0"),
        (dict(lr=0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(lr=0.1, weight_decay=-1e-6), ValueError, "weight_decay must be >= 0"),
        (dict(lr=0.1, eta=0.0), ValueError, "eta must be > 0"),
        (dict(lr=0.1, momentum=0.0, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
        (dict(lr=0.1, exclude_from_adaptation=("bias",)), TypeError, "exclude_from_adaptation must be None or a callable"),
    ],
)
def test_lars_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


def test_lars_group_errors_name_the_group():
    params = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError, match="param group 1: lars_adaptation must be True or False"):
        LARS([{"params": [params[0]]}, {"params": [params[1]], "lars_adaptation": "no"}], lr=0.1)


def _small_model() -> nn.Module:
    encoder, feature_dim = build_resnet_encoder("resnet10")
    return nn.Sequential(encoder, ProjectionHead(feature_dim, 64, 32))


def test_exclude_bn_bias_groups_partitions_every_trainable_parameter():
    model = _small_model()
    model[0].conv1.weight.requires_grad_(False)  # a frozen stem is left to no group
    decayed, excluded = exclude_bn_bias_groups(model.named_parameters(), weight_decay=1e-6)

    decayed_ids = [id(p) for p in decayed["params"]]
    excluded_ids = [id(p) for p in excluded["params"]]
    trainable_ids = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(decayed_ids + excluded_ids) == sorted(trainable_ids)  # each exactly once
    assert id(model[0].conv1.weight) not in decayed_ids + excluded_ids

    assert (decayed["weight_decay"], decayed["lars_adaptation"]) == (1e-6, True)
    assert (excluded["weight_decay"], excluded["lars_adaptation"]) == (0.0, False)
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim == 1 for p in excluded["params"])
    names = {id(p): name for name, p in model.named_parameters()}
    assert any("downsample.1" in names[i] for i in excluded_ids)  # BN caught by shape, not name
    LARS([decayed, excluded], lr=0.1)  # the groups are valid LARS groups


def test_exclude_bn_bias_groups_skips_by_name_and_deduplicates_tied_weights():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 4))
    named = list(model.named_parameters()) + [("tied.weight", model.body.weight)]
    decayed, excluded = exclude_bn_bias_groups(named, 0.1, skip_list=("bias", "head"))
    assert [id(p) for p in decayed["params"]] == [id(model.body.weight)]
    assert {id(p) for p in excluded["params"]} == {id(model.body.bias), id(model.head.weight), id(model.head.bias)}


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: exclude_bn_bias_groups(m.parameters(), 0.1), TypeError, r"pass model.named_parameters\(\)"),
        (lambda m: exclude_bn_bias_groups(m.named_parameters(), -0.1), ValueError, "weight_decay must be a number >= 0"),
        (lambda m: exclude_bn_bias_groups(m.named_parameters(), 0.1, skip_list="bn"), TypeError, "letter by letter"),
    ],
)
def test_exclude_bn_bias_groups_argument_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(nn.Linear(2, 2))
