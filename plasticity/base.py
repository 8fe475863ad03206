"""The intervention interface: a few optional hooks that a learner calls at fixed points.

An algorithm names its trainable networks ("q" for DQN; "actor" and "critic" for SAC). Each
intervention acts on some of them: its ``networks`` option (default: every network the algorithm
lists as plastic, i.e. with hidden layers). :class:`InterventionSet` holds one intervention object
per (intervention, network) pair and drives the hooks; each hook sees a context whose ``network``,
``optimizer`` and ``target_network`` are that network's. A learner drives them like this
(``learner/dqn.py`` does exactly this; tests do it by hand)::

    interventions = bind_interventions("layer_norm,weight_decay,redo", {"redo": {"period": 1000}},
                                       networks=("q",))
    overrides = interventions.network_overrides("q")    # e.g. {"norm": "layer_norm"}
    net = build_network(dataclasses.replace(net_cfg, **overrides), ...)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    ctx = InterventionContext.of({"q": NetworkSlot(net, opt, target)},
                                 generator=torch.Generator().manual_seed(seed))
    interventions.setup(ctx)
    for step in range(...):
        extra, terms = interventions.loss(ctx, "q", obs=obs, features=feats)   # None if no term
        loss = td_loss + (extra if extra is not None else 0)
        opt.zero_grad(); loss.backward(); opt.step()
        ctx.step += 1
        metrics = interventions.after_step(ctx, probe_obs=probe_obs)
    # at a task switch:
    metrics.update(interventions.on_task_switch(ctx))

Rules every intervention keeps:

* **Optimizer state.** Re-initializing weights also resets the optimizer state (Adam ``exp_avg``,
  ``exp_avg_sq``; ``step`` when asked) for exactly the entries touched
  (:mod:`plasticity.optim_state` does the bookkeeping).
* **Determinism across ranks.** All randomness comes from ``ctx.generator``, seeded identically on
  every DDP rank, so every rank makes the same decisions and draws the same fresh weights.
  Decisions that depend on data (e.g. which units are dormant) are taken from statistics that are
  all-reduced first through ``ctx.all_reduce_mean`` (identity outside DDP).
* **Metrics.** Hooks return flat ``{name: float}`` dicts; names are prefixed with the intervention
  name, e.g. ``redo/units_reset`` (with several plastic networks: ``redo/critic/units_reset``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class NetworkSlot:
    """One trainable network of an algorithm, as interventions see it."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    target: nn.Module | None = None


@dataclass
class InterventionContext:
    """What a hook may look at and change. ``step`` counts optimizer steps taken so far.

    ``network``, ``optimizer`` and ``target_network`` are the network the hook acts on; ``networks``
    holds all of the algorithm's networks by name (``network_name`` is the one in front).
    :class:`InterventionSet` hands every hook a view for its network (:meth:`view`); a context built
    directly from one network (tests, the synthetic benchmark) works as a single-network context.

    ``network`` is the bare model (a DDP learner passes ``ddp.module`` and computes its loss through the
    wrapper). ``generator`` may live on the accelerator; interventions draw on ``generator.device``.
    An intervention that changes the module tree (plasticity injection) calls
    :func:`mark_structure_changed`; a learner compares :func:`structure_version` with the one it
    last saw and rebuilds what depends on the parameter set (cached parameter lists, a DDP wrapper).
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
    #: Every network of the algorithm by name; empty for a context built from one network.
    networks: dict[str, NetworkSlot] = field(default_factory=dict)
    network_name: str = ""

    @classmethod
    def of(cls, networks: Mapping[str, NetworkSlot], *, generator: torch.Generator,
           all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity) -> InterventionContext:
        """A context over named networks; the first one is in front until :meth:`view` picks another."""
        if not networks:
            raise ValueError("InterventionContext.of needs at least one network")
        name, first = next(iter(networks.items()))
        return cls(network=first.module, optimizer=first.optimizer, generator=generator,
                   target_network=first.target, all_reduce_mean=all_reduce_mean,
                   networks=dict(networks), network_name=name)

    def view(self, name: str) -> InterventionContext:
        """This context with network ``name`` in front (same step, task, generator and ``shared``)."""
        if not self.networks:
            return self
        if name not in self.networks:
            raise ValueError(f"no network {name!r}; this algorithm has {sorted(self.networks)}")
        slot = self.networks[name]
        return dataclasses.replace(self, network=slot.module, optimizer=slot.optimizer,
                                   target_network=slot.target, network_name=name)


def mark_structure_changed(ctx: InterventionContext) -> None:
    """Record that the module tree changed (parameters added, replaced or frozen)."""
    ctx.shared["structure_version"] = ctx.shared.get("structure_version", 0) + 1


def structure_version(ctx: InterventionContext) -> int:
    """How many times interventions changed the module tree so far (see :func:`mark_structure_changed`)."""
    return ctx.shared.get("structure_version", 0)


class Intervention:
    """Base class: every hook is optional and a no-op by default.

    Subclasses set ``name`` and take their options as keyword-only constructor arguments with the
    published defaults (docs/plasticity.md lists them with their sources), validated in ``__init__``
    with errors that name the bad value.
    """

    name: str = "intervention"

    def network_overrides(self) -> dict[str, Any]:
        """Build time: fields of the learner's network config to override, e.g. ``{"norm": "layer_norm"}``.

        Keys understood by ``learner.networks.NetworkConfig``: ``norm`` ("none" | "layer_norm"),
        ``activation`` (a name, or an ``nn.Module`` factory with an ``out_multiplier`` attribute),
        ``penultimate`` ("dense" | "soft_moe") with ``moe_experts``, ``moe_slots_per_expert`` and
        ``moe_expert_hidden``.
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


class InterventionSet:
    """Interventions bound to the networks they act on, driven together by an algorithm.

    Built by :func:`plasticity.interventions.bind_interventions` (names, options and each
    intervention's ``networks`` option) or directly from ``(network name, intervention)`` pairs, in
    the order the hooks run. See the module docstring for the calling sequence.
    """

    def __init__(self, bound: Sequence[tuple[str, Intervention]] = (), *, networks: Sequence[str] = ()):
        for pair in bound:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], Intervention)):
                raise ValueError(f"bound interventions must be (network name, Intervention) pairs, got {pair!r}")
        self.bound: list[tuple[str, Intervention]] = list(bound)
        #: Every network name interventions may target; metric names carry the network when > 1 is bound.
        self.networks = tuple(networks) or tuple(dict.fromkeys(n for n, _ in self.bound))
        unknown = sorted({n for n, _ in self.bound} - set(self.networks))
        if unknown:
            raise ValueError(f"interventions bound to unknown networks {unknown}; networks: {list(self.networks)}")
        # An algorithm with several networks names the network in every metric (``redo/critic/...``), so that
        # a metric keeps its name whichever networks an intervention is bound to.
        self._prefix_network = len(self.networks) > 1

    def __len__(self) -> int:
        return len(self.bound)

    def __iter__(self):
        return iter(self.bound)

    def __getitem__(self, index: int) -> Intervention:
        """The ``index``-th bound intervention object (hook order)."""
        return self.bound[index][1]

    @property
    def names(self) -> list[str]:
        """Intervention names, one per bound pair, in hook order."""
        return [iv.name for _, iv in self.bound]

    def network_overrides(self, network: str) -> dict[str, Any]:
        """Build-time network-config overrides for ``network`` (conflicts refused, naming both)."""
        return network_overrides([iv for name, iv in self.bound if name == network])

    def _metric(self, network: str, iv: Intervention, metrics: dict[str, float]) -> dict[str, float]:
        if not self._prefix_network or not metrics:
            return metrics
        prefix = f"{iv.name}/"
        return {f"{iv.name}/{network}/{k[len(prefix):]}" if k.startswith(prefix) else k: v for k, v in metrics.items()}

    def setup(self, ctx: InterventionContext) -> None:
        for network, iv in self.bound:
            iv.setup(ctx.view(network))

    def loss(self, ctx: InterventionContext, network: str, *, obs: torch.Tensor,
             features: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(sum of the extra loss terms for ``network`` or None, {metric name: detached term})."""
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for name, iv in self.bound:
            if name != network:
                continue
            term = iv.loss(ctx.view(name), obs=obs, features=features)
            if term is not None:
                total = term if total is None else total + term
                key = f"{iv.name}/{name}/loss" if self._prefix_network else f"{iv.name}/loss"
                terms[key] = term.detach().reshape(()).float()
        return total, terms

    def after_step(self, ctx: InterventionContext, *,
                   probe_obs: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Every bound intervention's ``after_step``. ``probe_obs`` is one probe batch for every network, or
        one per network name (networks read different inputs: SAC's critic reads observation and action)."""
        metrics: dict[str, float] = {}
        for network, iv in self.bound:
            probe = probe_obs.get(network) if isinstance(probe_obs, Mapping) else probe_obs
            metrics.update(self._metric(network, iv, iv.after_step(ctx.view(network), probe_obs=probe)))
        return metrics

    def on_task_switch(self, ctx: InterventionContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for network, iv in self.bound:
            metrics.update(self._metric(network, iv, iv.on_task_switch(ctx.view(network))))
        return metrics

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"name": iv.name, "network": network, "state": iv.state_dict()} for network, iv in self.bound]

    def load_state_dict(self, entries: Any) -> None:
        """Restore :meth:`state_dict` output; the list of (name, network) must match exactly."""
        if not isinstance(entries, list) or not all(
            isinstance(e, Mapping) and set(e) == {"name", "network", "state"} for e in entries
        ):
            raise ValueError(f"intervention state must be a list of {{name, network, state}} entries, got {entries!r}")
        saved = [(e["network"], e["name"]) for e in entries]
        mine = [(network, iv.name) for network, iv in self.bound]
        if saved != mine:
            raise ValueError(f"checkpoint interventions {saved} differ from this learner's {mine} (network, name)")
        for (_, iv), entry in zip(self.bound, entries, strict=True):
            iv.load_state_dict(entry["state"])
