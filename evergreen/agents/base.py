"""The agent-builder interface (see ``evergreen.agents`` for what each piece is for)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch


@dataclass(frozen=True)
class TelemetryFamily:
    """How one of an algorithm's metrics (a key of its update metrics) is exported to Prometheus."""

    family: str
    """Full family name, e.g. ``evergreen_learner_td_error``."""
    help: str
    kind: Literal["gauge", "counter"] = "gauge"


class AgentBuilder(Protocol):
    """Makes one algorithm's pieces for a run (built once in the driver, pickled to the processes)."""

    name: str
    networks: tuple[str, ...]
    """The algorithm's plastic networks (what interventions may target)."""
    telemetry_families: Mapping[str, TelemetryFamily]

    def replay_fields(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        """(name, dtype, shape) of every replay column, in order."""
        ...

    def make_algorithm(self, device: torch.device) -> Any:
        """The learner's Algorithm on ``device`` (seeded from the run config)."""
        ...

    def make_policy(self, *, actor_index: int, env_steps_offset: int) -> Any:
        """Actor ``actor_index``'s Policy; its exploration schedule resumes at ``env_steps_offset``."""
        ...

    def make_adder(self) -> Any:
        """An Adder for ``env.num_envs`` environments, writing :meth:`replay_fields`."""
        ...

    def make_diagnostics(self, algorithm: Any, probe_obs: torch.Tensor) -> dict[str, Any]:
        """Plasticity diagnostics per network name (empty when diagnostics are off)."""
        ...
