"""Task variations: what makes one task of a continual scenario differ from another on the same env.

A :class:`TaskVariation` is applied when an actor builds its vector env for a task
(``make_vector_env(config, variation=...)``):

* ``params``: physical parameters of gymnasium control envs, set on every sub-env's unwrapped
  environment (CartPole ``length``, ``masspole``, ``masscart``, ``gravity``, ``force_mag``; Pendulum
  ``g``, ``m``, ``l``; MountainCar ``force``, ``gravity``; any numeric attribute the env has), and
  ``friction`` for MuJoCo envs (the sliding friction of every geom, as in Dohare et al.'s
  slippery-Ant setting). Quantities an env derives from them in its constructor are recomputed
  (CartPole's ``total_mass`` and ``polemass_length``).
* ``permute_observations``: a fixed random permutation of the observation's features (of the pixel
  positions of every frame for image observations), drawn from ``seed``;
* ``permute_actions``: a fixed random permutation of the discrete actions (or of the dimensions of
  a box whose bounds are the same in every dimension), drawn from ``seed`` as well;
* ``reward_noise``: the standard deviation of Gaussian noise added to the reward the agent learns
  from (after clipping); the episode returns, and so the statistics and evaluations, keep the env's
  true reward. A noisy task of the same dynamics: what a "warm start on a noisy task" needs;
* ``reward_scale``: a factor on the reward the agent learns from (after clipping, before the noise);
  the episode returns keep the true reward. The same task at another scale of its value targets
  (large targets are one known cause of lost trainability);
* ``mode`` and ``difficulty``: an Atari game's mode and difficulty switches (the game designers'
  variants, e.g. Breakout modes 0, 4, ..., 44 and difficulties 0-1); a value the game does not have
  is refused with the ones it has. Such a task is built from gymnasium's ALE env and preprocessing
  wrappers (the same 84x84 grayscale, frame skip, max-pool, no-op starts and frame stack as the
  vectorized ALE env, which cannot set modes) and steps about half as fast.

Example::

    variation = TaskVariation.from_dict({"params": {"length": 1.0}, "permute_observations": True}, default_seed=3)
    env = make_vector_env(EnvConfig(id="CartPole-v1"), variation=variation)
    variation.describe()        # "length=1.0, permuted observations (seed 3)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EnvTask", "TaskVariation"]

_KEYS = ("params", "permute_observations", "permute_actions", "seed", "mode", "difficulty", "reward_noise",
         "reward_scale")


def _permutation(size: int, seed: int, stream: int) -> np.ndarray:
    """A random permutation of ``size`` items that is not the identity (for 2 items: the swap), so
    that a permuted task always differs from the unpermuted one."""
    rng = np.random.default_rng([seed, stream])
    perm = rng.permutation(size)
    while size > 1 and np.array_equal(perm, np.arange(size)):
        perm = rng.permutation(size)
    return perm


def _recompute_cartpole(env: Any) -> None:
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length


#: Envs whose constructor derives quantities from the parameters a task may change.
_DERIVED = {"CartPoleEnv": _recompute_cartpole}


@dataclass(frozen=True)
class TaskVariation:
    """See the module docstring. The default changes nothing."""

    params: dict = field(default_factory=dict)
    permute_observations: bool = False
    permute_actions: bool = False
    seed: int = 0
    mode: int | None = None
    difficulty: int | None = None
    reward_noise: float = 0.0
    reward_scale: float = 1.0

    @classmethod
    def from_dict(cls, raw: Any, *, default_seed: int = 0) -> TaskVariation:
        """Parse a task's ``variation`` object; ValueError naming the bad key."""
        if not isinstance(raw, dict):
            raise ValueError(f"variation = {raw!r} is invalid: expected an object with keys from {list(_KEYS)}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"variation: unknown key(s) {unknown}; valid keys are {list(_KEYS)}")
        params = raw.get("params", {})
        if not isinstance(params, dict):
            raise ValueError(f"variation.params = {params!r} is invalid: expected an object of name -> number")
        for name, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"variation.params.{name} = {value!r} is invalid: expected a finite number")
        if "friction" in params and params["friction"] <= 0:
            raise ValueError(f"variation.params.friction = {params['friction']!r} is invalid: expected > 0")
        for key in ("permute_observations", "permute_actions"):
            if not isinstance(raw.get(key, False), bool):
                raise ValueError(f"variation.{key} = {raw[key]!r} is invalid: expected true or false")
        seed = raw.get("seed", default_seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"variation.seed = {seed!r} is invalid: expected an integer >= 0")
        for key in ("mode", "difficulty"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"variation.{key} = {value!r} is invalid: expected an integer >= 0 (Atari)")
        noise = raw.get("reward_noise", 0.0)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"variation.reward_noise = {noise!r} is invalid: expected a finite number >= 0")
        scale = raw.get("reward_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"variation.reward_scale = {scale!r} is invalid: expected a finite number > 0")
        return cls(params={k: float(v) for k, v in params.items()}, reward_noise=float(noise),
                   reward_scale=float(scale),
                   permute_observations=raw.get("permute_observations", False),
                   permute_actions=raw.get("permute_actions", False), seed=seed,
                   mode=raw.get("mode"), difficulty=raw.get("difficulty"))

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in sorted(self.params.items())]
        parts += [f"{k} {v}" for k, v in (("mode", self.mode), ("difficulty", self.difficulty)) if v is not None]
        if self.permute_observations:
            parts.append(f"permuted observations (seed {self.seed})")
        if self.permute_actions:
            parts.append(f"permuted actions (seed {self.seed})")
        if self.reward_scale != 1.0:
            parts.append(f"reward x{self.reward_scale:g}")
        if self.reward_noise:
            parts.append(f"reward noise {self.reward_noise:g}")
        return ", ".join(parts) or "unchanged"

    # -- permutations --------------------------------------------------------------------------------

    def observation_permutation(self, observation_shape: tuple[int, ...]) -> np.ndarray | None:
        """Indices into the flattened features (per frame for ``[C, H, W]`` images), or None."""
        if not self.permute_observations:
            return None
        size = int(np.prod(observation_shape[1:] if len(observation_shape) == 3 else observation_shape))
        return _permutation(size, self.seed, 1)

    def action_permutation(self, actions: Any) -> np.ndarray | None:
        """``env_action = perm[agent_action]`` (discrete) or the dimension order (box), or None."""
        if not self.permute_actions:
            return None
        from actors.envs import DiscreteActions

        if isinstance(actions, DiscreteActions):
            return _permutation(actions.n, self.seed, 2)
        if len(set(actions.low)) > 1 or len(set(actions.high)) > 1:
            raise ValueError(f"variation.permute_actions: the action box {actions} has different bounds per "
                             "dimension; permuting its dimensions would change the bounds")
        return _permutation(int(np.prod(actions.shape)), self.seed, 2)

    def spec(self, spec: Any) -> Any:
        """The env spec the agent sees under this variation (permutations keep shapes and bounds)."""
        self.action_permutation(spec.actions)  # refuses a box it cannot permute
        return spec

    # -- physical parameters -------------------------------------------------------------------------

    def apply_params(self, sub_envs: list[Any], *, env_id: str) -> None:
        """Set ``params`` on every sub-env (gymnasium ``Env`` objects); ValueError for an unknown one."""
        if not self.params:
            return
        for env in sub_envs:
            base = env.unwrapped
            for name, value in self.params.items():
                if name == "friction" and hasattr(base, "model") and hasattr(base.model, "geom_friction"):
                    base.model.geom_friction[:, 0] = value  # sliding friction of every geom
                    continue
                current = getattr(base, name, None)
                if isinstance(current, bool) or not isinstance(current, (int, float, np.floating, np.integer)):
                    known = sorted(k for k, v in vars(base).items() if isinstance(v, (int, float)) and
                                   not isinstance(v, bool) and not k.startswith("_"))
                    raise ValueError(f"variation.params.{name}: {env_id} has no numeric parameter {name!r}; "
                                     f"its numeric parameters are {known}")
                if isinstance(current, (int, np.integer)):
                    if not float(value).is_integer():
                        raise ValueError(f"variation.params.{name} = {value!r} is invalid: {env_id}'s {name} "
                                         "is an integer")
                    value = int(value)
                setattr(base, name, value)
            derive = _DERIVED.get(type(base).__name__)
            if derive is not None:
                derive(base)


@dataclass(frozen=True)
class EnvTask:
    """What an actor needs to step one task: its name (the label of its episode statistics), the env
    config and the variation. ``Actor(tasks=[...])`` switches between them at weight polls."""

    name: str
    env_config: Any
    variation: TaskVariation = field(default_factory=TaskVariation)
