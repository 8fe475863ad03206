"""Activation family: crelu, fourier_features, rational_activation (build-time activation overrides).

Example::

    ivs = build_interventions("crelu")
    network_overrides(ivs)                   # {"activation": "crelu"}
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from plasticity.activations import CReLU, FourierFeatures, RationalActivation
from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number
from plasticity.layers import hidden_layers


class _ActivationSwap(Intervention):
    module_type: type = torch.nn.Module
    activation_name = ""

    def network_overrides(self) -> dict[str, Any]:
        return {"activation": self.activation_name}

    def setup(self, ctx: InterventionContext) -> None:
        # Fail loudly when the network was built without the override (e.g. overrides not applied).
        layers = hidden_layers(ctx.network)
        wrong = [layer.name for layer in layers if not isinstance(layer.activation, self.module_type)]
        if not layers or wrong:
            raise ValueError(
                f"{self.name}: hidden layers {wrong or '(none found)'} do not use {self.module_type.__name__}; "
                f"build the network with network_overrides(interventions)"
            )


class CReLUActivation(_ActivationSwap):
    """CReLU activation ``[relu(x), relu(-x)]`` in every hidden layer (doubles the next layer's input)."""

    name = "crelu"
    module_type = CReLU
    activation_name = "crelu"

    def __init__(self) -> None:
        pass


class FourierActivation(_ActivationSwap):
    """Deep Fourier features ``[sin x, cos x]`` as the hidden activation (doubles the next layer's input)."""

    name = "fourier_features"
    module_type = FourierFeatures
    activation_name = "fourier"

    def __init__(self) -> None:
        pass


class RationalActivationSwap(_ActivationSwap):
    """Learnable rational activations P(x)/Q(x) (safe denominator) in every hidden layer.

    With the default degrees the override is the name ``"rational"``; other degrees give a factory
    (``functools.partial(RationalActivation, ...)``) that builds a distinct module per layer.
    """

    name = "rational_activation"
    module_type = RationalActivation
    activation_name = "rational"

    def __init__(self, *, numerator_degree: int = 5, denominator_degree: int = 4) -> None:
        self.numerator_degree = check_number(self.name, "numerator_degree", numerator_degree, low=1, integer=True)
        self.denominator_degree = check_number(
            self.name, "denominator_degree", denominator_degree, low=1, integer=True
        )

    def network_overrides(self) -> dict[str, Any]:
        if (self.numerator_degree, self.denominator_degree) == (5, 4):
            return {"activation": "rational"}
        return {"activation": functools.partial(
            RationalActivation, numerator_degree=self.numerator_degree, denominator_degree=self.denominator_degree
        )}
