"""The SAC agent: ``learner.sac.SAC`` on the learner, squashed-Gaussian actors, n-step replay rows
with continuous actions.

Config sections it reads: ``sac`` (the update, the networks and the actors' random warm-up),
``actors`` (n-step, gamma), ``plasticity`` (interventions, bound to ``"actor"`` and ``"critic"``,
and diagnostics, run on both).

    builder = SACBuilder(config, env_spec(config.env))     # config.algorithm == "sac"
    sac = builder.make_algorithm(torch.device("cpu"))
    policy = builder.make_policy(actor_index=0, env_steps_offset=0)    # GaussianPolicy
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actors.envs import BoxActions, EnvSpec
from actors.policy import GaussianPolicy
from evergreen.agents.base import NStepReplayAgent, TelemetryFamily
from learner.parallel import SINGLE
from learner.sac import SAC


class SACBuilder(NStepReplayAgent):
    """See the module docstring and ``evergreen.agents``."""

    name = "sac"
    networks = SAC.NETWORKS
    telemetry_families = {
        "critic_loss": TelemetryFamily("evergreen_learner_critic_loss",
                                       "SAC twin-critic loss, mean over the log interval."),
        "actor_loss": TelemetryFamily("evergreen_learner_actor_loss", "SAC actor loss, mean over the log interval."),
        "alpha": TelemetryFamily("evergreen_learner_entropy_temperature",
                                 "SAC entropy temperature alpha, mean over the log interval."),
        "entropy": TelemetryFamily("evergreen_learner_policy_entropy_nats",
                                   "SAC policy entropy estimate (-mean log-probability), mean over the log interval."),
        "td_error": TelemetryFamily("evergreen_learner_td_error", "Mean absolute TD error over the log interval."),
        "q": TelemetryFamily("evergreen_learner_q_value_mean",
                             "Mean Q value of the taken actions in sampled batches over the log interval."),
    }

    def __init__(self, config: Any, spec: EnvSpec):
        if not isinstance(spec.actions, BoxActions):
            raise ValueError(f"algorithm 'sac' needs a continuous (Box) action space; env {config.env.id!r} has "
                             f"{spec.actions}")
        if len(spec.observation_shape) != 1 or np.dtype(spec.observation_dtype).kind != "f":
            raise ValueError(f"algorithm 'sac' takes vector float observations; env {config.env.id!r} observes "
                             f"{spec.observation_shape} {np.dtype(spec.observation_dtype).name}")
        self.config = config
        self.spec = spec
        # Validates intervention names, options and build-time overrides now, in the driver.
        self.make_algorithm(torch.device("cpu"))

    @staticmethod
    def validate(config: Any) -> None:
        """The checks of the section only this algorithm reads (called by ``RunConfig.validate``)."""
        config.sac.validate()

    # -- actors (replay columns, bounds and the adder: NStepReplayAgent) ------------------------------

    def acting_network(self) -> torch.nn.Module:
        """A freshly built actor of the learner's architecture (interventions' overrides applied)."""
        return SAC.build_actor(self.config.sac, obs_dim=self.spec.observation_shape[0],
                               action_low=self.spec.actions.low, action_high=self.spec.actions.high,
                               interventions=self.interventions(), seed=self.config.seed)

    def make_policy(self, *, actor_index: int, env_steps_offset: int) -> GaussianPolicy:
        # sac.learning_starts counts the run's env steps; each actor takes its share of the warm-up.
        share = -(-self.config.sac.learning_starts // max(1, self.config.actors.num_actors))
        return GaussianPolicy(network=self.acting_network(), low=self.spec.actions.low, high=self.spec.actions.high,
                              random_steps=share, seed=[self.config.seed, actor_index, env_steps_offset])

    def make_eval_policy(self, network: torch.nn.Module, *, epsilon: float) -> GaussianPolicy:
        """The evaluation protocol's policy: the actor's deterministic (mean) action; ``epsilon`` is a
        value-based agent's notion and does not apply."""
        return GaussianPolicy(network=network, low=self.spec.actions.low, high=self.spec.actions.high,
                              deterministic=True, seed=[self.config.seed, 999])

    # -- learner --------------------------------------------------------------------------------------

    def make_algorithm(self, device: torch.device, parallel: Any = SINGLE) -> SAC:
        cfg = self.config
        return SAC(cfg.sac, obs_shape=self.spec.observation_shape, action_low=self.spec.actions.low,
                   action_high=self.spec.actions.high, device=str(device), seed=cfg.seed,
                   interventions=self.interventions(), parallel=parallel)

    def make_diagnostics(self, algorithm: SAC, probe_obs: torch.Tensor) -> dict[str, Any]:
        from plasticity.diagnostics import Diagnostics, PolicyView

        p = self.config.plasticity
        if not p.diagnostics:
            return {}
        actor = algorithm.actor

        def actor_policy(out: torch.Tensor) -> PolicyView:
            # The actor's deterministic action; the squashed Gaussian's entropy has no closed form (the
            # update's own estimate is the ``entropy`` metric).
            mean, _ = actor.params_from_output(out)
            return PolicyView(actions=actor.deterministic_action(mean).detach())

        with torch.no_grad():   # the critic reads (observation, action): the actor's mean action on the probe
            critic_probe = torch.cat([probe_obs, actor.act(probe_obs, deterministic=True)], dim=-1)
        return {
            "actor": Diagnostics(actor, names=p.diagnostics, every=p.diagnostics_every, probe_obs=probe_obs,
                                 loss_fn=lambda _net, batch: algorithm.per_sample_loss(batch, network="actor"),
                                 policy_fn=actor_policy),
            # The critic has no policy: churn reads its twin Q-values as continuous outputs.
            "critic": Diagnostics(algorithm.critic, names=p.diagnostics, every=p.diagnostics_every,
                                  probe_obs=critic_probe,
                                  loss_fn=lambda _net, batch: algorithm.per_sample_loss(batch, network="critic"),
                                  policy_fn=lambda out: PolicyView(actions=out.detach().float())),
        }
