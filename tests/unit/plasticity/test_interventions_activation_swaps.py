"""crelu, fourier_features, rational_activation overrides and their setup checks."""

from __future__ import annotations

import pytest
import torch

from plasticity.activations import RationalActivation
from plasticity.interventions.activation_swaps import (
    CReLUActivation,
    FourierActivation,
    RationalActivationSwap,
)
from tests.unit.plasticity.nets import MLP, ConvNet, make_ctx


def test_overrides():
    assert CReLUActivation().network_overrides() == {"activation": "crelu"}
    assert FourierActivation().network_overrides() == {"activation": "fourier"}
    assert RationalActivationSwap().network_overrides() == {"activation": "rational"}
    factory = RationalActivationSwap(numerator_degree=3, denominator_degree=2).network_overrides()["activation"]
    a, b = factory(), factory()
    assert isinstance(a, RationalActivation) and a is not b and a.numerator.shape == (4,)


def test_setup_checks_the_network_uses_the_activation():
    CReLUActivation().setup(make_ctx(ConvNet(activation="crelu")))
    FourierActivation().setup(make_ctx(MLP(activation="fourier")))
    RationalActivationSwap().setup(make_ctx(MLP(activation="rational")))
    with pytest.raises(ValueError, match=r"hidden layers \['fc0', 'fc1'\] do not use CReLU"):
        CReLUActivation().setup(make_ctx(MLP()))


def test_crelu_conv_net_runs_with_doubled_widths():
    net = ConvNet(activation="crelu")
    assert net(torch.randn(2, 2, 9, 9)).shape == (2, 3)
    assert [layer.multiplier for layer in net.hidden_layers()] == [2, 2, 2]
