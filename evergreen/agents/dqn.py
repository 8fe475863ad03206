"""The DQN-family agent: ``learner.dqn.DQN`` on the learner, epsilon-greedy actors, n-step replay rows.

Config sections it reads: ``network`` (the Q-network), ``dqn`` (the update), ``actors`` (n-step,
gamma, the Ape-X epsilons and their decay), ``plasticity`` (interventions and diagnostics).

    builder = DQNBuilder(config, env_spec(config.env))
    dqn = builder.make_algorithm(torch.device("cpu"))
    policy = builder.make_policy(actor_index=0, env_steps_offset=0)    # EpsilonGreedyPolicy
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from actors.envs import EnvSpec
from actors.policy import ConstantEpsilon, EpsilonGreedyPolicy, LinearEpsilon, apex_epsilon
from evergreen.agents.base import NStepReplayAgent, TelemetryFamily
from learner.dqn import DQN
from learner.networks import NetworkConfig, build_network
from learner.parallel import SINGLE


def exploration_schedule(actors: Any, *, index: int, step_offset: int = 0, max_actors: int | None = None) -> Any:
    """Linear decay from epsilon_start to actor ``index``'s Ape-X epsilon, resumed at ``step_offset``.

    The ladder is over the configured ``actors.num_actors``; an actor added beyond them by
    `evergreen scale` (index >= num_actors) takes its place on a ladder over ``max_actors``
    (control.max_actors), so that added actors spread between the configured ones' epsilons instead
    of all taking the same one, and the configured actors keep theirs."""
    ladder = actors.num_actors if index < actors.num_actors or max_actors is None else max(max_actors, index + 1)
    end = apex_epsilon(index=index, num_actors=ladder, base=actors.epsilon_base, alpha=actors.epsilon_alpha)
    remaining = actors.epsilon_decay_steps - step_offset
    if remaining <= 0:
        return ConstantEpsilon(end)
    full = LinearEpsilon(start=actors.epsilon_start, end=end, steps=max(1, actors.epsilon_decay_steps))
    return LinearEpsilon(start=full(step_offset), end=end, steps=remaining)


class DQNBuilder(NStepReplayAgent):
    """See the module docstring and ``evergreen.agents``."""

    name = "dqn"
    networks = DQN.NETWORKS
    telemetry_families = {
        "td_error": TelemetryFamily("evergreen_learner_td_error", "Mean absolute TD error over the log interval."),
        "q": TelemetryFamily("evergreen_learner_q_value_mean",
                             "Mean Q value of the taken actions in sampled batches over the log interval."),
    }

    def __init__(self, config: Any, spec: EnvSpec):
        if not spec.discrete:
            raise ValueError(
                f"algorithm 'dqn' needs a discrete action space; env {config.env.id!r} has {spec.actions}"
            )
        self.config = config
        self.spec = spec
        # Validates names, options and build-time overrides now, in the driver, before any process starts.
        overrides = self.interventions().network_overrides("q")
        self.network_config: NetworkConfig = dataclasses.replace(config.network, **overrides).validate()

    @staticmethod
    def validate(config: Any) -> None:
        """The checks of the sections only this algorithm reads (called by ``RunConfig.validate``)."""
        config.dqn.validate()
        config.network.validate()

    # -- actors (replay columns, bounds and the adder: NStepReplayAgent) ------------------------------

    def acting_network(self) -> torch.nn.Module:
        """A freshly built Q-network of the learner's architecture (interventions' overrides applied)."""
        return build_network(self.network_config, obs_shape=self.spec.observation_shape,
                             num_actions=self.spec.num_actions, obs_dtype=self.spec.observation_dtype.name)

    def make_policy(self, *, actor_index: int, env_steps_offset: int) -> EpsilonGreedyPolicy:
        a = self.config.actors
        return EpsilonGreedyPolicy(
            network=self.acting_network(),
            epsilon=exploration_schedule(a, index=actor_index, step_offset=env_steps_offset,
                                         max_actors=self.config.control.max_actors),
            seed=[self.config.seed, actor_index, env_steps_offset],
        )

    # -- learner --------------------------------------------------------------------------------------

    def make_eval_policy(self, network: torch.nn.Module, *, epsilon: float) -> EpsilonGreedyPolicy:
        """The evaluation protocol's policy: greedy in ``network`` but for a constant ``epsilon``."""
        return EpsilonGreedyPolicy(network=network, epsilon=ConstantEpsilon(epsilon), seed=[self.config.seed, 999])

    def make_algorithm(self, device: torch.device, parallel: Any = SINGLE) -> DQN:
        cfg = self.config
        return DQN(cfg.dqn, cfg.network, obs_shape=self.spec.observation_shape, num_actions=self.spec.num_actions,
                   obs_dtype=self.spec.observation_dtype.name, device=str(device), seed=cfg.seed,
                   interventions=self.interventions(), parallel=parallel)

    def make_diagnostics(self, algorithm: DQN, probe_obs: torch.Tensor) -> dict[str, Any]:
        from plasticity.diagnostics import Diagnostics, q_value_policy

        p = self.config.plasticity
        if not p.diagnostics:
            return {}
        # Curvature and interference measure the loss DQN trains; churn and entropy read the greedy
        # policy and the Boltzmann distribution of the Q-values.
        return {"q": Diagnostics(algorithm.online, names=p.diagnostics, every=p.diagnostics_every, probe_obs=probe_obs,
                                 loss_fn=lambda _network, batch: algorithm.per_sample_loss(batch),
                                 policy_fn=q_value_policy())}
