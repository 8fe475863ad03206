"""The acting loop, without Ray: vector env -> batched CPU inference -> epsilon-greedy -> n-step adder
-> batched inserts. Weights are pulled by version; every transition carries the version that acted.

Usage::

    actor = Actor(
        env_config=EnvConfig(id="CartPole-v1", num_envs=8),
        network_factory=lambda: build_q_network(...),      # any nn.Module: obs batch -> Q [B, A]
        insert=replay_client.insert,                       # called with dict[str, np.ndarray] columns
        weights_source=weights,                            # .latest_version() / .get(version), or None
        n_step=3, gamma=0.99, actor_index=0, num_actors=1, insert_batch_size=256, seed=0,
    )
    stats = actor.run(1_000)          # 1000 vector steps (8000 env steps)
    stats.steps_per_second, stats.episode_returns["CartPole-v1"]
    actor.close()

The network receives observations in the env's dtype (uint8 frames for Atari, float32 for control)
unless ``obs_transform`` is given: scaling belongs to the network, which the learner also applies to
replayed observations, so actor and learner cannot disagree about it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from actors.adder import TRANSITION_FIELDS, NStepAdder, schema
from actors.envs import EnvConfig, VectorEnv, make_vector_env
from actors.inserter import AsyncInserter
from actors.policy import ConstantEpsilon, EpsilonSchedule, apex_epsilon, epsilon_greedy

__all__ = ["Actor", "ActorStats", "WeightsSource"]


class WeightsSource(Protocol):
    """Where actors pull weights from: the newest published version and its state dict."""

    def latest_version(self) -> int: ...

    def get(self, version: int) -> dict[str, Any] | nn.Module:
        """A state dict for the actor's network, or a whole network when the architecture changed."""
        ...


@dataclass
class ActorStats:
    """What an actor did over a period: counts, episode statistics per task id, and timing."""

    actor_index: int = 0
    env_steps: int = 0
    """Environment steps (vector steps x num_envs, autoreset steps included)."""
    transitions: int = 0
    """Transitions handed to ``insert``."""
    insert_calls: int = 0
    weight_updates: int = 0
    """How many times new weights were loaded."""
    policy_version: int = -1
    """Version of the weights acting at the end of the period (-1: the factory's initial weights)."""
    epsilon: float = 0.0
    """Exploration probability at the end of the period."""
    wall_s: float = 0.0
    """Seconds spent stepping in this period."""
    episode_returns: dict[str, np.ndarray] = field(default_factory=dict)
    """Undiscounted, unclipped returns of finished episodes, per task id (float64)."""
    episode_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    """Lengths in agent steps of finished episodes, per task id (int64)."""

    @property
    def num_episodes(self) -> int:
        return int(sum(v.size for v in self.episode_returns.values()))

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else 0.0

    def merge(self, other: ActorStats) -> ActorStats:
        """Combine two consecutive periods of the same actor (counts and time add up)."""
        returns = {k: v.copy() for k, v in self.episode_returns.items()}
        lengths = {k: v.copy() for k, v in self.episode_lengths.items()}
        for task, values in other.episode_returns.items():
            returns[task] = np.concatenate([returns.get(task, np.zeros(0, np.float64)), values])
            lengths[task] = np.concatenate([lengths.get(task, np.zeros(0, np.int64)), other.episode_lengths[task]])
        return ActorStats(
            actor_index=other.actor_index,
            env_steps=self.env_steps + other.env_steps,
            transitions=self.transitions + other.transitions,
            insert_calls=self.insert_calls + other.insert_calls,
            weight_updates=self.weight_updates + other.weight_updates,
            policy_version=other.policy_version,
            epsilon=other.epsilon,
            wall_s=self.wall_s + other.wall_s,
            episode_returns=returns,
            episode_lengths=lengths,
        )


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Actor {name} must be an integer >= 1, got {value!r}")
    return int(value)


class Actor:
    """Steps a vector env with a CPU copy of the acting network and inserts n-step transitions.

    ``epsilon`` is a schedule over this actor's env steps; None gives the Ape-X constant
    ``apex_epsilon(index=actor_index, num_actors=num_actors)``. ``seed`` (None: ``env_config.seed``)
    seeds the envs (env ``i`` gets ``seed + i``) and the exploration RNG. Weights are polled every
    ``weights_poll_interval`` vector steps (and before the first step) and loaded when the version
    changed. With ``async_inserts`` (default) each full batch is sent by a background thread while the
    actor keeps stepping (:class:`actors.inserter.AsyncInserter`); ``run()`` returns only after every
    batch it produced is stored.
    """

    def __init__(
        self,
        *,
        env_config: EnvConfig,
        network_factory: Callable[[], nn.Module],
        insert: Callable[[dict[str, np.ndarray]], Any],
        weights_source: WeightsSource | None = None,
        n_step: int = 3,
        gamma: float = 0.99,
        epsilon: EpsilonSchedule | None = None,
        actor_index: int = 0,
        num_actors: int = 1,
        insert_batch_size: int = 256,
        weights_poll_interval: int = 100,
        seed: int | None = None,
        obs_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        torch_threads: int | None = 1,
        async_inserts: bool = True,
    ) -> None:
        if not isinstance(env_config, EnvConfig):
            raise ValueError(f"env_config must be an EnvConfig, got {type(env_config).__name__}")
        if not callable(network_factory) or not callable(insert):
            raise ValueError("network_factory and insert must be callables")
        if weights_source is not None and not (
            callable(getattr(weights_source, "latest_version", None)) and callable(getattr(weights_source, "get", None))
        ):
            raise ValueError(
                f"weights_source must have latest_version() and get(version), got {type(weights_source).__name__}"
            )
        self.num_actors = _check_positive_int("num_actors", num_actors)
        if isinstance(actor_index, bool) or not isinstance(actor_index, (int, np.integer)) or not (
            0 <= actor_index < num_actors
        ):
            raise ValueError(f"Actor actor_index must be an integer in [0, {num_actors}), got {actor_index!r}")
        self.actor_index = int(actor_index)
        self.insert_batch_size = _check_positive_int("insert_batch_size", insert_batch_size)
        self.weights_poll_interval = _check_positive_int("weights_poll_interval", weights_poll_interval)
        if epsilon is None:
            epsilon = ConstantEpsilon(apex_epsilon(index=self.actor_index, num_actors=self.num_actors))
        if not callable(epsilon):
            raise ValueError(f"epsilon must be a schedule (step -> float) or None, got {epsilon!r}")
        if seed is not None:
            env_config = env_config.replace(seed=seed)
        env_config.validate()
        self.env_config = env_config
        self.seed = env_config.seed
        self._adder = NStepAdder(env_config.num_envs, n_step, gamma)  # validates n_step and gamma
        if torch_threads is not None:
            # Actors are one per core; intra-op threads would fight the other actors for it.
            torch.set_num_threads(_check_positive_int("torch_threads", torch_threads))

        self._network = network_factory()
        if not isinstance(self._network, nn.Module):
            raise ValueError(f"network_factory must return an nn.Module, got {type(self._network).__name__}")
        self._network.eval().requires_grad_(False)
        # By default one batch is sent in the background while the actor keeps stepping (actors.inserter).
        self._insert = AsyncInserter(insert) if async_inserts else insert
        self._weights = weights_source
        self._epsilon = epsilon
        self._obs_transform = obs_transform
        self._rng = np.random.default_rng([self.seed, self.actor_index])

        self._env: VectorEnv = make_vector_env(env_config)
        self._schema = schema(self._env.observation_shape, self._env.observation_dtype)
        self._obs: np.ndarray | None = None
        self._version = -1
        self._weight_updates = 0
        self._total_env_steps = 0
        self._vector_steps = 0
        self._batch: dict[str, np.ndarray] = {}
        self._batch_rows = 0
        self._new_batch()
        self._run_stats = ActorStats(actor_index=self.actor_index)
        self._recent = ActorStats(actor_index=self.actor_index)
        self._closed = False

    # -- public -------------------------------------------------------------------------------------

    @property
    def env(self) -> VectorEnv:
        return self._env

    @property
    def network(self) -> nn.Module:
        return self._network

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def total_env_steps(self) -> int:
        return self._total_env_steps

    def run(self, num_steps: int | None = None, *, max_seconds: float | None = None) -> ActorStats:
        """Step ``num_steps`` vector steps (and/or until ``max_seconds`` passed); return this run's stats.

        Transitions still buffered at the end are inserted, so nothing waits between runs except
        the adder's pending n-step windows.
        """
        if num_steps is None and max_seconds is None:
            raise ValueError("Actor.run needs num_steps or max_seconds")
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0
        ):
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
        if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds >= 0):
            raise ValueError(f"max_seconds must be a non-negative number, got {max_seconds!r}")
        if self._closed:
            raise RuntimeError("Actor.run called after close()")
        self._run_stats = ActorStats(actor_index=self.actor_index)
        updates_before = self._weight_updates
        start = time.perf_counter()
        deadline = None if max_seconds is None else start + max_seconds
        if self._obs is None:
            self._obs = self._env.reset()
        done = 0
        while (num_steps is None or done < num_steps) and (deadline is None or time.perf_counter() < deadline):
            self._step()
            done += 1
        self._flush()
        self._drain_inserts()
        stats = self._run_stats
        stats.wall_s = time.perf_counter() - start
        self._collect_episodes(stats)
        stats.policy_version = self._version
        stats.weight_updates = self._weight_updates - updates_before
        stats.epsilon = float(self._epsilon(self._total_env_steps))
        self._recent = self._recent.merge(stats)
        return stats

    def stats(self) -> ActorStats:
        """Stats accumulated since the previous ``stats()`` call (then reset)."""
        recent = self._recent
        recent.policy_version = self._version
        recent.epsilon = float(self._epsilon(self._total_env_steps))
        self._recent = ActorStats(actor_index=self.actor_index)
        return recent

    def poll_weights(self) -> bool:
        """Load the newest published weights if their version differs from ours; True if loaded."""
        if self._weights is None:
            return False
        latest = int(self._weights.latest_version())
        if latest < 0 or latest == self._version:
            return False
        state = self._weights.get(latest)
        if isinstance(state, nn.Module):
            # A whole network: the learner's architecture changed (e.g. plasticity injection added a head).
            self._network = state.eval().requires_grad_(False)
        else:
            self._network.load_state_dict(state)
        self._version = latest
        self._weight_updates += 1
        return True

    def close(self) -> None:
        """Insert what is buffered and close the env."""
        if not self._closed:
            try:
                self._flush()
                self._drain_inserts()
            finally:
                self._closed = True
                if isinstance(self._insert, AsyncInserter):
                    self._insert.close()
                self._env.close()

    # -- hot loop -----------------------------------------------------------------------------------

    def _step(self) -> None:
        if self._vector_steps % self.weights_poll_interval == 0:
            self.poll_weights()
        obs = self._obs
        q = self._q_values(obs)
        actions = epsilon_greedy(q, epsilon=self._epsilon(self._total_env_steps), rng=self._rng)
        next_obs, reward, terminated, truncated, _ = self._env.step(actions)
        rows = self._adder.add(obs, actions, reward, terminated, truncated, next_obs, self._version)
        if rows is not None:
            self._buffer(rows)
        self._obs = next_obs
        self._vector_steps += 1
        self._total_env_steps += self._env.num_envs
        self._run_stats.env_steps += self._env.num_envs

    def _q_values(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(obs)
            if self._obs_transform is not None:
                x = self._obs_transform(x)
            q = self._network(x)
        if q.ndim != 2 or q.shape[0] != obs.shape[0] or q.shape[1] != self._env.num_actions:
            raise ValueError(
                f"network returned shape {tuple(q.shape)}, expected ({obs.shape[0]}, {self._env.num_actions}) "
                f"Q-values for env {self.env_config.id!r}"
            )
        return q.float().numpy()

    def _drain_inserts(self) -> None:
        """Wait for the batch in flight, so a run's stats count only stored transitions."""
        if isinstance(self._insert, AsyncInserter):
            self._insert.flush()

    def _new_batch(self) -> None:
        # Fresh arrays per batch: the inserter may keep them (e.g. queue them for a background send).
        self._batch = {
            name: np.empty((self.insert_batch_size, *shape), dtype=dtype) for name, dtype, shape in self._schema
        }
        self._batch_rows = 0

    def _buffer(self, rows: dict[str, np.ndarray]) -> None:
        total = rows["action"].shape[0]
        offset = 0
        while offset < total:
            take = min(total - offset, self.insert_batch_size - self._batch_rows)
            lo, hi = self._batch_rows, self._batch_rows + take
            for name in TRANSITION_FIELDS:
                self._batch[name][lo:hi] = rows[name][offset : offset + take]
            self._batch_rows = hi
            offset += take
            if self._batch_rows == self.insert_batch_size:
                self._flush()

    def _flush(self) -> None:
        if self._batch_rows == 0:
            return
        rows = self._batch_rows
        columns = self._batch if rows == self.insert_batch_size else {k: v[:rows] for k, v in self._batch.items()}
        self._new_batch()
        self._insert(columns)
        self._run_stats.transitions += rows
        self._run_stats.insert_calls += 1

    def _collect_episodes(self, stats: ActorStats) -> None:
        returns, lengths = self._env.pop_episode_stats()
        if returns.size:
            stats.episode_returns[self._env.task_id] = returns
            stats.episode_lengths[self._env.task_id] = lengths
