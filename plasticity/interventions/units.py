"""Unit-level re-initialization: redo (recycle dormant neurons) and continual_backprop.

Both re-initialize individual hidden units with :func:`plasticity.interventions._common.reinit_units`:
fresh incoming weights drawn with ``ctx.generator`` (from a freshly initialized copy of the producer),
zero bias, LayerNorm gain/offset back to 1/0, zero outgoing weights in every consumer, and zeroed
optimizer moments for exactly those entries. Per-unit statistics are all-reduced over DDP ranks
(``ctx.all_reduce_mean``, one call per decision) before any unit is chosen.

Example::

    redo = ReDo(period=1000, tau=0.025)
    redo.setup(ctx)
    metrics = redo.after_step(ctx, probe_obs=probe_obs)   # every 1000 steps: {"redo/units_reset": ...}

The dormant score is :func:`plasticity.layers.unit_scores` (shared with the diagnostics).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number, reinit_units
from plasticity.layers import ActivationRecorder, HiddenLayer, hidden_layers, unit_activity, unit_scores


def layer_activities(
    ctx: InterventionContext, layers: list[HiddenLayer], obs: torch.Tensor, *, owner: str
) -> list[torch.Tensor]:
    """Per-layer ``E|h_i|`` (float64) on ``obs`` (no grad), averaged over DDP ranks with one all-reduce.

    A NaN/inf in ``obs`` makes every activity NaN before the all-reduce, so that every rank sees the
    bad input (the mean of NaN is NaN) and all make the same decision.
    """
    if obs.dim() < 1 or obs.shape[0] == 0:
        raise ValueError(f"{owner}: probe batch has 0 rows (shape {tuple(obs.shape)}); expected at least 1")
    with torch.no_grad(), ActivationRecorder(layers) as recorder:
        ctx.network(obs)
    missing = [layer.name for layer in layers if layer.name not in recorder.outputs]
    if missing:
        raise ValueError(f"{owner}: the forward pass never ran the activations of hidden layers {missing}")
    local = torch.cat([unit_activity(layer, recorder.outputs[layer.name]) for layer in layers])
    if obs.is_floating_point() and not bool(torch.isfinite(obs).all()):
        local = torch.full_like(local, float("nan"))
    reduced = ctx.all_reduce_mean(local)
    return list(torch.split(reduced, [layer.num_units for layer in layers]))


def trainable_layers(network: nn.Module) -> list[HiddenLayer]:
    """Hidden layers whose producer trains (frozen ones, e.g. an injected head's base, are left alone)."""
    return [layer for layer in hidden_layers(network) if layer.producer.weight.requires_grad]


def outgoing_weight_mass(layer: HiddenLayer) -> torch.Tensor:
    """Per unit: ``sum |w_out|`` over every consumer column / input channel that reads the unit."""
    total = torch.zeros(layer.num_units, dtype=torch.float64)
    for consumer in layer.consumers:
        w = consumer.weight.detach().abs()
        per_input = w.sum(dim=0) if isinstance(consumer, nn.Linear) else w.sum(dim=(0, 2, 3))
        # Column layout (plasticity.layers): column = j * units * spatial + i * spatial + s.
        per_input = per_input.reshape(layer.multiplier, layer.num_units, -1).sum(dim=(0, 2))
        total += per_input.to(device="cpu", dtype=torch.float64)
    return total


class ReDo(Intervention):
    """ReDo (Sokar et al. 2023): every ``period`` steps recycle units whose score ``<= tau``.

    ``score_i = E|h_i| / mean_k E|h_k|`` per layer (:func:`plasticity.layers.unit_scores`, the
    diagnostics' definition: normalized by the layer's *mean*, not its max), from a forward pass on
    ``probe_obs`` (at most ``max_probe`` rows; conv: the mean runs over batch and space; CReLU-like:
    over both halves), ``E|h|`` all-reduced before scoring. ``tau = 0`` selects only dead units
    (score exactly 0). Dormant units get fresh incoming weights, zero bias, zero outgoing weights and
    zeroed optimizer state. Only layers with a trainable producer are scored (frozen layers, e.g. an
    injected head's frozen copies, cannot recover); their consumers are zeroed whether frozen or not.
    Layers are scored first, then reset in ``hidden_layers()`` order, so a dormant unit of a consumer
    layer gets a whole fresh incoming row, including the columns that read units just recycled below.

    A NaN/inf in the probe batch or in the activations (on any rank) skips the whole reset of that
    period, since no score can be trusted, with a ``RuntimeWarning``.

    Metrics (on reset steps): ``redo/units_reset``, ``redo/dormant_fraction`` (over the scored hidden
    units, measured before resetting; NaN when skipped), ``redo/skipped_nonfinite`` (1 when skipped, else 0).
    """

    name = "redo"

    def __init__(self, *, period: int = 1000, tau: float = 0.025, max_probe: int = 2048) -> None:
        self.period = check_number(self.name, "period", period, low=1, integer=True)
        self.tau = check_number(self.name, "tau", tau, low=0.0)
        self.max_probe = check_number(self.name, "max_probe", max_probe, low=1, integer=True)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if ctx.step % self.period:
            return {}
        if probe_obs is None:
            raise ValueError(f"{self.name}: step {ctx.step} is a reset step but after_step got no probe_obs")
        layers = trainable_layers(ctx.network)
        activities = layer_activities(ctx, layers, probe_obs[: self.max_probe], owner=self.name)
        if not all(bool(torch.isfinite(a).all()) for a in activities):
            # Every score would be NaN and "NaN <= tau" is False: without this, ReDo would quietly
            # recycle nothing. Skip the period instead, and say so.
            warnings.warn(f"{self.name}: step {ctx.step}: NaN/inf in the probe batch or its activations; "
                          f"skipped this period's reset", RuntimeWarning, stacklevel=2)
            return {f"{self.name}/units_reset": 0.0, f"{self.name}/dormant_fraction": float("nan"),
                    f"{self.name}/skipped_nonfinite": 1.0}
        total_units = dormant_units = 0
        for layer, activity in zip(layers, activities, strict=True):
            dormant = torch.nonzero(unit_scores(activity) <= self.tau).reshape(-1).cpu()
            reinit_units(layer, dormant, optimizer=ctx.optimizer, generator=ctx.generator, network=ctx.network)
            total_units += layer.num_units
            dormant_units += int(dormant.numel())
        return {
            f"{self.name}/units_reset": float(dormant_units),
            f"{self.name}/dormant_fraction": dormant_units / max(total_units, 1),
            f"{self.name}/skipped_nonfinite": 0.0,
        }


class ContinualBackprop(Intervention):
    """Continual backprop (Dohare et al. 2024): replace the lowest-utility mature units every step.

    Per hidden unit, contribution utility ``u <- decay * u + (1 - decay) * E|h_i| * sum_k |w_ki|``
    (``E|h_i|`` over the *training batch*: the ``loss`` hook re-runs the network on the batch's ``obs``
    under ``no_grad`` with an :class:`ActivationRecorder`; if ``loss`` was not called since the last
    step, ``probe_obs`` is used instead). Each step every unit ages by one; in each layer the number of
    mature units (age > ``maturity``) times ``replacement_rate`` is added to an accumulator and
    ``floor(accumulator)`` units with the smallest bias-corrected utility ``u / (1 - decay^age)`` are
    replaced (fractional accumulation), then get utility 0 and age 0. NaN/inf utilities are mapped to
    0 (so they are replaced first) instead of propagating. Not done: the original's bias transfer to
    the next layer. Metrics: ``continual_backprop/units_replaced`` (this step).
    """

    name = "continual_backprop"

    def __init__(self, *, replacement_rate: float = 1e-4, decay: float = 0.99, maturity: int = 100) -> None:
        self.replacement_rate = check_number(self.name, "replacement_rate", replacement_rate, low=0.0, high=1.0)
        self.decay = check_number(self.name, "decay", decay, low=0.0, high=1.0)
        if self.decay == 1.0:
            raise ValueError(f"{self.name}: option 'decay' must be < 1 (bias correction divides by 1 - decay^age)")
        self.maturity = check_number(self.name, "maturity", maturity, low=0, integer=True)
        self.layers: dict[str, dict[str, Any]] = {}
        self._pending: list[torch.Tensor] | None = None

    def _state(self, layer: HiddenLayer) -> dict[str, Any]:
        state = self.layers.get(layer.name)
        if state is None or state["utility"].numel() != layer.num_units:
            state = {
                "utility": torch.zeros(layer.num_units, dtype=torch.float64),
                "age": torch.zeros(layer.num_units, dtype=torch.long),
                "accumulated": 0.0,
            }
            self.layers[layer.name] = state
        return state

    def loss(self, ctx: InterventionContext, *, obs: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        self._pending = layer_activities(ctx, trainable_layers(ctx.network), obs, owner=self.name)
        return None

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        layers = trainable_layers(ctx.network)
        activities, self._pending = self._pending, None
        if activities is None or len(activities) != len(layers):
            if probe_obs is None:
                raise ValueError(f"{self.name}: step {ctx.step}: no training-batch activations (loss hook not "
                                 f"called) and no probe_obs")
            activities = layer_activities(ctx, layers, probe_obs, owner=self.name)
        replaced = 0
        for layer, activity in zip(layers, activities, strict=True):
            state = self._state(layer)
            contribution = activity.detach().to("cpu", torch.float64) * outgoing_weight_mass(layer)
            utility = self.decay * state["utility"] + (1.0 - self.decay) * contribution
            state["utility"] = torch.nan_to_num(utility, nan=0.0, posinf=0.0, neginf=0.0)
            state["age"] += 1
            mature = state["age"] > self.maturity
            n_mature = int(mature.sum())
            state["accumulated"] += self.replacement_rate * n_mature
            count = min(int(state["accumulated"]), n_mature)
            state["accumulated"] -= int(state["accumulated"])
            if count == 0:
                continue
            correction = 1.0 - torch.pow(torch.tensor(self.decay, dtype=torch.float64), state["age"].double())
            corrected = state["utility"] / correction.clamp_min(1e-300)
            corrected = torch.nan_to_num(corrected, nan=0.0, posinf=0.0, neginf=0.0)
            corrected = torch.where(mature, corrected, torch.full_like(corrected, float("inf")))
            order = torch.sort(corrected, stable=True).indices
            units = order[:count]
            reinit_units(layer, units, optimizer=ctx.optimizer, generator=ctx.generator, network=ctx.network)
            state["utility"][units] = 0.0
            state["age"][units] = 0
            replaced += count
        return {f"{self.name}/units_replaced": float(replaced)}

    def state_dict(self) -> dict[str, Any]:
        return {"layers": {name: {"utility": s["utility"].clone(), "age": s["age"].clone(),
                                  "accumulated": float(s["accumulated"])} for name, s in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"layers"}:
            raise ValueError(f"{self.name}: expected state keys ['layers'], got {sorted(state)}")
        loaded = {}
        for name, entry in state["layers"].items():
            if set(entry) != {"utility", "age", "accumulated"}:
                raise ValueError(f"{self.name}: layer {name!r} state has keys {sorted(entry)}; expected "
                                 f"['accumulated', 'age', 'utility']")
            loaded[name] = {"utility": entry["utility"].to(torch.float64).clone(),
                            "age": entry["age"].to(torch.long).clone(), "accumulated": float(entry["accumulated"])}
        self.layers = loaded
