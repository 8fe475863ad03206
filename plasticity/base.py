"""The intervention interface: a few optional hooks that a learner calls at fixed points.

A learner drives interventions like this (``learner/`` does exactly this; tests do it by hand)::

    interventions = build_interventions("layer_norm,weight_decay,redo", {"redo": {"period": 1000}})
    overrides = network_overrides(interventions)       # e.g. {"norm": "layer_norm"}
    net = build_network(dataclasses.replace(net_cfg, **overrides), ...)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ctx = InterventionContext(network=net, optimizer=opt, target_network=target,
                              generator=torch.Generator().manual_seed(seed))
    for iv in interventions: iv.setup(ctx)
    for step in range(...):
        loss = td_loss + sum(iv.loss(ctx, obs=obs, features=feats) for iv in interventions)
        opt.zero_grad(); loss.backward(); opt.step()
        ctx.step += 1
        metrics = {}
        for iv in interventions: metrics.update(iv.after_step(ctx, probe_obs=probe_obs))
    # at a task switch:
    for iv in interventions: metrics.update(iv.on_task_switch(ctx))

Rules every intervention keeps:

* **Optimizer state.** Re-initializing weights also resets the optimizer state (Adam ``exp_avg``,
  ``exp_avg_sq``; ``step`` when asked) for exactly the entries touched
  (:mod:`plasticity.optim_state` does the bookkeeping).
* **Determinism across ranks.** All randomness comes from ``ctx.generator``, seeded identically on
  every DDP rank, so every rank makes the same decisions and draws the same fresh weights.
  Decisions that depend on data (e.g. which units are dormant) are taken from statistics that are
  all-reduced first through ``ctx.all_reduce_mean`` (identity outside DDP).
* **Metrics.** Hooks return flat ``{name: float}`` dicts; names are prefixed with the intervention
  name, e.g. ``redo/units_reset``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class InterventionContext:
    """What a hook may look at and change. ``step`` counts optimizer steps taken so far.

    ``network`` is the bare model (a DDP learner passes ``ddp.module`` and computes its loss through the
    wrapper). ``generator`` may live on the accelerator; interventions draw on ``generator.device``.
    An intervention that changes the module tree (plasticity injection) sets
    ``shared["network_structure_changed"] = True``: a DDP learner must re-wrap the model then.
    """

    network: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    target_network: nn.Module | None = None
    step: int = 0
    task: int = 0
    #: Averages a tensor over DDP ranks in place-free fashion; identity in a single process.
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    #: Free-form scratch space shared by interventions (e.g. the initial parameters, once).
    shared: dict[str, Any] = field(default_factory=dict)


class Intervention:
    """Base class: every hook is optional and a no-op by default.

    Subclasses set ``name`` and take their options as keyword-only constructor arguments with the
    published defaults (see ../shared/PLASTICITY.md), validated in ``__init__`` with errors that
    name the bad value.
    """

    name: str = "intervention"

    def network_overrides(self) -> dict[str, Any]:
        """Build time: fields of the learner's network config to override, e.g. ``{"norm": "layer_norm"}``.

        Keys understood by ``learner.networks.NetworkConfig``: ``norm`` ("none" | "layer_norm"),
        ``activation`` (a name, or an ``nn.Module`` factory with an ``out_multiplier`` attribute).
        """
        return {}

    def setup(self, ctx: InterventionContext) -> None:
        """Once, after the network and optimizer exist (record initial weights, build copies)."""

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        """An extra loss term added to the learner's loss (``features``: penultimate activations)."""
        return None

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        """After every optimizer step (projections, clipping, EMA; periodic resets check ``ctx.step``)."""
        return {}

    def on_task_switch(self, ctx: InterventionContext) -> dict[str, float]:
        """When the learner is told the task changed."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (utilities, ages, EMA copies); saved in learner checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected state keys {sorted(state)}")


def network_overrides(interventions: list[Intervention]) -> dict[str, Any]:
    """Merge build-time overrides; two interventions that set the same field differently are refused."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for intervention in interventions:
        for key, value in intervention.network_overrides().items():
            if key in merged and merged[key] != value:
                raise ValueError(
                    f"interventions {owner[key]!r} and {intervention.name!r} both set network {key!r} "
                    f"({merged[key]!r} vs {value!r}); choose one"
                )
            merged[key], owner[key] = value, intervention.name
    return merged
