"""plasticity.activations: exact values, multipliers, the rational unit's guarantees, make_activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plasticity.activations import (
    ACTIVATION_NAMES,
    CReLU,
    FourierFeatures,
    RationalActivation,
    make_activation,
    out_multiplier,
)
from plasticity.layers import hidden_layers, unit_activity


def test_crelu_exact_values_and_layout():
    x = torch.tensor([[1.0, -2.0, 0.0]])
    assert CReLU()(x).tolist() == [[1.0, 0.0, 0.0, 0.0, 2.0, 0.0]]
    conv_in = torch.tensor([[[[3.0]], [[-1.0]]]])  # [1, 2, 1, 1]
    assert CReLU()(conv_in).reshape(-1).tolist() == [3.0, 0.0, 0.0, 1.0]
    assert CReLU.out_multiplier == 2 and CReLU.is_activation


def test_fourier_exact_values():
    x = torch.tensor([[0.0, torch.pi / 2]])
    y = FourierFeatures()(x)
    assert y.shape == (1, 4)
    assert torch.allclose(y, torch.tensor([[0.0, 1.0, 1.0, 0.0]]), atol=1e-7)


def test_rational_approximates_leaky_relu_without_poles():
    act = RationalActivation()
    x = torch.linspace(-3, 3, 601)
    target = torch.where(x > 0, x, 0.01 * x)
    assert (act(x) - target).abs().max().item() < 0.07
    # The safe denominator is >= 1 everywhere: finite output even for huge inputs.
    big = act(torch.tensor([-1e4, 1e4]))
    assert torch.isfinite(big).all()
    # P(0)/Q(0) = a0 exactly.
    assert act(torch.tensor([0.0])).item() == pytest.approx(act.numerator[0].item(), abs=0)


def test_rational_is_learnable_and_resets():
    act = RationalActivation()
    act(torch.linspace(-1, 1, 5)).sum().backward()
    assert act.numerator.grad is not None and act.denominator.grad is not None
    initial = act.numerator.detach().clone()
    with torch.no_grad():
        act.numerator.add_(1.0)
    act.reset_parameters()
    assert torch.equal(act.numerator.detach(), initial)


def test_rational_hand_computed_value():
    act = RationalActivation(numerator_degree=1, denominator_degree=1)
    with torch.no_grad():
        act.numerator.copy_(torch.tensor([1.0, 2.0]))  # P = 1 + 2x
        act.denominator.copy_(torch.tensor([-3.0]))  # Q = 1 + |-3x|
    assert act(torch.tensor([2.0])).item() == pytest.approx(5.0 / 7.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "5"])
def test_rational_rejects_bad_degrees(bad):
    with pytest.raises(ValueError, match="numerator_degree"):
        RationalActivation(numerator_degree=bad)


def test_make_activation_covers_every_name_with_fresh_instances():
    assert set(ACTIVATION_NAMES) == {"relu", "tanh", "gelu", "elu", "leaky_relu", "crelu", "fourier", "rational"}
    x = torch.randn(2, 3)
    for name in ACTIVATION_NAMES:
        a, b = make_activation(name), make_activation(name)
        assert a is not b
        expected_width = 6 if name in ("crelu", "fourier") else 3
        assert a(x).shape == (2, expected_width)
        assert out_multiplier(a) == (2 if name in ("crelu", "fourier") else 1)
    assert make_activation("leaky_relu").negative_slope == 0.01


@pytest.mark.parametrize("bad", ["swish", "", None, 3])
def test_make_activation_rejects_unknown(bad):
    with pytest.raises(ValueError, match="expected one of relu"):
        make_activation(bad)


def test_hidden_layer_inference_and_unit_activity_with_crelu():
    net = nn.Sequential(nn.Linear(2, 3), CReLU(), nn.Linear(6, 1))
    (layer,) = hidden_layers(net)
    assert layer.multiplier == 2 and layer.num_units == 3
    out = torch.tensor([[1.0, 0.0, 2.0, 0.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 6.0]])
    # unit i: mean over batch and both halves of |h|: unit0 (1+0+3+0)/4, unit1 (0+4+0+0)/4, unit2 (2+0+0+6)/4
    assert unit_activity(layer, out).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="does not have 6"):
        unit_activity(layer, out[:, :3])
