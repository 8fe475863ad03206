"""Normalization family: layer_norm, nap (normalize-and-project), elr_increase.

Example::

    ivs = build_interventions("nap", {"nap": {"period": 1}})
    net = build_network(replace(cfg, **network_overrides(ivs)))   # LayerNorm before each nonlinearity
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import NORM_TYPES, ScheduledIntervention, check_number
from plasticity.layers import hidden_layers


def _require_norms(name: str, network: nn.Module) -> list:
    layers = hidden_layers(network)
    normalized = [layer for layer in layers if layer.norm is not None]
    if not normalized:
        raise ValueError(
            f"{name}: the network has no normalized hidden layers (of {len(layers)}); build it with "
            f"network_overrides(interventions), i.e. norm='layer_norm'"
        )
    return normalized


class LayerNormIntervention(Intervention):
    """LayerNorm on pre-activations before every hidden nonlinearity (a build-time override).

    ``setup`` checks that the network really has normalized hidden layers, so a learner that forgot
    to apply ``network_overrides`` fails loudly instead of silently training without LN.
    """

    name = "layer_norm"

    def __init__(self) -> None:
        pass

    def network_overrides(self) -> dict[str, Any]:
        return {"norm": "layer_norm"}

    def setup(self, ctx: InterventionContext) -> None:
        _require_norms(self.name, ctx.network)


class NormalizeAndProject(Intervention):
    """NaP: LayerNorm before nonlinearities, and weight matrices projected back to their initial norm.

    Choices (Lyle et al. 2024, "Normalization and effective learning rates"):

    * Every ``period`` steps each Linear/Conv2d weight ``W`` becomes ``rho * W / ||W||_F`` with
      ``rho`` its Frobenius norm at ``setup`` (one norm per layer, not per row).
    * Each normalization layer's gain and offset are projected *jointly*: ``v = [gain, offset]`` is
      rescaled to its initial norm (``sqrt(units)`` for a fresh LayerNorm), not each on its own.
    * Biases of Linear/Conv2d are left alone (a bias before LayerNorm only shifts the mean that LN
      removes).
    * The output layers (``network.output_layers()``) are *not* projected unless
      ``include_output=True``: nothing normalizes their output, so their norm sets the scale of the
      Q-values, and pinning it would cap ``|Q|``.
    * Targets (``targets``: module path -> norm) are kept once known: ``setup`` only records the
      norm of modules that have no target yet, so targets loaded from a checkpoint survive a later
      ``setup`` (a DDP learner or a resume path may call it after loading), and loading after
      ``setup`` replaces the recorded targets that the checkpoint has.

    Example (resume)::

        nap = NormalizeAndProject(); nap.load_state_dict(checkpoint["nap"]); nap.setup(ctx)
        nap.after_step(ctx)      # projects to the checkpoint's initial norms, not today's
    """

    name = "nap"

    def __init__(self, *, period: int = 1, include_output: bool = False) -> None:
        self.period = check_number(self.name, "period", period, low=1, integer=True)
        self.include_output = bool(include_output)
        self._weights: list[tuple[str, torch.Tensor]] = []
        self._norms: list[tuple[str, nn.Module]] = []
        self.targets: dict[str, float] = {}

    def network_overrides(self) -> dict[str, Any]:
        return {"norm": "layer_norm"}

    def setup(self, ctx: InterventionContext) -> None:
        _require_norms(self.name, ctx.network)
        outputs = getattr(ctx.network, "output_layers", None)
        excluded = set() if self.include_output or not callable(outputs) else {id(m) for m in outputs()}
        self._weights, self._norms = [], []
        for name, module in ctx.network.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in excluded:
                self._weights.append((name, module.weight))
            elif isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
                self._norms.append((name, module))
        # Per module, not all-or-nothing: a target already known (loaded from a checkpoint, or from an
        # earlier setup) is the *initial* norm and must win over the norm the module has now.
        for name, weight in self._weights:
            self.targets.setdefault(name, float(weight.detach().norm()))
        for name, module in self._norms:
            self.targets.setdefault(name, float(self._norm_vector(module).norm()))

    @staticmethod
    def _norm_vector(module: nn.Module) -> torch.Tensor:
        parts = [module.weight.detach().reshape(-1)]
        if module.bias is not None:
            parts.append(module.bias.detach().reshape(-1))
        return torch.cat(parts)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if ctx.step % self.period:
            return {}
        with torch.no_grad():
            for name, weight in self._weights:
                weight.mul_(self.targets[name] / weight.norm().clamp_min(1e-12))
            for name, module in self._norms:
                scale = self.targets[name] / self._norm_vector(module).norm().clamp_min(1e-12)
                module.weight.mul_(scale)
                if module.bias is not None:
                    module.bias.mul_(scale)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"targets": dict(self.targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"targets"}:
            raise ValueError(f"{self.name}: expected state keys ['targets'], got {sorted(state)}")
        loaded = {str(k): float(v) for k, v in state["targets"].items()}
        bad = {k: v for k, v in loaded.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"{self.name}: projection targets must be finite norms >= 0, got {bad}")
        # Loaded targets win; targets recorded by an earlier setup for modules the checkpoint lacks stay.
        self.targets = {**self.targets, **loaded}


class ELRIncrease(ScheduledIntervention):
    """Raise the effective learning rate by shrinking scale-invariant weights (Lyle et al. 2025).

    Every hidden producer followed by a normalization computes the same function after
    ``W, b <- factor * W, factor * b`` (LayerNorm removes the scale; exactly so up to LN's epsilon),
    but an Adam step of fixed size then moves it ``1/factor`` times further relative to its norm.
    Applied at each task switch (``on_task_switch``) and/or every ``period`` steps (0 = never).
    Needs a normalized network (build with ``layer_norm`` or ``nap``).
    """

    name = "elr_increase"

    def __init__(self, *, factor: float = 0.5, on_task_switch: bool = True, period: int = 0) -> None:
        self.factor = check_number(self.name, "factor", factor, low=0.0, high=1.0, low_open=True)
        self.on_switch = bool(on_task_switch)
        self.period = check_number(self.name, "period", period, low=0, integer=True)
        if not self.on_switch and self.period == 0:
            raise ValueError(f"{self.name}: never triggers (on_task_switch=False and period=0); enable one")

    def setup(self, ctx: InterventionContext) -> None:
        _require_norms(self.name, ctx.network)

    def apply(self, ctx: InterventionContext) -> dict[str, float]:
        count = 0
        with torch.no_grad():
            for layer in _require_norms(self.name, ctx.network):
                layer.producer.weight.mul_(self.factor)
                if layer.producer.bias is not None:
                    layer.producer.bias.mul_(self.factor)
                count += 1
        return {f"{self.name}/layers_scaled": float(count)}
