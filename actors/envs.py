"""Vectorized environments behind one small interface, for Atari (ale-py) and gymnasium control tasks.

Both kinds use gymnasium's NEXT_STEP autoreset: after a ``step`` whose ``terminated`` or
``truncated`` is set for env ``i``, the *next* ``step`` returns env ``i``'s reset observation with
reward 0 and both flags false, and the action given for ``i`` in that call is ignored. Consumers
(the n-step adder) must not turn that step into a transition.

Episode statistics are kept here, on the *raw* reward: for Atari the ALE is always created with
``reward_clipping=False`` and clipping is applied by this wrapper to the training reward only, so
reported returns are the real game score.

Which code builds an environment is decided by one table, :data:`ENV_FAMILIES`: each family says
which ids it takes and how to build their vector env. There is no list of allowed ids: any ALE game,
and any id registered with gymnasium (classic control, Box2D, MuJoCo, your own registered envs) is
accepted; an id no family takes is refused with the families listed. Adding a family (Procgen,
DMC, ...) is one :class:`EnvFamily` entry.

:func:`env_spec` describes an env without the caller stepping it: observation shape and dtype and
the action space, discrete (:class:`DiscreteActions`) or a continuous box (:class:`BoxActions`).

Usage::

    spec = env_spec(EnvConfig(id="Pendulum-v1"))        # EnvSpec(obs (3,) float32, BoxActions((1,), -2, 2))
    env = make_vector_env(EnvConfig(id="CartPole-v1", num_envs=4, seed=0))
    obs = env.reset()                                   # [4, 4] float32
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, dtype=np.int64))
    returns, lengths = env.pop_episode_stats()          # finished episodes since the last call
    env.close()
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ENV_FAMILIES",
    "BoxActions",
    "DiscreteActions",
    "EnvConfig",
    "EnvFamily",
    "EnvSpec",
    "VectorEnv",
    "atari_game_name",
    "env_family",
    "env_spec",
    "is_atari_id",
    "make_vector_env",
]


@dataclass(frozen=True)
class DiscreteActions:
    """``n`` actions, numbered ``0 .. n-1`` (int64 scalars in replay)."""

    n: int

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int64)


@dataclass(frozen=True)
class BoxActions:
    """Continuous actions: float32 arrays of ``shape`` with per-dimension bounds ``[low, high]``."""

    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)


@dataclass(frozen=True)
class EnvSpec:
    """What an agent needs to know about an env before it steps it."""

    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    actions: DiscreteActions | BoxActions

    @property
    def discrete(self) -> bool:
        return isinstance(self.actions, DiscreteActions)

    @property
    def num_actions(self) -> int:
        """Number of discrete actions; ValueError for a continuous action space."""
        if not isinstance(self.actions, DiscreteActions):
            raise ValueError(f"this env has continuous actions {self.actions}; it has no number of actions")
        return self.actions.n


@dataclass(frozen=True)
class EnvConfig:
    """Which environment an actor steps, and how it is preprocessed.

    Atari-only fields (``sticky_actions`` aside) are ignored for control tasks.
    """

    id: str = "CartPole-v1"
    """Environment id: an ALE id ("ALE/Pong-v5") or ROM name ("pong"), or any gymnasium id
    ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "LunarLander-v3", "HalfCheetah-v5")."""
    num_envs: int = 8
    """Number of environments stepped together in one process (the inference batch size)."""
    seed: int = 0
    """Seed of env 0; env ``i`` is seeded with ``seed + i``."""
    sticky_actions: float | None = None
    """Probability of repeating the previous action instead of the chosen one
    (``repeat_action_probability``). None means 0.25 for Atari (Machado et al., 2018) and 0.0
    for control tasks."""
    full_action_space: bool = False
    """Atari: use all 18 actions instead of the game's minimal action set."""
    frameskip: int = 4
    """Atari: emulator frames per agent step (max-pooled over the last two)."""
    frame_stack: int = 4
    """Atari: number of 84x84 grayscale frames stacked into one observation."""
    reward_clipping: bool | None = None
    """Clip training rewards to [-1, 1] (sign). None means True for Atari, False for control.
    Episode statistics always use the unclipped reward."""
    max_episode_frames: int = 108_000
    """Atari: emulator frames after which an episode is truncated (108000 = 30 minutes)."""
    noop_max: int = 30
    """Atari: up to this many no-op actions at reset, to randomise starts."""
    episodic_life: bool = False
    """Atari: end the episode (terminated) on every life loss. ale-py 0.12 then resets the whole game,
    so an episode (and its reported return and length) is one life, not one game."""

    @property
    def is_atari(self) -> bool:
        return is_atari_id(self.id)

    @property
    def repeat_action_probability(self) -> float:
        """The resolved sticky-action probability."""
        if self.sticky_actions is not None:
            return float(self.sticky_actions)
        return 0.25 if self.is_atari else 0.0

    @property
    def clip_rewards(self) -> bool:
        """The resolved reward-clipping switch."""
        if self.reward_clipping is not None:
            return bool(self.reward_clipping)
        return self.is_atari

    def replace(self, **changes: Any) -> EnvConfig:
        """A copy with ``changes`` applied (validated)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"EnvConfig.id must be a non-empty string, got {self.id!r}")
        env_family(self.id)  # raises, listing the families, for an id no family takes
        _check_int("num_envs", self.num_envs, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.sticky_actions is not None and (
            isinstance(self.sticky_actions, bool)
            or not isinstance(self.sticky_actions, (int, float))
            or not 0.0 <= float(self.sticky_actions) < 1.0
        ):
            raise ValueError(
                f"EnvConfig.sticky_actions must be None or a probability in [0, 1), got {self.sticky_actions!r}"
            )
        _check_int("frameskip", self.frameskip, minimum=1)
        _check_int("frame_stack", self.frame_stack, minimum=1)
        _check_int("max_episode_frames", self.max_episode_frames, minimum=1)
        _check_int("noop_max", self.noop_max, minimum=0)
        for name in ("full_action_space", "episodic_life"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EnvConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.reward_clipping is not None and not isinstance(self.reward_clipping, bool):
            raise ValueError(f"EnvConfig.reward_clipping must be None or a bool, got {self.reward_clipping!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"EnvConfig.{name} must be an integer >= {minimum}, got {value!r}")


def is_atari_id(env_id: str) -> bool:
    """True for "ALE/<Game>-v<k>" ids and for lower-case ALE ROM names ("pong", "ms_pacman")."""
    if env_id.startswith("ALE/"):
        return True
    if re.fullmatch(r"[a-z0-9_]+", env_id) is None:
        return False
    from ale_py import roms

    return env_id in roms.get_all_rom_ids()


def atari_game_name(env_id: str) -> str:
    """The ALE ROM name for an Atari id: "ALE/MsPacman-v5" -> "ms_pacman", "pong" -> "pong"."""
    from ale_py import roms

    name = env_id
    if env_id.startswith("ALE/"):
        name = env_id[len("ALE/") :].split("-")[0]
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    if name not in roms.get_all_rom_ids():
        raise ValueError(f"Atari id {env_id!r} resolves to ROM {name!r}, which ale-py does not know")
    return name


class VectorEnv:
    """``num_envs`` environments stepped together; NEXT_STEP autoreset; raw-reward episode stats.

    ``step`` returns ``(obs, reward, terminated, truncated, info)`` with ``reward`` float32 (clipped
    when the config says so), ``terminated``/``truncated`` bool, and ``info["raw_reward"]`` (float32,
    unclipped) and ``info["autoreset"]`` (bool: this step was an autoreset step for that env).
    """

    def __init__(self, *, config: EnvConfig, env: Any, actions: DiscreteActions | BoxActions,
                 variation: Any = None) -> None:
        self.config = config
        self._env = env
        # The continual task this env steps (set by make_vector_env(task_name=...)); None outside a scenario.
        self.task_name: str | None = None
        self.num_envs = config.num_envs
        space = env.single_observation_space
        self.spec = EnvSpec(
            observation_shape=tuple(int(d) for d in space.shape),
            observation_dtype=np.dtype(space.dtype),
            actions=actions,
        )
        self.observation_shape: tuple[int, ...] = self.spec.observation_shape
        self.observation_dtype: np.dtype = self.spec.observation_dtype
        if isinstance(actions, BoxActions):
            self._low = np.asarray(actions.low, dtype=np.float32).reshape(actions.shape)
            self._high = np.asarray(actions.high, dtype=np.float32).reshape(actions.shape)
        self._clip = config.clip_rewards
        # A continual task's fixed permutations (actors.tasks.TaskVariation); None = identity.
        self._obs_perm = variation.observation_permutation(self.observation_shape) if variation else None
        self._action_perm = variation.action_permutation(actions) if variation else None
        self._reward_noise = float(variation.reward_noise) if variation else 0.0
        self._reward_scale = float(variation.reward_scale) if variation else 1.0
        # Seeded by the task and the env seed, so that each actor's noise differs and a rerun repeats it.
        self._noise_rng = np.random.default_rng([variation.seed if variation else 0, 3, config.seed])
        self._episode_return = np.zeros(self.num_envs, dtype=np.float64)
        self._episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._done_returns: list[np.ndarray] = []
        self._done_lengths: list[np.ndarray] = []
        self._closed = False

    @property
    def task_id(self) -> str:
        """The task's name in a continual scenario, else the env id (the label of episode statistics)."""
        return self.task_name or self.config.id

    def _observe(self, obs: Any) -> np.ndarray:
        obs = np.asarray(obs)
        if self._obs_perm is not None:
            flat = obs.reshape(obs.shape[0], -1) if obs.ndim == 2 else obs.reshape(*obs.shape[:2], -1)
            obs = flat[..., self._obs_perm].reshape(obs.shape)
        return np.ascontiguousarray(obs)

    def reset(self) -> np.ndarray:
        """Reset every env (seeded from the config) and return the observations ``[N, ...]``."""
        obs, _ = self._env.reset(seed=self.config.seed)
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0
        self._autoreset[:] = False
        return self._observe(obs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step every env with ``actions``: ints ``[N]`` in ``[0, n)``, or float32 ``[N, *shape]`` within the box."""
        actions = self._checked_actions(actions)
        if self._action_perm is not None:  # the agent's action i is the env's action perm[i]
            actions = self._action_perm[actions] if actions.ndim == 1 else actions[:, self._action_perm]
        obs, reward, terminated, truncated, info = self._env.step(actions)
        raw = np.asarray(reward, dtype=np.float32)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        autoreset = self._autoreset.copy()

        # Autoreset steps are not part of any episode: they only deliver the first observation.
        live = ~autoreset
        self._episode_return[live] += raw[live]
        self._episode_length[live] += 1
        done = (terminated | truncated) & live
        if done.any():
            self._done_returns.append(self._episode_return[done].copy())
            self._done_lengths.append(self._episode_length[done].copy())
            self._episode_return[done] = 0.0
            self._episode_length[done] = 0
        self._autoreset = done

        info = dict(info) if info else {}
        info["raw_reward"] = raw
        info["autoreset"] = autoreset
        train_reward = np.sign(raw).astype(np.float32) if self._clip else raw
        if self._reward_scale != 1.0:  # the learning signal only, like the noise below
            train_reward = (train_reward * self._reward_scale).astype(np.float32)
        if self._reward_noise:  # the learning signal only: episode returns above keep the true reward
            noise = self._noise_rng.normal(0.0, self._reward_noise, size=train_reward.shape)
            train_reward = (train_reward + noise).astype(np.float32)
        return self._observe(obs), train_reward, terminated, truncated, info

    @property
    def num_actions(self) -> int:
        return self.spec.num_actions

    def _checked_actions(self, actions: Any) -> np.ndarray:
        """``actions`` as the dtype the env takes, or ValueError naming what is wrong (nothing is stepped)."""
        actions = np.asarray(actions)
        spec = self.spec.actions
        if isinstance(spec, DiscreteActions):
            if actions.shape != (self.num_envs,) or actions.dtype.kind not in "iu":
                raise ValueError(
                    f"actions must be an integer array of shape ({self.num_envs},), "
                    f"got dtype {actions.dtype} shape {actions.shape}"
                )
            if actions.size and (actions.min() < 0 or actions.max() >= spec.n):
                raise ValueError(f"actions must lie in [0, {spec.n}), got min {actions.min()} max {actions.max()}")
            return actions.astype(np.int64, copy=False)
        want = (self.num_envs, *spec.shape)
        if actions.shape != want or actions.dtype.kind != "f":
            raise ValueError(
                f"actions must be a float array of shape {want}, got dtype {actions.dtype} shape {actions.shape}"
            )
        actions = actions.astype(np.float32, copy=False)
        outside = ~np.isfinite(actions) | (actions < self._low) | (actions > self._high)
        if outside.any():
            env, *dim = np.argwhere(outside)[0].tolist()
            raise ValueError(
                f"actions[{env}] = {actions[env].tolist()} is outside the action box "
                f"[{list(spec.low)}, {list(spec.high)}] (dimension {dim})"
            )
        return actions

    @property
    def current_episode_lengths(self) -> np.ndarray:
        """Agent steps so far in each env's unfinished episode, int64 ``[N]`` (a copy)."""
        return self._episode_length.copy()

    def pop_episode_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (float64) and lengths in agent steps (int64) of episodes finished since last call."""
        if self._done_returns:
            returns = np.concatenate(self._done_returns)
            lengths = np.concatenate(self._done_lengths)
        else:
            returns = np.zeros(0, dtype=np.float64)
            lengths = np.zeros(0, dtype=np.int64)
        self._done_returns.clear()
        self._done_lengths.clear()
        return returns, lengths

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def __enter__(self) -> VectorEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class EnvFamily:
    """One kind of environment: which ids it takes and how to build their vector env."""

    name: str
    describe: str
    """For error messages: which ids the family takes."""
    accepts: Callable[[str], bool]
    build: Callable[[EnvConfig, int, Any], VectorEnv]
    """``build(config, num_threads, variation) -> VectorEnv`` (``variation``: an actors.tasks.TaskVariation or None)."""


def _is_gymnasium_id(env_id: str) -> bool:
    import gymnasium as gym

    return not env_id.startswith("ALE/") and env_id in gym.registry


#: Every env family, tried in order; the first whose ``accepts(id)`` holds builds the env.
ENV_FAMILIES: tuple[EnvFamily, ...] = (
    EnvFamily("atari", "ALE games: 'ALE/<Game>-v5' or a ROM name such as 'pong'",
              accepts=is_atari_id,
              build=lambda config, threads, variation: _make_atari(config, num_threads=threads, variation=variation)),
    EnvFamily("gymnasium", "any id registered with gymnasium (classic control, Box2D, MuJoCo, ...)",
              accepts=_is_gymnasium_id, build=lambda config, threads, variation: _make_gymnasium(config, variation)),
)


def env_family(env_id: str) -> EnvFamily:
    """The family that builds ``env_id``; ValueError listing every family when none takes it."""
    for family in ENV_FAMILIES:
        if family.accepts(env_id):
            return family
    listing = "; ".join(f"{f.name}: {f.describe}" for f in ENV_FAMILIES)
    raise ValueError(f"EnvConfig.id={env_id!r} is not an id of any env family ({listing})")


def make_vector_env(config: EnvConfig, *, num_threads: int = 1, variation: Any = None,
                    task_name: str | None = None) -> VectorEnv:
    """Build the vector env described by ``config`` (validated first) with its family's builder.

    ``num_threads`` is the ALE worker-thread count (Atari only); the default 1 suits one actor per
    CPU core, which is how the actor pool places them. ``variation`` (an
    :class:`actors.tasks.TaskVariation`) and ``task_name`` make it one task of a continual scenario.
    """
    config.validate()
    env = env_family(config.id).build(config, num_threads, variation)
    env.task_name = task_name
    return env


def env_spec(config: EnvConfig) -> EnvSpec:
    """Observation shape/dtype and action space of ``config``'s env, read off one throwaway env."""
    env = make_vector_env(config.replace(num_envs=1))
    try:
        return env.spec
    finally:
        env.close()


def _make_atari(config: EnvConfig, *, num_threads: int, variation: Any = None) -> VectorEnv:
    from ale_py.vector_env import AtariVectorEnv
    from gymnasium.vector import AutoresetMode

    if variation is not None and variation.params:
        raise ValueError(f"variation.params {sorted(variation.params)}: Atari games have no physical parameters "
                         "(permutations apply to any env)")
    if variation is not None and (variation.mode is not None or variation.difficulty is not None):
        return _make_atari_mode(config, variation)
    game = atari_game_name(config.id)
    env = AtariVectorEnv(
        game,
        config.num_envs,
        num_threads=num_threads,
        max_num_frames_per_episode=config.max_episode_frames,
        repeat_action_probability=config.repeat_action_probability,
        full_action_space=config.full_action_space,
        autoreset_mode=AutoresetMode.NEXT_STEP,
        img_height=84,
        img_width=84,
        grayscale=True,
        stack_num=config.frame_stack,
        frameskip=config.frameskip,
        noop_max=config.noop_max,
        episodic_life=config.episodic_life,
        # Clipped here instead, so that episode statistics see the real score.
        reward_clipping=False,
    )
    return VectorEnv(config=config, env=env, actions=DiscreteActions(int(env.single_action_space.n)),
                     variation=variation)


def _make_atari_mode(config: EnvConfig, variation: Any) -> VectorEnv:
    """An Atari game in a chosen mode/difficulty (``actors.atari_modes``: the vectorized ALE env cannot set them)."""
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    from actors.atari_modes import check_mode, make_mode_env

    game = atari_game_name(config.id)
    check_mode(game, mode=variation.mode, difficulty=variation.difficulty)  # once, before any env is built

    def make_one() -> Any:
        return make_mode_env(game, config, mode=variation.mode, difficulty=variation.difficulty)

    env = SyncVectorEnv([make_one for _ in range(config.num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP)
    return VectorEnv(config=config, env=env, actions=DiscreteActions(int(env.single_action_space.n)),
                     variation=variation)


def _make_gymnasium(config: EnvConfig, variation: Any = None) -> VectorEnv:
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    if variation is not None and (variation.mode is not None or variation.difficulty is not None):
        raise ValueError(f"variation mode/difficulty: {config.id} is not an Atari game (they are ALE switches)")

    p = config.repeat_action_probability

    def make_one() -> Any:
        env = gym.make(config.id)
        space = env.observation_space
        if isinstance(space, gym.spaces.Box) and space.dtype == np.float64:
            # MuJoCo observes in float64; networks and replay work in float32 (half the bytes per row).
            single = gym.spaces.Box(low=space.low.astype(np.float32), high=space.high.astype(np.float32),
                                    dtype=np.float32)
            env = gym.wrappers.TransformObservation(env, lambda obs: obs.astype(np.float32), single)
        if p > 0.0:
            env = gym.wrappers.StickyAction(env, repeat_action_probability=p)
        return env

    try:
        env = SyncVectorEnv([make_one for _ in range(config.num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP)
    except gym.error.DependencyNotInstalled as exc:
        raise ValueError(f"EnvConfig.id={config.id!r} needs a package that is not installed: {exc}") from exc
    space = env.single_action_space
    actions: DiscreteActions | BoxActions
    if isinstance(space, gym.spaces.Discrete):
        # A Discrete space may start at a non-zero offset; refuse rather than silently shift actions.
        if int(space.start) != 0:
            env.close()
            raise ValueError(f"EnvConfig.id={config.id!r} has a Discrete space starting at {space.start}, expected 0")
        actions = DiscreteActions(int(space.n))
    elif isinstance(space, gym.spaces.Box) and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)):
        actions = BoxActions(shape=tuple(int(d) for d in space.shape), low=tuple(float(v) for v in space.low.reshape(-1)),
                             high=tuple(float(v) for v in space.high.reshape(-1)))
    else:
        env.close()
        raise ValueError(
            f"EnvConfig.id={config.id!r} has action space {space}; actors take a Discrete space or a bounded Box"
        )
    if variation is not None:
        try:
            variation.apply_params(env.envs, env_id=config.id)
            return VectorEnv(config=config, env=env, actions=actions, variation=variation)
        except ValueError:
            env.close()
            raise
    return VectorEnv(config=config, env=env, actions=actions)
