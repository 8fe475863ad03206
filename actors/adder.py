"""Adders turn vectorized env steps into the rows an agent's replay table stores.

An ``Adder`` declares the columns it writes (:meth:`Adder.schema`, the replay table's schema is made
from it) and turns each :class:`EnvStep` plus the policy's extras into zero or more rows.

The n-step adder emits rows ``(obs, action, reward, discount, next_obs, policy_version, task, *extras)`` with

    reward   = sum_{j<k} gamma^j r_{t+j}          (k = steps actually summed, 1 <= k <= n)
    discount = gamma^k * (1 - terminal)            (0 when the k-th step terminated the episode)
    next_obs = observation after those k steps     (the final observation on truncation)

so that a learner's target is ``reward + discount * max_a Q(next_obs, a)`` regardless of whether the
window was cut by an episode end. ``policy_version`` is the version of the policy that chose
``action``; ``task`` the index of the continual scenario's task the env was on (an n-step window never
spans two tasks: the actor resets the adder at a switch); extras are those of the step that chose it. Actions are int64 scalars for discrete
action spaces and float32 arrays for continuous ones.

Episode ends (gymnasium NEXT_STEP autoreset): on ``terminated`` every pending transition of that env
is flushed with discount 0; on ``truncated`` they are flushed with discount ``gamma^k``, bootstrapping
from the final observation. The step after an episode end is the autoreset step (reset observation,
reward 0, action ignored); it produces no transition.

Usage::

    adder = NStepAdder(env.spec, num_envs=8, n=3, gamma=0.99)
    adder.schema()                      # [("obs", float32, (4,)), ("action", int64, ()), ...]
    obs = env.reset()
    while True:
        decision = policy.act(obs, env_steps=t)
        next_obs, reward, terminated, truncated, _ = env.step(decision.actions)
        rows = adder.add(EnvStep(obs, decision.actions, reward, terminated, truncated, next_obs, version),
                         decision.extras)
        if rows is not None:
            insert(rows)                # dict of column arrays, one row per transition
        obs = next_obs
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from actors.envs import BoxActions, DiscreteActions, EnvSpec

__all__ = ["Adder", "EnvStep", "FieldSpec", "NStepAdder", "TRANSITION_FIELDS", "schema"]

TRANSITION_FIELDS = ("obs", "action", "reward", "discount", "next_obs", "policy_version", "task")

#: A column an adder writes: (name, dtype, per-row shape).
FieldSpec = tuple[str, np.dtype, tuple[int, ...]]


@dataclass
class EnvStep:
    """One vector step of ``num_envs`` environments, as the actor loop hands it to an adder."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_obs: np.ndarray
    policy_version: int | np.ndarray = 0
    task: int = 0
    """Index of the scenario task the env is on (every row records it; 0 for a single-task run)."""


@runtime_checkable
class Adder(Protocol):
    """Turns env steps into replay rows (see the module docstring)."""

    def schema(self) -> list[FieldSpec]:
        """The columns every emitted batch holds, in order."""
        ...

    def add(self, step: EnvStep, extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Record one vector step; return the rows that became ready (None if none)."""
        ...


def schema(spec: EnvSpec, extras: Sequence[FieldSpec] = ()) -> list[FieldSpec]:
    """The n-step adder's columns for an env described by ``spec``, then ``extras``.

    >>> from actors.envs import DiscreteActions
    >>> [(n, str(d), s) for n, d, s in schema(EnvSpec((4,), np.dtype("float32"), DiscreteActions(2)))][:3]
    [('obs', 'float32', (4,)), ('action', 'int64', ()), ('reward', 'float32', ())]
    """
    shape = tuple(int(d) for d in spec.observation_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"observation shape must have positive dimensions, got {spec.observation_shape!r}")
    if not isinstance(spec.actions, (DiscreteActions, BoxActions)):
        raise ValueError(f"unknown action space {spec.actions!r}; expected DiscreteActions or BoxActions")
    dtype = np.dtype(spec.observation_dtype)
    fields: list[FieldSpec] = [
        ("obs", dtype, shape),
        ("action", spec.actions.dtype, tuple(spec.actions.shape)),
        ("reward", np.dtype(np.float32), ()),
        ("discount", np.dtype(np.float32), ()),
        ("next_obs", dtype, shape),
        ("policy_version", np.dtype(np.int64), ()),
        ("task", np.dtype(np.int64), ()),
    ]
    names = {f[0] for f in fields}
    for name, extra_dtype, extra_shape in extras:
        if name in names:
            raise ValueError(f"extra field {name!r} clashes with a transition field; choose another name")
        names.add(name)
        fields.append((name, np.dtype(extra_dtype), tuple(extra_shape)))
    return fields


class NStepAdder:
    """Vectorized n-step adder over ``num_envs`` environments (see the module docstring).

    State per env is a ring of the last ``n`` (obs, action, reward, policy_version, extras) held in
    preallocated numpy arrays; nothing per transition is a Python object. ``extras`` declares the
    policy extras to store (name, dtype, per-row shape); the policy must return exactly those.
    """

    def __init__(self, spec: EnvSpec, *, num_envs: int, n: int, gamma: float,
                 extras: Sequence[FieldSpec] = ()) -> None:
        for name, value in (("num_envs", num_envs), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"NStepAdder {name} must be an integer >= 1, got {value!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"NStepAdder gamma must be a float in [0, 1], got {gamma!r}")
        self.num_envs = int(num_envs)
        self.n = int(n)
        self.gamma = float(gamma)
        # gamma^j for j = 0..n, in float64 so that sums are exact to float32 after the cast.
        self._powers = self.gamma ** np.arange(self.n + 1, dtype=np.float64)
        self._schema = schema(spec, extras)
        self.spec = spec
        self._obs_shape = tuple(spec.observation_shape)
        self._obs_dtype = np.dtype(spec.observation_dtype)
        self._action_shape = tuple(spec.actions.shape)
        self._action_dtype = spec.actions.dtype
        self._extras = [(name, np.dtype(d), tuple(shape)) for name, d, shape in extras]
        self._obs = np.zeros((self.num_envs, self.n, *self._obs_shape), dtype=self._obs_dtype)
        self._action = np.zeros((self.num_envs, self.n, *self._action_shape), dtype=self._action_dtype)
        self._extra = {name: np.zeros((self.num_envs, self.n, *shape), dtype=d) for name, d, shape in self._extras}
        self._reward = np.zeros((self.num_envs, self.n), dtype=np.float64)
        self._version = np.zeros((self.num_envs, self.n), dtype=np.int64)
        self._pushed = np.zeros(self.num_envs, dtype=np.int64)  # steps pushed in the current episode
        self._count = np.zeros(self.num_envs, dtype=np.int64)  # pending (not yet emitted) steps
        self._skip = np.zeros(self.num_envs, dtype=bool)  # next add for this env is an autoreset step
        self._task = 0  # the task of every pending step (a switch needs reset() first)

    def __setstate__(self, state: dict) -> None:
        # Arrays unpickled from a zero-copy transport (Ray's object store) arrive read-only; this
        # adder writes into its buffers, so it takes copies of its own.
        self.__dict__.update({k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})
        self._extra = {k: np.array(v) for k, v in self._extra.items()}

    @property
    def pending(self) -> np.ndarray:
        """Pending (not yet emitted) steps per env, int64 ``[num_envs]``."""
        return self._count.copy()

    def schema(self) -> list[FieldSpec]:
        """Field specs of emitted columns, in order."""
        return list(self._schema)

    def reset(self) -> None:
        """Drop all pending steps (after the env was reset out of band, or at a task switch: an n-step
        window must not span two tasks)."""
        self._pushed[:] = 0
        self._count[:] = 0
        self._skip[:] = False

    def add(self, step: EnvStep, extras: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        """Record one vector step; return the transitions that became ready (or None)."""
        obs, actions, rewards, terminated, truncated, next_obs, versions = self._check(
            step.obs, step.action, step.reward, step.terminated, step.truncated, step.next_obs, step.policy_version
        )
        extra_values = self._check_extras(extras or {})
        task = step.task
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or task < 0:
            raise ValueError(f"task must be an integer >= 0, got {task!r}")
        if task != self._task:
            if self._count.any():
                raise ValueError(f"task changed from {self._task} to {task} with {int(self._count.sum())} steps "
                                 "pending; call reset() at a task switch (an n-step window must not span two tasks)")
            self._task = int(task)

        live = ~self._skip
        # An env whose episode ended on this step skips the next (autoreset) step.
        self._skip = (terminated | truncated) & live
        envs = np.flatnonzero(live)
        if envs.size == 0:
            return None
        slots = self._pushed[envs] % self.n
        self._obs[envs, slots] = obs[envs]
        self._action[envs, slots] = actions[envs]
        self._reward[envs, slots] = rewards[envs]
        self._version[envs, slots] = versions[envs]
        for name, values in extra_values.items():
            self._extra[name][envs, slots] = values[envs]
        self._pushed[envs] += 1
        self._count[envs] += 1

        parts: list[dict[str, np.ndarray]] = []
        ended = self._skip  # ended on this very step
        full = np.flatnonzero(live & ~ended & (self._count == self.n))
        if full.size:
            parts.append(self._emit_full(full, next_obs))
        for env in np.flatnonzero(ended):
            parts.append(self._emit_episode_end(int(env), next_obs[env], bool(terminated[env])))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _emit_full(self, envs: np.ndarray, next_obs: np.ndarray) -> dict[str, np.ndarray]:
        """The oldest pending step of each env in ``envs`` (all have ``n`` pending)."""
        n = self.n
        oldest = (self._pushed[envs] - n) % n
        order = (oldest[:, None] + np.arange(n)[None, :]) % n  # [E, n] slots, oldest first
        rewards = np.take_along_axis(self._reward[envs], order, axis=1) @ self._powers[:n]
        self._count[envs] -= 1
        rows = {
            "obs": self._obs[envs, oldest],
            "action": self._action[envs, oldest],
            "reward": rewards.astype(np.float32),
            "discount": np.full(envs.size, self._powers[n], dtype=np.float32),
            "next_obs": np.ascontiguousarray(next_obs[envs]),
            "policy_version": self._version[envs, oldest],
            "task": np.full(envs.size, self._task, dtype=np.int64),
        }
        rows.update({name: buf[envs, oldest] for name, buf in self._extra.items()})
        return rows

    def _emit_episode_end(self, env: int, final_obs: np.ndarray, terminal: bool) -> dict[str, np.ndarray]:
        """Every pending step of ``env``, oldest first; the episode ended on the newest one."""
        count = int(self._count[env])
        first = int(self._pushed[env]) - count
        slots = (first + np.arange(count)) % self.n
        r = self._reward[env, slots]
        # Row j sums steps j..count-1: returns[j] = sum_{m>=j} gamma^(m-j) r_m, computed backwards.
        returns = np.empty(count, dtype=np.float64)
        acc = 0.0
        for j in range(count - 1, -1, -1):
            acc = r[j] + self.gamma * acc
            returns[j] = acc
        steps = count - np.arange(count)  # k for each row
        discount = np.zeros(count, dtype=np.float32) if terminal else self._powers[steps].astype(np.float32)
        self._count[env] = 0
        self._pushed[env] = 0
        rows = {
            "obs": self._obs[env, slots],
            "action": self._action[env, slots],
            "reward": returns.astype(np.float32),
            "discount": discount,
            "next_obs": np.repeat(final_obs[None], count, axis=0),
            "policy_version": self._version[env, slots],
            "task": np.full(count, self._task, dtype=np.int64),
        }
        rows.update({name: buf[env, slots] for name, buf in self._extra.items()})
        return rows

    def _check(self, obs, actions, rewards, terminated, truncated, next_obs, policy_version):
        """Validate everything before any state changes, so a bad call leaves the adder untouched."""
        n_env = self.num_envs
        obs = np.asarray(obs)
        next_obs = np.asarray(next_obs)
        if obs.ndim < 1 or obs.shape[0] != n_env:
            raise ValueError(f"obs must have leading dimension num_envs={n_env}, got shape {obs.shape}")
        if next_obs.shape != obs.shape or next_obs.dtype != obs.dtype:
            raise ValueError(
                f"next_obs must match obs (shape {obs.shape}, dtype {obs.dtype}), "
                f"got shape {next_obs.shape} dtype {next_obs.dtype}"
            )
        if obs.shape[1:] != self._obs_shape or obs.dtype != self._obs_dtype:
            raise ValueError(
                f"obs rows must have shape {self._obs_shape} dtype {self._obs_dtype} (the env spec), "
                f"got shape {obs.shape[1:]} dtype {obs.dtype}"
            )
        actions = np.asarray(actions)
        want_kind = "iu" if self._action_dtype.kind in "iu" else "f"
        if actions.shape != (n_env, *self._action_shape) or actions.dtype.kind not in want_kind:
            kind = "integers" if want_kind == "iu" else "floats"
            raise ValueError(
                f"actions must be {kind} of shape {(n_env, *self._action_shape)}, "
                f"got dtype {actions.dtype} shape {actions.shape}"
            )
        rewards = np.asarray(rewards)
        if rewards.shape != (n_env,) or rewards.dtype.kind not in "iuf":
            raise ValueError(
                f"rewards must be numbers of shape ({n_env},), got dtype {rewards.dtype} shape {rewards.shape}"
            )
        if not np.all(np.isfinite(rewards)):
            raise ValueError(f"rewards must be finite, got {rewards}")
        flags = []
        for name, value in (("terminated", terminated), ("truncated", truncated)):
            arr = np.asarray(value)
            if arr.shape != (n_env,) or arr.dtype != np.bool_:
                raise ValueError(f"{name} must be bool of shape ({n_env},), got dtype {arr.dtype} shape {arr.shape}")
            flags.append(arr)
        versions = np.asarray(policy_version)
        if versions.dtype.kind not in "iu" or versions.shape not in ((), (n_env,)):
            raise ValueError(
                f"policy_version must be an int or int array of shape ({n_env},), "
                f"got dtype {versions.dtype} shape {versions.shape}"
            )
        versions = np.broadcast_to(versions.astype(np.int64), (n_env,))
        return (obs, actions.astype(self._action_dtype, copy=False), rewards.astype(np.float64), flags[0], flags[1],
                next_obs, versions)

    def _check_extras(self, extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        declared = [name for name, _, _ in self._extras]
        if sorted(extras) != sorted(declared):
            raise ValueError(f"policy extras {sorted(extras)} differ from the adder's declared extras {sorted(declared)}")
        out = {}
        for name, dtype, shape in self._extras:
            value = np.asarray(extras[name])
            if value.shape != (self.num_envs, *shape):
                raise ValueError(f"extra {name!r} has shape {value.shape}; expected {(self.num_envs, *shape)}")
            out[name] = value.astype(dtype, copy=False)
        return out
