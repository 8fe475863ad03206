"""Agent builders: everything that is specific to one algorithm, made in one module per algorithm.

A builder takes the run config and the env's spec and makes the pieces the trainer connects:

* ``replay_fields()``: the replay table's columns (what the adder writes);
* ``make_algorithm(device)``: the learner-side :class:`learner.core.Algorithm`, with the run's
  plasticity interventions bound to its networks;
* ``make_policy(actor_index, env_steps_offset)`` and ``make_adder()``: the actors' ``Policy``
  (acting network + exploration) and ``Adder``;
* ``make_diagnostics(algorithm, probe_obs)``: plasticity diagnostics per network, measuring the
  loss the algorithm trains and its own notion of the policy;
* ``telemetry_families``: the Prometheus families of the algorithm's own metrics.

Adding an algorithm is one builder module here, its config section in ``evergreen/config.py``
(validated by the builder), a registry entry below and a preset in ``configs/``.

Example::

    builder = make_builder(config, env_spec(config.env))     # config.algorithm == "dqn"
    algorithm = builder.make_algorithm(torch.device("cpu"))
    policy, adder = builder.make_policy(actor_index=0, env_steps_offset=0), builder.make_adder()
"""

from __future__ import annotations

from typing import Any

from evergreen.agents.base import AgentBuilder, TelemetryFamily
from evergreen.agents.dqn import DQNBuilder
from evergreen.agents.sac import SACBuilder

#: algorithm name (``RunConfig.algorithm``) -> builder class.
AGENTS: dict[str, type] = {"dqn": DQNBuilder, "sac": SACBuilder}


def make_builder(config: Any, spec: Any) -> AgentBuilder:
    """The builder of ``config.algorithm`` for an env described by ``spec``."""
    try:
        cls = AGENTS[config.algorithm]
    except KeyError:
        raise ValueError(f"algorithm = {config.algorithm!r} is invalid: expected one of {sorted(AGENTS)}") from None
    return cls(config, spec)


__all__ = ["AGENTS", "AgentBuilder", "DQNBuilder", "SACBuilder", "TelemetryFamily", "make_builder"]
