"""Regularization family: weight_decay, l2, l2_init, parseval, weight_clipping.

Example::

    ivs = build_interventions("weight_decay,l2_init", {"weight_decay": {"weight_decay": 1e-4}})
    loss = td_loss + sum(l for iv in ivs if (l := iv.loss(ctx, obs=obs, features=f)) is not None)
"""

from __future__ import annotations

from typing import Any

import torch

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number, fan_in, weight_layers
from plasticity.layers import hidden_layers


def _selected(params, include_biases: bool) -> list[torch.Tensor]:
    """Trainable parameters to regularize: matrices/filters, plus 1-D tensors when ``include_biases``."""
    return [p for p in params if p.requires_grad and (include_biases or p.dim() >= 2)]


class WeightDecay(Intervention):
    """Weight decay: decoupled ``p <- p - lr * wd * p`` after each step (default), or coupled L2.

    Decoupled (AdamW-style, Loshchilov & Hutter): applied in ``after_step`` with each param group's
    current ``lr``, i.e. *after* the optimizer update (AdamW decays just before it; the difference is
    a second-order ``lr^2 * wd`` term). Coupled (``coupled=True``): ``0.5 * wd * sum ||p||^2`` is added
    to the loss, so the gradient gains ``wd * p`` and passes through Adam's normalization.
    By default only weights (tensors with >= 2 dims) decay; ``decay_biases=True`` includes biases and
    normalization gains. Frozen parameters (``requires_grad=False``) never decay. ``setup`` refuses an
    optimizer that already applies its own ``weight_decay`` (it would be applied twice).
    """

    name = "weight_decay"

    def __init__(self, *, weight_decay: float = 1e-4, coupled: bool = False, decay_biases: bool = False) -> None:
        self.weight_decay = check_number(self.name, "weight_decay", weight_decay, low=0.0)
        self.coupled = bool(coupled)
        self.decay_biases = bool(decay_biases)

    def setup(self, ctx: InterventionContext) -> None:
        for index, group in enumerate(ctx.optimizer.param_groups):
            if group.get("weight_decay", 0.0):
                raise ValueError(
                    f"{self.name}: optimizer param group {index} already has weight_decay="
                    f"{group['weight_decay']!r}; set it to 0 or drop the weight_decay intervention"
                )

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        if not self.coupled or self.weight_decay == 0.0:
            return None
        params = _selected(ctx.network.parameters(), self.decay_biases)
        return 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in params)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if self.coupled or self.weight_decay == 0.0:
            return {}
        network_params = {id(p) for p in ctx.network.parameters()}
        with torch.no_grad():
            for group in ctx.optimizer.param_groups:
                factor = 1.0 - float(group["lr"]) * self.weight_decay
                for p in _selected(group["params"], self.decay_biases):
                    if id(p) in network_params:
                        p.mul_(factor)
        return {}


class L2(Intervention):
    """L2 penalty toward zero in the loss: ``lam * sum ||W||^2`` (squared; weights only by default)."""

    name = "l2"

    def __init__(self, *, lam: float = 1e-4, include_biases: bool = False) -> None:
        self.lam = check_number(self.name, "lam", lam, low=0.0)
        self.include_biases = bool(include_biases)

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        params = _selected(ctx.network.parameters(), self.include_biases)
        return self.lam * sum(p.pow(2).sum() for p in params)


class L2Init(Intervention):
    """Regenerative regularization (Kumar et al. 2023): ``lam * sum ||theta - theta_0||^2`` (squared form).

    ``theta_0``: every trainable parameter (weights, biases, norm gains) of the network at ``setup``,
    kept by parameter name (saved in ``state_dict``). Parameters added later (e.g. an injected head)
    have no anchor and are not regularized.
    """

    name = "l2_init"

    def __init__(self, *, lam: float = 1e-3) -> None:
        self.lam = check_number(self.name, "lam", lam, low=0.0)
        self.initial: dict[str, torch.Tensor] = {}

    def setup(self, ctx: InterventionContext) -> None:
        if not self.initial:
            self.initial = {n: p.detach().clone() for n, p in ctx.network.named_parameters() if p.requires_grad}

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        total = None
        for name, param in ctx.network.named_parameters():
            anchor = self.initial.get(name)
            if anchor is not None and param.requires_grad:
                term = (param - anchor).pow(2).sum()
                total = term if total is None else total + term
        return None if total is None else self.lam * total

    def state_dict(self) -> dict[str, Any]:
        return {"initial": {k: v.clone() for k, v in self.initial.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"initial"}:
            raise ValueError(f"{self.name}: expected state keys ['initial'], got {sorted(state)}")
        self.initial = {str(k): v.detach().clone() for k, v in state["initial"].items()}


class Parseval(Intervention):
    """Parseval regularization (Chung et al. 2024): ``lam * sum_l ||W_l W_l^T - s I||_F^2``.

    Over the producers of the network's hidden layers (conv filters flattened to rows
    ``[out_channels, in_channels * kh * kw]``); output layers are not constrained.
    """

    name = "parseval"

    def __init__(self, *, lam: float = 1e-3, scale: float = 1.0) -> None:
        self.lam = check_number(self.name, "lam", lam, low=0.0)
        self.scale = check_number(self.name, "scale", scale, low=0.0, low_open=True)

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        total = None
        for layer in hidden_layers(ctx.network):
            w = layer.producer.weight.reshape(layer.producer.weight.shape[0], -1)
            gram = w @ w.t()
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = (gram - self.scale * eye).pow(2).sum()
            total = term if total is None else total + term
        return None if total is None else self.lam * total


class WeightClipping(Intervention):
    """Weight clipping (Elsayed et al. 2024): after each step clamp to ``[-kappa * b, kappa * b]``.

    ``b = 1/sqrt(fan_in)`` is the bound of PyTorch's default uniform initialization; weights and biases
    of every Linear/Conv2d are clamped (normalization gains are not). Reports the fraction of entries
    that were outside the bound before clamping.
    """

    name = "weight_clipping"

    def __init__(self, *, kappa: float = 3.0) -> None:
        self.kappa = check_number(self.name, "kappa", kappa, low=0.0, low_open=True)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        clipped = None
        total = 0
        with torch.no_grad():
            for module in weight_layers(ctx.network):
                bound = self.kappa / fan_in(module) ** 0.5
                for p in (module.weight, module.bias):
                    if p is None or not p.requires_grad:
                        continue
                    outside = (p.abs() > bound).sum()
                    clipped = outside if clipped is None else clipped + outside
                    total += p.numel()
                    p.clamp_(-bound, bound)
        if clipped is None:
            return {}
        return {f"{self.name}/clipped_fraction": float(clipped) / total}


__all__ = ["L2", "L2Init", "Parseval", "WeightClipping", "WeightDecay"]
