"""Auxiliary-loss family: infer (InFeR, Lyle et al. 2022, "Understanding and preventing capacity loss").

Example::

    infer = InFeR(num_heads=10, beta=175.0, alpha=0.05)
    infer.setup(ctx)                                  # snapshot of the initial network
    loss = td_loss + infer.loss(ctx, obs=obs, features=net.features(obs))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number, fresh_parameters
from plasticity.optim_state import add_parameters


class InFeR(Intervention):
    """InFeR: ``k`` linear heads on the penultimate features regress ``beta`` x their initial outputs.

    Loss term: ``alpha * mean_{batch, heads} (g(phi_t(x)) - beta * g_0(phi_0(x)))^2`` where ``g`` are the
    trainable auxiliary heads, ``g_0`` a frozen copy of them at creation and ``phi_0`` the features of
    a frozen copy of the network at ``setup``. Defaults follow the reference table: ``k=10``,
    ``beta=175`` (from public code), ``alpha=0.05``. The heads are created at the first ``loss`` call
    (when the feature width is known), initialized from ``ctx.generator`` and added to the optimizer
    as a new param group (on ``load_state_dict`` after ``setup`` at once, so that a checkpointed
    optimizer with that group loads afterwards); their gradients pass through ``ctx.all_reduce_mean`` (a tensor hook), since
    they live outside a DDP-wrapped network. Metric: ``infer/aux_loss``.
    """

    name = "infer"

    def __init__(self, *, num_heads: int = 10, beta: float = 175.0, alpha: float = 0.05) -> None:
        self.num_heads = check_number(self.name, "num_heads", num_heads, low=1, integer=True)
        self.beta = check_number(self.name, "beta", beta)
        self.alpha = check_number(self.name, "alpha", alpha, low=0.0)
        self.initial_network: nn.Module | None = None
        self.heads: nn.Linear | None = None
        self.initial_heads: nn.Linear | None = None
        self._loaded: dict[str, Any] | None = None
        self._last = None
        self._ctx: InterventionContext | None = None

    def setup(self, ctx: InterventionContext) -> None:
        if not callable(getattr(ctx.network, "features", None)):
            raise ValueError(f"{self.name}: the network has no features(obs) method (network contract)")
        self._ctx = ctx
        self.initial_network = copy.deepcopy(ctx.network)
        for p in self.initial_network.parameters():
            p.requires_grad_(False)
        if self._loaded is not None:
            self._apply_loaded(ctx)

    def _create_heads(self, ctx: InterventionContext, feature_dim: int, like: torch.Tensor) -> None:
        heads = nn.Linear(feature_dim, self.num_heads)
        with torch.no_grad():
            for name, value in fresh_parameters(heads, ctx.generator).items():
                getattr(heads, name).copy_(value)
        heads = heads.to(device=like.device, dtype=like.dtype)
        self.initial_heads = copy.deepcopy(heads).requires_grad_(False)
        self.heads = heads
        for p in heads.parameters():
            p.register_hook(ctx.all_reduce_mean)
        add_parameters(ctx.optimizer, heads.parameters())

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        if self.initial_network is None:
            raise ValueError(f"{self.name}: loss() called before setup()")
        if self._loaded is not None:
            self._apply_loaded(ctx)
        if self.heads is None:
            self._create_heads(ctx, features.shape[1], features)
        pred = self.heads(features)
        with torch.no_grad():
            target = self.beta * self.initial_heads(self.initial_network.features(obs))
        aux = nn.functional.mse_loss(pred, target)
        self._last = aux.detach()
        return self.alpha * aux

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if self._last is None:
            return {}
        value, self._last = float(self._last), None
        return {f"{self.name}/aux_loss": value}

    def state_dict(self) -> dict[str, Any]:
        if self.initial_network is None:
            return {}
        state: dict[str, Any] = {"initial_network": {k: v.clone() for k, v in self.initial_network.state_dict().items()}}
        if self.heads is not None:
            state["heads"] = {k: v.clone() for k, v in self.heads.state_dict().items()}
            state["initial_heads"] = {k: v.clone() for k, v in self.initial_heads.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        allowed = {"initial_network", "heads", "initial_heads"}
        if not state:
            return
        if not set(state) <= allowed or "initial_network" not in state or ("heads" in state) != ("initial_heads" in state):
            raise ValueError(f"{self.name}: unexpected state keys {sorted(state)}; expected {sorted(allowed)}")
        self._loaded = state
        if self._ctx is not None:  # set up already: create the heads now, before the optimizer is loaded
            self._apply_loaded(self._ctx)

    def _apply_loaded(self, ctx: InterventionContext) -> None:
        state, self._loaded = self._loaded, None
        self.initial_network.load_state_dict(state["initial_network"])
        if "heads" in state:
            weight = state["heads"]["weight"]
            if self.heads is None:
                self._create_heads(ctx, weight.shape[1], weight)
            self.heads.load_state_dict(state["heads"])
            self.initial_heads.load_state_dict(state["initial_heads"])
