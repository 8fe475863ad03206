"""Activation modules for plastic networks, and ``make_activation`` for every activation name.

Every module here sets ``is_activation = True`` (so :func:`plasticity.layers.hidden_layers` finds it)
and ``out_multiplier``: how many values each unit emits. Modules with ``out_multiplier = 2``
concatenate two functions of the pre-activation along the unit axis (dim 1), ``[f(x), g(x)]``, so
value ``j * units + i`` belongs to unit ``i`` (the column layout of :mod:`plasticity.layers`).

Example::

    act = make_activation("crelu")             # CReLU(), out_multiplier 2
    y = act(torch.randn(8, 16))                # [8, 32]
    make_activation("rational")(x)             # learnable P(x)/Q(x), degrees 5/4
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


class CReLU(nn.Module):
    """Concatenated ReLU ``[relu(x), relu(-x)]`` along dim 1 (Shang et al. 2016; Abbas et al. 2023).

    No unit can be dead: for any ``x != 0`` one half is positive.
    """

    is_activation = True
    out_multiplier = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=1)


class FourierFeatures(nn.Module):
    """Deep Fourier features: ``[sin x, cos x]`` along dim 1 (Lewandowski et al. 2024)."""

    is_activation = True
    out_multiplier = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sin(x), torch.cos(x)], dim=1)


@functools.lru_cache(maxsize=8)
def _leaky_relu_fit(numerator_degree: int, denominator_degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients of P/Q approximating LeakyReLU(0.01) on [-3, 3].

    Linearised least squares (``P(x) - y * sum_j b_j x^j = y``), the usual Padé initialisation;
    for (5, 4) the odd denominator coefficients vanish and the even ones are positive, so
    ``1 + |sum_j b_j x^j|`` equals the fitted ``Q`` (max error about 0.064 on the grid).
    """
    x = np.linspace(-3.0, 3.0, 2001)
    y = np.where(x > 0, x, 0.01 * x)
    design = np.concatenate(
        [x[:, None] ** np.arange(numerator_degree + 1), -y[:, None] * x[:, None] ** np.arange(1, denominator_degree + 1)],
        axis=1,
    )
    coeffs, *_ = np.linalg.lstsq(design, y, rcond=None)
    return tuple(coeffs[: numerator_degree + 1].tolist()), tuple(coeffs[numerator_degree + 1 :].tolist())


class RationalActivation(nn.Module):
    """Learnable rational activation ``P(x) / Q(x)`` (Molina et al. 2020; Delfosse et al. 2024).

    Variant: the *safe* Padé unit, ``Q(x) = 1 + |b_1 x + ... + b_n x^n|``, so ``Q >= 1`` and the
    function has no poles; with ``m = n + 1`` it grows at most linearly for large ``|x|``, which bounds
    the output scale. One set of coefficients per module (shared by all units of the layer),
    initialised to approximate LeakyReLU(0.01). ``reset_parameters`` restores that initialisation.

    Example::

        act = RationalActivation(numerator_degree=5, denominator_degree=4)
        y = act(torch.linspace(-2, 2, 5))
    """

    is_activation = True
    out_multiplier = 1

    def __init__(self, *, numerator_degree: int = 5, denominator_degree: int = 4):
        super().__init__()
        for label, degree in (("numerator_degree", numerator_degree), ("denominator_degree", denominator_degree)):
            if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
                raise ValueError(f"RationalActivation: {label} must be an int >= 1, got {degree!r}")
        self.numerator_degree = numerator_degree
        self.denominator_degree = denominator_degree
        self.numerator = nn.Parameter(torch.zeros(numerator_degree + 1))
        self.denominator = nn.Parameter(torch.zeros(denominator_degree))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        num, den = _leaky_relu_fit(self.numerator_degree, self.denominator_degree)
        with torch.no_grad():
            self.numerator.copy_(torch.tensor(num, dtype=self.numerator.dtype))
            self.denominator.copy_(torch.tensor(den, dtype=self.denominator.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Horner's scheme: fewer ops and better conditioned than explicit powers.
        p = torch.zeros_like(x) + self.numerator[-1]
        for coefficient in self.numerator.flip(0)[1:]:
            p = p * x + coefficient
        q = torch.zeros_like(x) + self.denominator[-1]
        for coefficient in self.denominator.flip(0)[1:]:
            q = q * x + coefficient
        q = q * x  # the denominator polynomial has no constant term: b_1 x + ... + b_n x^n
        return p / (1.0 + q.abs())

    def extra_repr(self) -> str:
        return f"numerator_degree={self.numerator_degree}, denominator_degree={self.denominator_degree}"


_FACTORIES = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": functools.partial(nn.LeakyReLU, negative_slope=0.01),
    "crelu": CReLU,
    "fourier": FourierFeatures,
    "rational": RationalActivation,
}

#: Names understood by :func:`make_activation` (and by ``NetworkConfig.activation``).
ACTIVATION_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATION_NAMES`).

    Each call returns a new instance, because hooks and learnable coefficients are per module.
    """
    factory = _FACTORIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATION_NAMES)}")
    return factory()


def out_multiplier(module: nn.Module) -> int:
    """How many values per unit ``module`` emits (1 unless it declares ``out_multiplier``)."""
    value = getattr(module, "out_multiplier", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(module).__name__}.out_multiplier must be an int >= 1, got {value!r}")
    return value


__all__ = [
    "ACTIVATION_NAMES",
    "CReLU",
    "FourierFeatures",
    "RationalActivation",
    "make_activation",
    "out_multiplier",
]
