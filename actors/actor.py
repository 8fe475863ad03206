"""The acting loop, without Ray: vector env -> policy -> adder -> batched inserts.

The loop knows no algorithm: the agent's ``Policy`` (acting network + exploration, see
``actors.policy``) picks actions and the agent's ``Adder`` (see ``actors.adder``) turns steps into
replay rows. Weights are pulled by version; every row carries the version of the policy that acted.

In a continual scenario the actor is given every task (``tasks``, a list of
:class:`actors.tasks.EnvTask`) and a weights source that also answers ``current_task()``: at each
weight poll it checks the task, and on a change it drops the adder's open n-step windows (a
transition never spans two tasks), closes the env and builds the new task's env. Every row carries
the index of the task it was collected on.

A weights source with ``poll(actor, env_steps, held)`` (``evergreen.weights.RayWeightSource``) is also
the run's env-step gate: the actor reports its steps at every poll, and while the answer says hold
(the run reached a task switch, or its end) it inserts what it buffered and waits, polling every
``GATE_RETRY_S``, until the gate opens or its ``run`` time is up.

Usage::

    env = EnvConfig(id="CartPole-v1", num_envs=8)
    spec = env_spec(env)
    actor = Actor(
        env_config=env,
        policy=EpsilonGreedyPolicy(network=q_net, epsilon=ConstantEpsilon(0.05), seed=0),
        adder=NStepAdder(spec, num_envs=8, n=3, gamma=0.99),
        insert=replay_client.insert,                       # called with dict[str, np.ndarray] columns
        weights_source=weights,                            # .latest_version() / .get(version), or None
        insert_batch_size=256, seed=0,
    )
    stats = actor.run(1_000)          # 1000 vector steps (8000 env steps)
    stats.steps_per_second, stats.episode_returns["CartPole-v1"]
    actor.close()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from actors.adder import Adder, EnvStep
from actors.envs import EnvConfig, VectorEnv, make_vector_env
from actors.inserter import AsyncInserter
from actors.policy import Policy
from actors.tasks import EnvTask

__all__ = ["Actor", "ActorStats", "WeightsSource"]

#: Seconds between polls of an actor held at a closed env-step gate.
GATE_RETRY_S = 0.05


class WeightsSource(Protocol):
    """Where actors pull weights from: the newest published version and its state dict."""

    def latest_version(self) -> int: ...

    def get(self, version: int) -> dict[str, Any] | nn.Module:
        """A state dict for the actor's network, or a whole network when the architecture changed."""
        ...

    # Optional, for continual scenarios: ``current_task() -> int``, the index of the task to act on.
    # Optional: ``poll(actor, env_steps, held) -> (version, task, hold)``, all of it in one call, with the
    # run's env-step gate (see the module docstring); used instead of the two calls above when present.


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
    exploration: dict[str, float] = field(default_factory=dict)
    """The policy's exploration state at the end of the period (e.g. ``{"epsilon": 0.05}``)."""
    wall_s: float = 0.0
    """Seconds spent stepping in this period."""
    episode_returns: dict[str, np.ndarray] = field(default_factory=dict)
    """Undiscounted, unclipped returns of finished episodes, per task id (float64)."""
    episode_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    """Lengths in agent steps of finished episodes, per task id (int64)."""
    replay_rows_lost: int = 0
    """Rows replay acknowledged and later lost (a shard restored from an older checkpoint after a crash),
    found in this period: the ``rows_lost`` count of the ``insert`` callable, when it has one."""
    held_s: float = 0.0
    """Seconds of ``wall_s`` spent waiting at the run's closed env-step gate."""

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
            exploration=dict(other.exploration),
            wall_s=self.wall_s + other.wall_s,
            episode_returns=returns,
            episode_lengths=lengths,
            replay_rows_lost=self.replay_rows_lost + other.replay_rows_lost,
            held_s=self.held_s + other.held_s,
        )


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Actor {name} must be an integer >= 1, got {value!r}")
    return int(value)


class Actor:
    """Steps a vector env with ``policy`` and inserts the rows ``adder`` makes, in batches.

    ``seed`` (None: ``env_config.seed``) seeds the envs (env ``i`` gets ``seed + i``). Weights are
    polled every ``weights_poll_interval`` vector steps (and before the first step) and handed to
    the policy when the version changed. With ``async_inserts`` (default) each full batch is sent by
    a background thread while the actor keeps stepping (:class:`actors.inserter.AsyncInserter`);
    ``run()`` returns only after every batch it produced is stored. ``env_steps_offset`` starts
    the policy's step count there (a resumed run continues its exploration schedule). An ``insert``
    callable with a ``rows_lost`` attribute (rows replay acknowledged and later lost) has it reported
    as ``ActorStats.replay_rows_lost``.
    """

    def __init__(
        self,
        *,
        env_config: EnvConfig,
        policy: Policy,
        adder: Adder,
        insert: Callable[[dict[str, np.ndarray]], Any],
        weights_source: WeightsSource | None = None,
        actor_index: int = 0,
        insert_batch_size: int = 256,
        weights_poll_interval: int = 100,
        seed: int | None = None,
        env_steps_offset: int = 0,
        torch_threads: int | None = 1,
        async_inserts: bool = True,
        tasks: list[EnvTask] | None = None,
        task: int = 0,
    ) -> None:
        if not isinstance(env_config, EnvConfig):
            raise ValueError(f"env_config must be an EnvConfig, got {type(env_config).__name__}")
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must implement actors.policy.Policy (act, load_weights, describe), got {policy!r}")
        if not isinstance(adder, Adder):
            raise ValueError(f"adder must implement actors.adder.Adder (schema, add), got {adder!r}")
        if not callable(insert):
            raise ValueError(f"insert must be a callable taking column arrays, got {insert!r}")
        if weights_source is not None and not (
            callable(getattr(weights_source, "latest_version", None)) and callable(getattr(weights_source, "get", None))
        ):
            raise ValueError(
                f"weights_source must have latest_version() and get(version), got {type(weights_source).__name__}"
            )
        if isinstance(actor_index, bool) or not isinstance(actor_index, (int, np.integer)) or actor_index < 0:
            raise ValueError(f"Actor actor_index must be an integer >= 0, got {actor_index!r}")
        self.actor_index = int(actor_index)
        self.insert_batch_size = _check_positive_int("insert_batch_size", insert_batch_size)
        self.weights_poll_interval = _check_positive_int("weights_poll_interval", weights_poll_interval)
        if isinstance(env_steps_offset, bool) or not isinstance(env_steps_offset, (int, np.integer)) or env_steps_offset < 0:
            raise ValueError(f"Actor env_steps_offset must be an integer >= 0, got {env_steps_offset!r}")
        if tasks is not None and (not tasks or not all(isinstance(t, EnvTask) for t in tasks)):
            raise ValueError(f"tasks must be a non-empty list of actors.tasks.EnvTask, got {tasks!r}")
        self.tasks = list(tasks) if tasks is not None else [EnvTask(name=env_config.id, env_config=env_config)]
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < len(self.tasks):
            raise ValueError(f"Actor task must be an index into its {len(self.tasks)} task(s), got {task!r}")
        self.seed = env_config.seed if seed is None else int(seed)
        self.task = int(task)
        env_config = self.tasks[self.task].env_config.replace(seed=self.seed)
        env_config.validate()
        self.env_config = env_config
        if torch_threads is not None:
            # Actors are one per core; intra-op threads would fight the other actors for it.
            torch.set_num_threads(_check_positive_int("torch_threads", torch_threads))
        self.policy = policy
        self.adder = adder
        # By default one batch is sent in the background while the actor keeps stepping (actors.inserter).
        self._insert = AsyncInserter(insert) if async_inserts else insert
        self._inserter = insert   # the caller's callable (its optional ``rows_lost`` count is reported)
        self._weights = weights_source

        self._env: VectorEnv = self._make_env(self.task)
        self._schema = adder.schema()
        self._obs: np.ndarray | None = None
        self._version = -1
        self._weight_updates = 0
        self._total_env_steps = int(env_steps_offset)
        self._steps_reported = self._total_env_steps   # env steps the weights source was told of (gate)
        self._gate_closed = False   # the last poll said hold
        self._held = False          # ... and everything collected before it is inserted
        self._vector_steps = 0
        self._batch: dict[str, np.ndarray] = {}
        self._batch_rows = 0
        self._new_batch()
        self._run_stats = ActorStats(actor_index=self.actor_index)
        self._rows_lost_seen = 0
        self._recent = ActorStats(actor_index=self.actor_index)
        self._closed = False

    # -- public -------------------------------------------------------------------------------------

    @property
    def env(self) -> VectorEnv:
        return self._env

    @property
    def network(self) -> nn.Module:
        return self.policy.network

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
            if self._step():
                done += 1
                continue
            # Held at the run's env-step gate: what this actor collected goes to replay before the driver
            # switches task (or ends the run); then it waits for the gate to open.
            if not self._held:
                self._flush()
                self._drain_inserts()
                self._held = True
            pause = GATE_RETRY_S if deadline is None else max(0.0, min(GATE_RETRY_S, deadline - time.perf_counter()))
            time.sleep(pause)
            self._run_stats.held_s += pause
        self._flush()
        self._drain_inserts()
        stats = self._run_stats
        stats.wall_s = time.perf_counter() - start
        self._collect_episodes(stats)
        stats.policy_version = self._version
        stats.weight_updates = self._weight_updates - updates_before
        stats.exploration = self.policy.describe(env_steps=self._total_env_steps)
        lost = int(getattr(self._inserter, "rows_lost", 0))   # cumulative in the inserter: report the news
        stats.replay_rows_lost, self._rows_lost_seen = lost - self._rows_lost_seen, lost
        self._recent = self._recent.merge(stats)
        return stats

    def stats(self) -> ActorStats:
        """Stats accumulated since the previous ``stats()`` call (then reset)."""
        recent = self._recent
        recent.policy_version = self._version
        recent.exploration = self.policy.describe(env_steps=self._total_env_steps)
        self._recent = ActorStats(actor_index=self.actor_index)
        return recent

    def _make_env(self, task: int) -> VectorEnv:
        spec = self.tasks[task]
        return make_vector_env(spec.env_config.replace(seed=self.seed), variation=spec.variation,
                               task_name=spec.name if len(self.tasks) > 1 else None)

    def switch_task(self, task: int) -> None:
        """Act on task ``task`` from the next step: open n-step windows are dropped and unfinished
        episodes end uncounted (they belong to no task's statistics); rows already made are kept."""
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < len(self.tasks):
            raise ValueError(f"task must be an index into this actor's {len(self.tasks)} task(s), got {task!r}")
        if task == self.task:
            return
        self._collect_episodes(self._run_stats)  # finished episodes are counted under the old task
        self._flush()
        new_env = self._make_env(int(task))
        old, self._env, self.task = self._env, new_env, int(task)
        old.close()
        self.env_config = self.tasks[self.task].env_config.replace(seed=self.seed)
        self.adder.reset()
        self._obs = None

    def poll_weights(self) -> bool:
        """Load the newest published weights if their version differs from ours; True if loaded.

        With a scenario, first switch to the source's current task if it changed. With a gated source,
        report the env steps taken since the previous poll; while the gate is closed nothing is loaded
        (the driver may still change the task) and ``gate_closed`` is True."""
        if self._weights is None:
            return False
        poll = getattr(self._weights, "poll", None)
        if callable(poll):
            latest, task, hold = poll(self.actor_index, self._total_env_steps - self._steps_reported, self._held)
            self._steps_reported = self._total_env_steps
            self._gate_closed = bool(hold)
            if hold:
                return False
            self._held = False
            if len(self.tasks) > 1:
                self.switch_task(int(task))
        else:
            current_task = getattr(self._weights, "current_task", None)
            if callable(current_task) and len(self.tasks) > 1:
                self.switch_task(int(current_task()))
            latest = int(self._weights.latest_version())
        if latest < 0 or latest == self._version:
            return False
        state = self._weights.get(latest)
        if state is None:
            return False
        # A state dict, or a whole network when the learner's architecture changed (e.g. an injected head).
        self.policy.load_weights(state)
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

    @property
    def gate_closed(self) -> bool:
        """Whether the last poll found the run's env-step gate closed (the actor waits until it opens)."""
        return self._gate_closed

    def _step(self) -> bool:
        """One vector step; False (and no step) while the run's env-step gate is closed."""
        if self._vector_steps % self.weights_poll_interval == 0:
            self.poll_weights()
            if self._gate_closed:
                return False
        if self._obs is None:  # a task switch replaced the env
            self._obs = self._env.reset()
        obs = self._obs
        decision = self.policy.act(obs, env_steps=self._total_env_steps)
        next_obs, reward, terminated, truncated, _ = self._env.step(decision.actions)
        step = EnvStep(obs, decision.actions, reward, terminated, truncated, next_obs, self._version, self.task)
        rows = self.adder.add(step, decision.extras)
        if rows is not None:
            self._buffer(rows)
        self._obs = next_obs
        self._vector_steps += 1
        self._total_env_steps += self._env.num_envs
        self._run_stats.env_steps += self._env.num_envs
        return True

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
            for name, column in self._batch.items():
                column[lo:hi] = rows[name][offset : offset + take]
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
            task = self._env.task_id
            if task in stats.episode_returns:  # collected before a task switch and again after
                returns = np.concatenate([stats.episode_returns[task], returns])
                lengths = np.concatenate([stats.episode_lengths[task], lengths])
            stats.episode_returns[task] = returns
            stats.episode_lengths[task] = lengths
