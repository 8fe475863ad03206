"""The agent-builder interface (see ``evergreen.agents`` for what each piece is for)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class TelemetryFamily:
    """How one of an algorithm's metrics (a key of its update metrics) is exported to Prometheus."""

    family: str
    """Full family name, e.g. ``evergreen_learner_td_error``."""
    help: str
    kind: Literal["gauge", "counter"] = "gauge"


def replay_bounds(spec: Any) -> dict[str, Any]:
    """The values a transition's columns may hold in an env described by ``spec``: what replay enforces.

    Discrete actions in ``[0, n)``; continuous actions inside the action box; finite rewards; discounts
    in ``[0, 1]``; finite float observations. A row outside them is refused at insert, naming the
    field, row and value, so a buggy or hostile writer cannot poison the learner's data.
    """
    from actors.envs import DiscreteActions
    from replay.schema import Bounds

    if isinstance(spec.actions, DiscreteActions):
        action = Bounds.index(spec.actions.n)
    else:  # one range for every dimension: the loosest of the box's bounds
        action = Bounds(low=min(spec.actions.low), high=max(spec.actions.high))
    bounds = {"action": action, "reward": Bounds(), "discount": Bounds(low=0, high=1)}
    if np.dtype(spec.observation_dtype).kind == "f":
        bounds["obs"] = bounds["next_obs"] = Bounds()
    return bounds


class AgentBuilder(Protocol):
    """Makes one algorithm's pieces for a run (built once in the driver, pickled to the processes)."""

    name: str
    networks: tuple[str, ...]
    """The algorithm's plastic networks (what interventions may target)."""
    telemetry_families: Mapping[str, TelemetryFamily]

    def replay_fields(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        """(name, dtype, shape) of every replay column, in order."""
        ...

    def replay_bounds(self) -> dict[str, Any]:
        """``replay.schema.Bounds`` per column name, for the columns whose values replay must check."""
        ...

    def make_algorithm(self, device: torch.device, parallel: Any = ...) -> Any:
        """The learner's Algorithm on ``device`` (seeded from the run config); ``parallel`` is the rank's
        ``learner.parallel.ReplicaGroup`` when the learner has several data-parallel ranks."""
        ...

    def make_policy(self, *, actor_index: int, env_steps_offset: int) -> Any:
        """Actor ``actor_index``'s Policy; its exploration schedule resumes at ``env_steps_offset``."""
        ...

    def make_eval_policy(self, network: torch.nn.Module, *, epsilon: float) -> Any:
        """The Policy the evaluation protocol acts with (near-greedy, or the deterministic action)."""
        ...

    def make_adder(self) -> Any:
        """An Adder for ``env.num_envs`` environments, writing :meth:`replay_fields`."""
        ...

    def make_diagnostics(self, algorithm: Any, probe_obs: torch.Tensor) -> dict[str, Any]:
        """Plasticity diagnostics per network name (empty when diagnostics are off)."""
        ...


class NStepReplayAgent:
    """What the builders of n-step replay agents share: interventions bound to the builder's ``networks``,
    and the replay columns, bounds and adder of n-step transitions (``actors.n_step``, ``actors.gamma``).

    A builder sets ``networks``, ``config`` (the run config) and ``spec`` (the env's spec) and inherits::

        class SACBuilder(NStepReplayAgent):
            networks = ("actor", "critic")
    """

    networks: tuple[str, ...] = ()
    config: Any
    spec: Any

    def interventions(self) -> Any:
        """A fresh set of the run's interventions, bound to the builder's networks (each intervention's
        ``networks`` option narrows that); every process builds its own."""
        from plasticity.interventions import bind_interventions

        p = self.config.plasticity
        return bind_interventions(p.interventions, p.options, networks=self.networks)

    def replay_fields(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        return self.make_adder().schema()

    def replay_bounds(self) -> dict[str, Any]:
        return replay_bounds(self.spec)

    def make_adder(self) -> Any:
        from actors.adder import NStepAdder

        a = self.config.actors
        return NStepAdder(self.spec, num_envs=self.config.env.num_envs, n=a.n_step, gamma=a.gamma)
