"""Acting policies: the ``Policy`` interface, the epsilon-greedy policy of value-based agents, and the
stochastic policy of actor-critic agents on continuous actions (SAC).

A policy owns the acting network and its exploration: ``act(obs, env_steps=...)`` returns the
actions for a batch of observations and any per-step extras (e.g. log-probabilities) that an adder
may write to replay. The ``Actor`` loop loads new weights into it with ``load_weights``.

Usage::

    policy = EpsilonGreedyPolicy(network=q_net, epsilon=LinearEpsilon(start=1.0, end=0.01, steps=10_000), seed=0)
    step = policy.act(obs, env_steps=2_000)           # PolicyStep(actions int64 [B], extras {})
    policy.load_weights(state_dict)                   # or a whole nn.Module after an architecture change
    policy.describe(env_steps=2_000)                  # {"epsilon": 0.802}

    schedule = LinearEpsilon(start=1.0, end=0.05, steps=100_000)
    schedule(50_000)                                  # 0.525
    eps = apex_epsilon(index=3, num_actors=8)         # 0.4 ** (1 + 7 * 3 / 7) = 0.4 ** 4
    rng = np.random.default_rng(0)
    actions = epsilon_greedy(q_values, epsilon=eps, rng=rng)   # int64 [B]

    policy = GaussianPolicy(network=sac_actor, low=[-2.0], high=[2.0], random_steps=1_000, seed=[0, 3])
    policy.act(obs, env_steps=0).actions              # float32 [B, 1], uniform in the box (first 1000 steps)
    policy.act(obs, env_steps=5_000).actions          # a sample of the squashed Gaussian, inside the box
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "EpsilonGreedyPolicy",
    "GaussianPolicy",
    "Policy",
    "PolicyStep",
    "EpsilonSchedule",
    "LinearEpsilon",
    "ConstantEpsilon",
    "apex_epsilon",
    "apex_epsilons",
    "epsilon_greedy",
]


@dataclass
class PolicyStep:
    """A policy's decision for a batch of observations."""

    actions: np.ndarray
    """``[B]`` int64 (discrete) or ``[B, *shape]`` float32 (continuous)."""
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-row values the adder may store next to the transition (log-probabilities, ...)."""


@runtime_checkable
class Policy(Protocol):
    """The acting side of an agent: network + exploration, on the CPU of an actor process."""

    network: nn.Module

    def act(self, obs: np.ndarray, *, env_steps: int) -> PolicyStep:
        """Actions for ``obs`` ``[B, *obs_shape]``; ``env_steps`` is this actor's env steps so far."""
        ...

    def load_weights(self, weights: Mapping[str, Any] | nn.Module) -> None:
        """Take new learner weights: a state dict, or a whole network when the architecture changed."""
        ...

    def describe(self, *, env_steps: int) -> dict[str, float]:
        """Exploration state for the actor's stats (e.g. ``{"epsilon": 0.05}``)."""
        ...


@runtime_checkable
class EpsilonSchedule(Protocol):
    """Maps a step count (the actor's env steps so far) to an exploration probability in [0, 1]."""

    def __call__(self, step: int) -> float: ...


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


@dataclass(frozen=True)
class ConstantEpsilon:
    """The same epsilon at every step."""

    value: float

    def __post_init__(self) -> None:
        _check_probability("ConstantEpsilon.value", self.value)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True)
class LinearEpsilon:
    """Linear decay from ``start`` at step 0 to ``end`` at step ``steps``, then constant ``end``."""

    start: float = 1.0
    end: float = 0.05
    steps: int = 100_000

    def __post_init__(self) -> None:
        _check_probability("LinearEpsilon.start", self.start)
        _check_probability("LinearEpsilon.end", self.end)
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"LinearEpsilon.steps must be an integer >= 1, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        fraction = min(step / self.steps, 1.0)
        return float(self.start + fraction * (self.end - self.start))


def apex_epsilon(*, index: int, num_actors: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Ape-X epsilon of actor ``index`` of ``num_actors``: ``base ** (1 + alpha * index / (num_actors - 1))``.

    With one actor it is ``base`` (Horgan et al., 2018).
    """
    if isinstance(num_actors, bool) or not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
        raise ValueError(f"num_actors must be an integer >= 1, got {num_actors!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < num_actors:
        raise ValueError(f"index must be an integer in [0, {num_actors}), got {index!r}")
    _check_probability("base", base)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
    if num_actors == 1:
        return float(base)
    return float(base ** (1.0 + alpha * index / (num_actors - 1)))


def apex_epsilons(*, num_actors: int, base: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """The Ape-X epsilons of all ``num_actors`` actors, float64 ``[num_actors]``."""
    return np.array(
        [apex_epsilon(index=i, num_actors=num_actors, base=base, alpha=alpha) for i in range(num_actors)],
        dtype=np.float64,
    )


def epsilon_greedy(q_values: np.ndarray, *, epsilon: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Greedy actions on ``q_values`` ``[B, A]``, replaced by uniform random ones with prob. ``epsilon``.

    ``epsilon`` is a scalar or one value per row. Ties go to the lowest action index (argmax). The
    random draws are always made (one uniform and one integer per row) so that the RNG stream does
    not depend on the Q-values.
    """
    q = np.asarray(q_values)
    if q.ndim != 2 or q.shape[1] < 1 or q.dtype.kind not in "iuf":
        raise ValueError(f"q_values must be a numeric [batch, num_actions] array, got dtype {q.dtype} shape {q.shape}")
    eps = np.asarray(epsilon, dtype=np.float64)
    if eps.shape not in ((), (q.shape[0],)) or np.any((eps < 0) | (eps > 1)) or np.any(np.isnan(eps)):
        raise ValueError(f"epsilon must be a probability or one per row ({q.shape[0]}), got {epsilon!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    batch, num_actions = q.shape
    greedy = np.argmax(q, axis=1).astype(np.int64)
    explore = rng.random(batch) < eps
    random_actions = rng.integers(0, num_actions, size=batch, dtype=np.int64)
    return np.where(explore, random_actions, greedy)


def _loaded(network: nn.Module, weights: Mapping[str, Any] | nn.Module) -> nn.Module:
    """The acting network after new learner weights: ``weights`` itself when it is a whole network (the
    architecture changed), else ``network`` with the state dict loaded."""
    if isinstance(weights, nn.Module):
        return weights.eval().requires_grad_(False)
    network.load_state_dict(weights)
    return network


class EpsilonGreedyPolicy:
    """Greedy on the network's Q-values (QR heads: the quantile mean), random with probability epsilon.

    The network receives observations in the env's dtype (uint8 frames stay uint8; scaling is the
    network's, which the learner applies to replayed observations too) unless ``obs_transform`` is
    given. ``epsilon`` is a schedule over this actor's env steps.
    """

    def __init__(
        self,
        *,
        network: nn.Module,
        epsilon: EpsilonSchedule,
        seed: int | Any = 0,
        obs_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be an nn.Module, got {type(network).__name__}")
        if not callable(epsilon):
            raise ValueError(f"epsilon must be a schedule (step -> float), got {epsilon!r}")
        self.network = network.eval().requires_grad_(False)
        self.epsilon = epsilon
        self.obs_transform = obs_transform
        self._rng = np.random.default_rng(seed)

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """``[B, A]`` float32 Q-values of ``obs``."""
        with torch.inference_mode():
            x = torch.from_numpy(obs)
            if self.obs_transform is not None:
                x = self.obs_transform(x)
            q = self.network(x)
        if q.ndim == 3:  # QR-DQN: [B, A, quantiles]
            q = q.mean(dim=2)
        if q.ndim != 2 or q.shape[0] != obs.shape[0]:
            raise ValueError(f"network returned shape {tuple(q.shape)} for {obs.shape[0]} observations, "
                             f"expected Q-values [{obs.shape[0]}, num_actions]")
        return q.float().numpy()

    def act(self, obs: np.ndarray, *, env_steps: int) -> PolicyStep:
        actions = epsilon_greedy(self.q_values(obs), epsilon=self.epsilon(env_steps), rng=self._rng)
        return PolicyStep(actions=actions)

    def load_weights(self, weights: Mapping[str, Any] | nn.Module) -> None:
        self.network = _loaded(self.network, weights)

    def describe(self, *, env_steps: int) -> dict[str, float]:
        return {"epsilon": float(self.epsilon(env_steps))}


class GaussianPolicy:
    """Acts with a sample of a squashed-Gaussian actor (``learner.sac.GaussianActor``), or its mean.

    For this actor's first ``random_steps`` env steps the actions are uniform over the action box
    (SAC's warm-up, so that early replay is not shaped by an untrained actor). ``deterministic``
    (evaluation) takes the actor's mean action instead of a sample. The network must provide
    ``act(obs, deterministic=..., generator=...)`` returning actions inside ``[low, high]``.
    """

    def __init__(self, *, network: nn.Module, low: Any, high: Any, random_steps: int = 0,
                 deterministic: bool = False, seed: int | Any = 0) -> None:
        if not isinstance(network, nn.Module) or not callable(getattr(network, "act", None)):
            raise ValueError(f"network must be an nn.Module with act(obs, deterministic, generator), got "
                             f"{type(network).__name__}")
        self.low = np.asarray(low, dtype=np.float32).reshape(-1)
        self.high = np.asarray(high, dtype=np.float32).reshape(-1)
        if self.low.shape != self.high.shape or not np.all(np.isfinite(self.low)) or not np.all(self.low < self.high):
            raise ValueError(f"action bounds low={low!r}, high={high!r}: expected finite arrays of one shape "
                             "with low < high")
        self.random_steps = _check_step(random_steps)
        self.deterministic = bool(deterministic)
        self.network = network.eval().requires_grad_(False)
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))

    def act(self, obs: np.ndarray, *, env_steps: int) -> PolicyStep:
        if not self.deterministic and env_steps < self.random_steps:
            actions = self._rng.uniform(self.low, self.high, size=(obs.shape[0], self.low.size))
            return PolicyStep(actions=actions.astype(np.float32))
        with torch.inference_mode():
            actions = self.network.act(torch.as_tensor(obs, dtype=torch.float32), deterministic=self.deterministic,
                                       generator=self._generator)
        # Float rounding of tanh * scale + bias may land a hair outside the box: replay refuses that.
        return PolicyStep(actions=np.clip(actions.float().numpy(), self.low, self.high))

    def load_weights(self, weights: Mapping[str, Any] | nn.Module) -> None:
        self.network = _loaded(self.network, weights)

    def describe(self, *, env_steps: int) -> dict[str, float]:
        return {"random_actions": float(not self.deterministic and env_steps < self.random_steps)}
