"""Soft Actor-Critic as a plain class: twin-Q critic, tanh-Gaussian actor, automatic temperature.

Haarnoja et al. (2018), "Soft Actor-Critic Algorithms and Applications", in the form of CleanRL's
``sac_continuous_action`` (written anew here). No Ray, no gRPC: :class:`SAC` takes a batch of
tensors/arrays and returns priorities and metrics, like :class:`learner.dqn.DQN`, and implements
:class:`learner.core.Algorithm` with two networks, ``"actor"`` and ``"critic"``.

Batch fields (leading dimension ``B``), as written by the actors' n-step adder:

=============  ==========================  ===================================================
``obs``        ``[B, obs_dim]`` float      observation
``action``     ``[B, act_dim]`` float      action taken at ``obs``, inside ``[low, high]``
``reward``     ``[B]`` float               n-step discounted return ``sum_k gamma^k r_k``
``discount``   ``[B]`` float in [0, 1]     ``gamma^n * (1 - terminal)``: bootstrap multiplier
``next_obs``   ``[B, obs_dim]`` float      observation n steps later
=============  ==========================  ===================================================

Importance weights ``w`` ``[B]`` (prioritized replay) weight the critic's per-sample loss only.

One update, in order (``alpha = exp(log_alpha)`` as it is at the start of the update):

1. Critic. ``a', logp' = actor.sample(next_obs)`` (no grad), ``y = reward + discount *
   (min_j Q'_j(next_obs, a') - alpha * logp')`` with the target critic ``Q'``; per-sample loss
   ``(Q_1(s, a) - y)^2 + (Q_2(s, a) - y)^2`` (the *sum* of the twin squared errors, as CleanRL's
   ``qf1_loss + qf2_loss``, without a factor 1/2), batch loss ``mean_i w_i * loss_i``, plus every
   critic intervention's ``loss`` term (``obs`` = the critic input ``cat([obs, action])``, features
   from the online critic); backward, clipping (``max_grad_norm``), Adam step.
2. Actor and temperature, on every ``policy_frequency``-th update (updates ``N, 2N, ...``, counted
   from 1; i.e. when ``(ctx.step + 1) % policy_frequency == 0`` before ``ctx.step`` is stepped):
   ``a, logp = actor.sample(obs)`` (reparameterized), actor loss ``mean(alpha * logp - min_j
   Q_j(obs, a))`` with the critic as just stepped, plus the actor interventions' ``loss`` terms;
   the backward pass accumulates into the actor's parameters only (the critic's gradients are left
   as the critic step made them), clipping, Adam step. With ``autotune``: ``alpha_loss =
   mean(-log_alpha * (logp + target_entropy))`` (``logp`` of the same sample, detached), Adam step
   on ``log_alpha``. One actor step per ``policy_frequency`` critic steps (CleanRL takes
   ``policy_frequency`` actor steps at once; here the actor simply steps less often).
3. ``ctx.step += 1``; every intervention's ``after_step`` with ``probe_obs`` a mapping that gives
   each network its probe: ``{"actor": probe_obs, "critic": cat([probe_obs, mean action])}``
   (the critic's is computed when first read in a step, from the actor's deterministic action).
4. Polyak update of the target critic (``tau``, one ``_foreach_lerp_``), after the interventions
   so that it follows the weights they leave.
5. ``reset_every`` (primacy bias, Nikishin et al. 2022): every ``reset_every`` updates actor,
   critic and target critic are re-initialized (fresh weights drawn from a seed derived from
   ``seed`` and the step), the three Adam states emptied (learning rates kept) and ``log_alpha``
   set back to ``log(init_alpha)``.

Priorities: ``(|Q_1 - y| + |Q_2 - y|) / 2`` per sample. Metrics: ``critic_loss``, ``actor_loss``,
``alpha_loss`` and ``grad_norm_actor`` (of the last actor step; NaN before the first),
``actor_updated`` (1 on actor steps), ``alpha`` (after this update), ``q`` (mean ``Q_1(s, a)``),
``entropy`` (``-mean logp'`` of the target's next-state sample), ``td_error`` (mean priority),
``grad_norm_critic`` (before clipping), ``step``, ``sac/reset`` (with ``reset_every``), and the
interventions' metrics. Scalars and priorities come back in one device-to-host transfer.

Example::

    sac = SAC(SACConfig(hidden=(256, 256)), obs_shape=(17,), action_low=[-1.0] * 6, action_high=[1.0] * 6,
              device="cuda", seed=0,
              interventions=bind_interventions("redo", {"redo": {"period": 1000}}, networks=SAC.NETWORKS))
    sac.set_probe(probe_obs)
    result = sac.update(batch, weights=importance_weights)
    client.update_priorities(keys, result.priorities)
    print(result.metrics["critic_loss"], result.metrics["alpha"])
    publish(sac.acting_weights())          # GaussianActor state dict, action scale/bias included
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.core import (
    DeferredResult,
    InvalidBatch,
    UpdateResult,
    load_state_or_keep,
    packed_result,
    switch_task,
)
from learner.dqn import _adam, _is_number, _positive, _weighted_mean, adam_step, clip_grad_norm
from learner.networks import NetworkConfig, _dense_stack, _Parts, collect_head_layers
from learner.parallel import SINGLE, SingleProcess
from plasticity.base import InterventionContext, InterventionSet, NetworkSlot, structure_version
from plasticity.layers import HiddenLayer

BATCH_FIELDS = ("obs", "action", "reward", "discount", "next_obs")
#: Actions may exceed the bounds by this much (float32 rounding of ``tanh(u) * scale + bias``).
ACTION_TOLERANCE = 1e-5
#: Network-config overrides of interventions that SAC's networks take (``layer_norm``, activation swaps).
SUPPORTED_OVERRIDES = ("norm", "activation")
_STATE_FORMAT = 1
_STATE_KEYS = frozenset({
    "format", "actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "alpha_optimizer",
    "log_alpha", "step", "task", "interventions", "generator", "noise_generator", "last_policy",
})
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Streams of seeds derived from the constructor's seed (see _derived_seed).
_NOISE_STREAM, _RESET_STREAM = 1, 2


def _derived_seed(seed: int, stream: int, step: int = 0) -> int:
    """A 63-bit seed for ``stream`` (and ``step``), independent of ``seed`` itself and of other streams."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class SACConfig:
    """Hyper-parameters of the SAC update. The discount lives in the batch (n-step adder).

    Example::

        SACConfig(critic_lr=3e-4, policy_frequency=2, reset_every=200_000).validate()
    """

    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 1e-3
    """Adam learning rate of the twin critic."""
    alpha_lr: float = 1e-3
    """Adam learning rate of ``log_alpha`` (the temperature), with ``autotune``."""
    tau: float = 0.005
    """Polyak target updates: target <- (1 - tau) * target + tau * critic after every update."""
    init_alpha: float = 1.0
    """Initial temperature (> 0); the fixed temperature without ``autotune``."""
    autotune: bool = True
    """Learn the temperature so that the policy's entropy tracks ``target_entropy``."""
    target_entropy: float | None = None
    """Entropy target of the temperature loss; null = ``-prod(action_shape)`` (minus the action dimension)."""
    policy_frequency: int = 1
    """Actor and temperature take one step every this many critic updates."""
    hidden: tuple[int, ...] = (256, 256)
    """Widths of the hidden layers of the actor and of each of the two Q-networks."""
    layer_norm: bool = False
    """LayerNorm after each hidden Linear, before the activation (the layer_norm intervention sets it too)."""
    max_grad_norm: float | None = None
    """Clip each network's global gradient L2 norm to this value before its Adam step; null disables."""
    log_std_min: float = -5.0
    """Lower end of the policy's log standard deviation (a tanh squashes the raw output into the range)."""
    log_std_max: float = 2.0
    """Upper end of the policy's log standard deviation."""
    reset_every: int | None = None
    """Primacy-bias resets: every this many updates re-initialize actor, critic, target, Adam states and
    the temperature (Nikishin et al. 2022); null = never."""
    adam_eps: float = 1e-8
    """Adam epsilon of all three optimizers."""
    normalize_observations: bool = False
    """Normalize observations inside the networks by running mean and variance (clipped to +-10): the
    learner updates the statistics from its training batches, and they travel to the actors with the
    actor's weights, so acting and learning always normalize alike."""
    learning_starts: int = 5000
    """Env steps of the run (all actors together) whose actions are uniform over the action box before the
    actors sample the policy (SAC's warm-up; read by the actors, not by the update)."""
    bf16: bool = False
    """Run the update's forward passes and losses under bfloat16 autocast (the parameters, gradients, Adam
    state, noise and priorities stay float32). Meant for GPUs: on the CPU it works but is slower."""

    def __post_init__(self) -> None:
        # JSON and CLI hand tuples over as lists; keep the frozen config hashable and comparable.
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def validate(self) -> SACConfig:
        """Raise ValueError naming the first bad field; return self."""
        for name in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha", "adam_eps"):
            _positive(f"sac.{name}", getattr(self, name))
        if not _is_number(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"sac.tau must be in (0, 1], got {self.tau!r}")
        for name in ("autotune", "layer_norm", "normalize_observations", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sac.{name} must be true or false, got {getattr(self, name)!r}")
        if self.target_entropy is not None and not _is_number(self.target_entropy):
            raise ValueError(f"sac.target_entropy must be a finite number (or null for -action_dim), "
                             f"got {self.target_entropy!r}")
        if not _is_pos_int(self.policy_frequency):
            raise ValueError(f"sac.policy_frequency must be an integer >= 1, got {self.policy_frequency!r}")
        if not isinstance(self.hidden, tuple) or not self.hidden or not all(_is_pos_int(h) for h in self.hidden):
            raise ValueError(f"sac.hidden must be a non-empty list of integers >= 1, got {self.hidden!r}")
        if self.max_grad_norm is not None:
            _positive("sac.max_grad_norm", self.max_grad_norm, suffix=" (or null to disable clipping)")
        for name in ("log_std_min", "log_std_max"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"sac.{name} must be a finite number, got {getattr(self, name)!r}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError(f"sac.log_std_min must be < sac.log_std_max, got {self.log_std_min!r} >= "
                             f"{self.log_std_max!r}")
        if isinstance(self.learning_starts, bool) or not isinstance(self.learning_starts, int) \
                or self.learning_starts < 0:
            raise ValueError(f"sac.learning_starts must be an integer >= 0, got {self.learning_starts!r}")
        if self.reset_every is not None and not _is_pos_int(self.reset_every):
            raise ValueError(f"sac.reset_every must be an integer >= 1 (or null for no resets), got {self.reset_every!r}")
        return self


# ---------------------------------------------------------------------------------------------- networks


def _parts(hidden: Sequence[int], layer_norm: bool, activation: str | Callable[[], nn.Module]) -> _Parts:
    if not isinstance(hidden, (tuple, list)) or not hidden or not all(_is_pos_int(h) for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of integers >= 1, got {hidden!r}")
    if not isinstance(layer_norm, bool):
        raise ValueError(f"layer_norm must be true or false, got {layer_norm!r}")
    return _Parts(NetworkConfig(norm="layer_norm" if layer_norm else "none", activation=activation).validate())


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; expected a floating-point tensor")


class ObservationNormalizer(nn.Module):
    """``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics (buffers, so they are in
    the state dict and in the actors' weights). Only :meth:`update` changes them (the learner's batches).

    Example::

        norm = ObservationNormalizer(3)
        norm.update(batch_obs)          # running mean/variance over every row seen so far
        x = norm(obs)                   # normalized, clipped to +-10
    """

    def __init__(self, dim: int, *, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = float(clip), float(eps)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.var + self.eps).to(obs.dtype)
        return ((obs - self.mean.to(obs.dtype)) * scale).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        """Merge the rows of ``obs`` ``[B, dim]`` into the statistics (Chan et al.'s parallel update, float64)."""
        x = obs.detach().to(torch.float64).reshape(-1, self.mean.shape[0])
        n = float(x.shape[0])
        if n == 0:
            return
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class GaussianActor(nn.Module):
    """Tanh-squashed Gaussian policy: obs ``[B, obs_dim]`` -> hidden MLP -> ``head`` -> ``[B, 2 * act_dim]``.

    ``forward(obs) == head(features(obs))`` is the mean and the raw log-std concatenated; the raw
    log-std is squashed into ``[log_std_min, log_std_max]`` by a tanh (:meth:`distribution_params`).
    Actions are ``tanh(u) * action_scale + action_bias`` with ``u ~ N(mean, std)``; scale and bias
    are ``(high - low) / 2`` and ``(high + low) / 2``, buffers in the state dict, so a network loaded
    from :meth:`SAC.acting_weights` knows its bounds (default bounds ``[-1, 1]``). The network
    contract: ``encoder`` (the hidden MLP), ``features``, ``head`` (a Linear, or what an intervention
    put there), ``hidden_layers()`` (``encoder.fc<i>``) and ``output_layers()``.

    Example::

        actor = GaussianActor(3, (2,), (64, 64), action_low=[-2.0, 0.0], action_high=[2.0, 1.0])
        action, log_prob = actor.sample(obs, generator)                  # [B, 2], [B]; differentiable
        greedy = actor.act(obs, deterministic=True)                      # tanh(mean) * scale + bias
    """

    def __init__(
        self,
        obs_dim: int,
        action_shape: int | Sequence[int],
        hidden: Sequence[int] = (256, 256),
        layer_norm: bool = False,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        *,
        action_low: Sequence[float] | None = None,
        action_high: Sequence[float] | None = None,
        activation: str | Callable[[], nn.Module] = "relu",
        normalize_observations: bool = False,
    ):
        super().__init__()
        if not _is_pos_int(obs_dim):
            raise ValueError(f"obs_dim must be an integer >= 1, got {obs_dim!r}")
        shape = (action_shape,) if isinstance(action_shape, int) else tuple(action_shape)
        if len(shape) != 1 or not _is_pos_int(shape[0]):
            raise ValueError(f"action_shape must be (act_dim,) with act_dim >= 1, got {action_shape!r}")
        act_dim = shape[0]
        if not (_is_number(log_std_min) and _is_number(log_std_max) and log_std_min < log_std_max):
            raise ValueError(f"need finite log_std_min < log_std_max, got {log_std_min!r}, {log_std_max!r}")
        low, high = _bounds([-1.0] * act_dim if action_low is None else action_low,
                            [1.0] * act_dim if action_high is None else action_high)
        if low.shape != (act_dim,):
            raise ValueError(f"action bounds have {low.shape[0]} entries; action_shape is {shape}")
        parts = _parts(hidden, layer_norm, activation)
        modules, self._slots, width = _dense_stack(parts, obs_dim, list(hidden), "encoder.fc")
        self.encoder = nn.Sequential(*modules)
        self.head: nn.Module = nn.Linear(width, 2 * act_dim)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.feature_dim = width
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))
        #: Observation normalization by running statistics (``sac.normalize_observations``), else identity.
        self.normalizer: nn.Module = ObservationNormalizer(obs_dim) if normalize_observations else nn.Identity()

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]``: the last hidden layer's activations."""
        _check_float("obs", obs)
        return self.encoder(self.normalizer(obs.to(self.action_scale.dtype)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(obs))

    def params_from_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)`` from the head's output ``[B, 2 * act_dim]`` (log_std squashed into range)."""
        mean, raw = out.split(self.act_dim, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1.0)
        return mean, log_std

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)``, each ``[B, act_dim]``, of the Gaussian before the tanh."""
        return self.params_from_output(self(obs))

    def rsample(self, mean: torch.Tensor, log_std: torch.Tensor, generator: torch.Generator | None = None, *,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized ``(action [B, act_dim], log_prob [B])`` for ``u = mean + std * eps``.

        ``log_prob = sum_k [log N(u_k; mean_k, std_k) - log(scale_k * (1 - tanh(u_k)^2) + 1e-6)]``,
        with ``log N(u; mean, std) = -eps^2 / 2 - log_std - log sqrt(2 pi)``. ``eps`` is drawn with
        ``generator`` (on ``mean``'s device) or the global RNG, unless ``noise`` (shaped like ``mean``) is given.
        """
        eps = noise if noise is not None else torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        u = mean + log_std.exp() * eps
        squashed = torch.tanh(u)
        action = squashed * self.action_scale + self.action_bias
        log_prob = -0.5 * eps.pow(2) - log_std - _LOG_SQRT_2PI
        log_prob = log_prob - torch.log(self.action_scale * (1.0 - squashed.pow(2)) + 1e-6)
        return action, log_prob.sum(dim=-1)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized (differentiable) action and its log-probability ``[B]``."""
        mean, log_std = self.distribution_params(obs)
        return self.rsample(mean, log_std, generator)

    def deterministic_action(self, mean: torch.Tensor) -> torch.Tensor:
        """``tanh(mean) * scale + bias``."""
        return torch.tanh(mean) * self.action_scale + self.action_bias

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions ``[B, act_dim]`` without grad: sampled, or ``tanh(mean) * scale + bias`` if deterministic."""
        mean, log_std = self.distribution_params(obs)
        if deterministic:
            return self.deterministic_action(mean)
        return self.rsample(mean, log_std, generator)[0]

    def hidden_layers(self) -> list[HiddenLayer]:
        head_inputs = collect_head_layers(self.head, "input_layers")
        return [HiddenLayer(s.name, s.producer, s.activation, list(head_inputs if s.consumers is None else s.consumers),
                            s.norm) for s in self._slots]

    def output_layers(self) -> list[nn.Linear]:
        return collect_head_layers(self.head, "output_layers")


class TwinEncoder(nn.Module):
    """The two Q-networks' hidden MLPs ``q1`` and ``q2`` side by side: ``x -> cat([q1(x), q2(x)], -1)``."""

    def __init__(self, q1: nn.Sequential, q2: nn.Sequential):
        super().__init__()
        self.q1, self.q2 = q1, q2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q1(x), self.q2(x)], dim=-1)


class TwinHead(nn.Module):
    """``features [B, H1 + H2] -> [B, 2]``: ``out1`` reads the first ``H1`` columns, ``out2`` the rest."""

    def __init__(self, widths: tuple[int, int]):
        super().__init__()
        self.widths = tuple(widths)
        self.out1 = nn.Linear(widths[0], 1)
        self.out2 = nn.Linear(widths[1], 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f1, f2 = features.split(self.widths, dim=-1)
        return torch.cat([self.out1(f1), self.out2(f2)], dim=-1)

    def input_layers(self) -> list[nn.Linear]:
        return [self.out1, self.out2]

    def hidden_layers(self) -> list[HiddenLayer]:
        return []

    def output_layers(self) -> list[nn.Linear]:
        return [self.out1, self.out2]


class TwinQCritic(nn.Module):
    """Two independent Q-networks on ``x = cat([obs, action], -1)`` ``[B, obs_dim + act_dim]`` -> ``[B, 2]``.

    The network contract: ``encoder`` (:class:`TwinEncoder`, both hidden MLPs), ``features(x)`` (both
    last hidden layers concatenated, ``[B, 2 * H]``), ``head`` (:class:`TwinHead`, Q1's output Linear
    on the first half and Q2's on the second), ``forward(x) == head(features(x))``,
    ``hidden_layers()`` (``encoder.q1.fc<i>`` and ``encoder.q2.fc<i>``; Q1's last layer is read
    only by Q1's output layer) and ``output_layers()`` (both output Linears).

    Example::

        critic = TwinQCritic(3, 2, (64, 64))
        q = critic.q(obs, action)                 # [B, 2]: Q1 and Q2
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), layer_norm: bool = False,
                 *, activation: str | Callable[[], nn.Module] = "relu", normalize_observations: bool = False):
        super().__init__()
        if not _is_pos_int(obs_dim) or not _is_pos_int(act_dim):
            raise ValueError(f"obs_dim and act_dim must be integers >= 1, got {obs_dim!r}, {act_dim!r}")
        parts = _parts(hidden, layer_norm, activation)
        in_dim = obs_dim + act_dim
        m1, slots1, w1 = _dense_stack(parts, in_dim, list(hidden), "encoder.q1.fc")
        m2, slots2, w2 = _dense_stack(parts, in_dim, list(hidden), "encoder.q2.fc")
        self.encoder = TwinEncoder(nn.Sequential(*m1), nn.Sequential(*m2))
        self.head: nn.Module = TwinHead((w1, w2))
        self._slots = (slots1, slots2)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.feature_dim = w1 + w2
        # The observation part of the input is normalized with the actor's statistics (SAC copies them).
        self.normalizer: nn.Module | None = ObservationNormalizer(obs_dim) if normalize_observations else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalizer is not None:
            x = torch.cat([self.normalizer(x[:, :self.obs_dim]), x[:, self.obs_dim:]], dim=-1)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``[B, 2]``: ``Q1(obs, action)`` and ``Q2(obs, action)``."""
        return self(torch.cat([obs, action], dim=-1))

    def hidden_layers(self) -> list[HiddenLayer]:
        # Every TwinHead inside the head (one, or several after a plasticity injection) reads each
        # Q-network's last hidden layer through its own output Linear.
        twins = [m for m in self.head.modules() if isinstance(m, TwinHead)]
        layers = []
        for index, slots in enumerate(self._slots):
            readers = [twin.out1 if index == 0 else twin.out2 for twin in twins]
            if not twins:  # some other head: whatever reads the features
                readers = collect_head_layers(self.head, "input_layers")
            layers += [HiddenLayer(s.name, s.producer, s.activation, list(readers if s.consumers is None else s.consumers),
                                   s.norm) for s in slots]
        return layers

    def output_layers(self) -> list[nn.Linear]:
        return collect_head_layers(self.head, "output_layers")


def _bounds(low: Sequence[float], high: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Action bounds as float64 arrays; refuses mismatched lengths, non-finite values and low >= high."""
    try:
        lo = np.asarray(low, dtype=np.float64)
        hi = np.asarray(high, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"action bounds must be lists of numbers, got {low!r}, {high!r}") from exc
    if lo.ndim != 1 or lo.shape != hi.shape or lo.size == 0:
        raise ValueError(f"action_low and action_high must be non-empty lists of the same length, got "
                         f"{lo.shape} and {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"action bounds must be finite, got low {lo.tolist()}, high {hi.tolist()}")
    if not (lo < hi).all():
        raise ValueError(f"action_low must be < action_high in every dimension, got low {lo.tolist()}, high {hi.tolist()}")
    return lo, hi


# ---------------------------------------------------------------------------------------------- probes


class _Probes(Mapping):
    """Each network's probe batch: ``"actor"`` the observations, ``"critic"`` ``cat([obs, mean action])``.

    The critic's is computed when first read in a step (the actor's deterministic action at that
    moment) and reused for the rest of that step.
    """

    def __init__(self, sac: SAC, obs: torch.Tensor):
        self._sac = sac
        self._obs = obs
        self._critic: torch.Tensor | None = None
        self._at: int | None = None

    def invalidate(self) -> None:
        self._critic = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "actor":
            return self._obs
        if name == "critic":
            step = self._sac.ctx.step
            if self._critic is None or self._at != step:
                action = self._sac.actor.act(self._obs, deterministic=True)
                self._critic, self._at = torch.cat([self._obs, action], dim=-1), step
            return self._critic
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(SAC.NETWORKS)

    def __len__(self) -> int:
        return len(SAC.NETWORKS)


# ---------------------------------------------------------------------------------------------- SAC


class SAC:
    """Actor, twin critic and its target, three Adam optimizers, the temperature; one :meth:`update` per batch.

    Networks are initialized from ``seed`` under a forked RNG (the global torch RNG is left alone);
    ``ctx.generator`` (the interventions') and :attr:`generator` (the update's sampling noise) live
    on ``device`` and are seeded from ``seed`` as well, so the run is a function of ``seed`` and the
    batches. ``parallel``: the rank's :class:`learner.parallel.ReplicaGroup` for data-parallel ranks
    (gradients, observation statistics and the interventions' decisions reduced over ranks; the
    update's noise drawn for the whole group). ``interventions``: an :class:`plasticity.base.InterventionSet` from
    :func:`plasticity.interventions.bind_interventions` with ``networks=SAC.NETWORKS`` (or None).
    Build-time overrides (``norm``, ``activation``) apply to the network they are bound to.

    Example: see the module docstring.
    """

    #: The plastic networks this algorithm trains (what interventions may target).
    NETWORKS = ("actor", "critic")
    #: ``update(..., defer=True)`` hands back a :class:`learner.core.DeferredResult` on CUDA devices.
    supports_defer = True

    def __init__(
        self,
        config: SACConfig,
        *,
        obs_shape: tuple[int],
        action_low: Sequence[float],
        action_high: Sequence[float],
        device: str | torch.device = "cpu",
        seed: int = 0,
        interventions: InterventionSet | None = None,
        parallel: SingleProcess = SINGLE,
    ):
        config.validate()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        obs_shape = tuple(obs_shape) if isinstance(obs_shape, (tuple, list)) else obs_shape
        if not isinstance(obs_shape, tuple) or len(obs_shape) != 1 or not _is_pos_int(obs_shape[0]):
            raise ValueError(f"obs_shape must be (obs_dim,) with obs_dim >= 1 (SAC takes vector observations), "
                             f"got {obs_shape!r}")
        low, high = _bounds(action_low, action_high)
        if interventions is None:
            interventions = InterventionSet([], networks=self.NETWORKS)
        if not isinstance(interventions, InterventionSet):
            raise ValueError(f"interventions must be a plasticity.base.InterventionSet (bind_interventions(..., "
                             f"networks=SAC.NETWORKS)) or None, got {interventions!r}")
        if set(interventions.networks) - set(self.NETWORKS):
            raise ValueError(f"interventions target networks {list(interventions.networks)}; SAC has {list(self.NETWORKS)}")
        self._arch = {name: self._architecture(config, interventions, name) for name in self.NETWORKS}
        if config.reset_every is not None and "plasticity_injection" in interventions.names:
            raise ValueError("sac.reset_every re-initializes the networks as built; it cannot be combined with "
                             "plasticity_injection, which changes their structure")
        self.config = config
        self.obs_shape = obs_shape
        self.obs_dim = obs_shape[0]
        self.act_dim = int(low.shape[0])
        self.action_low, self.action_high = low, high
        self.target_entropy = float(-self.act_dim if config.target_entropy is None else config.target_entropy)
        self.device = torch.device(device)
        self.seed = seed
        self.interventions = interventions
        actor, critic = self._build_networks(seed)
        self.actor: GaussianActor = actor.to(self.device)
        self.critic: TwinQCritic = critic.to(self.device)
        self.critic_target: TwinQCritic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), dtype=torch.float32, device=self.device,
                                      requires_grad=True)
        dev = self.device
        self.actor_optimizer = _adam(self.actor.parameters(), lr=config.actor_lr, eps=config.adam_eps, device=dev)
        self.critic_optimizer = _adam(self.critic.parameters(), lr=config.critic_lr, eps=config.adam_eps, device=dev)
        self.alpha_optimizer = _adam([self.log_alpha], lr=config.alpha_lr, eps=config.adam_eps, device=dev)
        #: The update's sampling noise (next-state and policy samples); checkpointed.
        self.generator = torch.Generator(device=dev).manual_seed(_derived_seed(seed, _NOISE_STREAM))
        self.ctx = InterventionContext.of(
            {"actor": NetworkSlot(self.actor, self.actor_optimizer, None),
             "critic": NetworkSlot(self.critic, self.critic_optimizer, self.critic_target)},
            generator=torch.Generator(device=dev).manual_seed(seed),
        )
        self.parallel = parallel
        self.ctx.all_reduce_mean = parallel.all_reduce_mean
        self._low = {torch.device("cpu"): torch.from_numpy(low)}
        self._high = {torch.device("cpu"): torch.from_numpy(high)}
        self._probes: _Probes | None = None
        # actor_loss, alpha_loss, grad_norm_actor of the last actor step (NaN before the first).
        self._last_policy = torch.full((3,), float("nan"), device=dev)
        self.interventions.setup(self.ctx)
        self._cache_parameters()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _architecture(config: SACConfig, interventions: InterventionSet, name: str) -> dict[str, Any]:
        overrides = interventions.network_overrides(name)
        unknown = sorted(set(overrides) - set(SUPPORTED_OVERRIDES))
        if unknown:
            raise ValueError(f"interventions override network fields {unknown} of the {name!r} network; SAC's "
                             f"networks take only {list(SUPPORTED_OVERRIDES)}")
        norm = overrides.get("norm", "layer_norm" if config.layer_norm else "none")
        if norm not in ("none", "layer_norm"):
            raise ValueError(f"interventions set norm {norm!r} on the {name!r} network; expected 'none' or 'layer_norm'")
        return {"layer_norm": norm == "layer_norm", "activation": overrides.get("activation", "relu")}

    @classmethod
    def build_actor(cls, config: SACConfig, *, obs_dim: int, action_low: Sequence[float],
                    action_high: Sequence[float], interventions: InterventionSet | None = None,
                    seed: int = 0) -> GaussianActor:
        """The actor exactly as ``SAC(config, ..., seed=seed, interventions=...)`` initializes it, without the
        critic and the optimizers: what actors act with until the learner's first weights arrive.

            actor = SAC.build_actor(SACConfig(), obs_dim=3, action_low=[-2.0], action_high=[2.0])
        """
        architecture = cls._architecture(config, interventions or InterventionSet([], networks=cls.NETWORKS), "actor")
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return cls._new_actor(config, obs_dim, action_low, action_high, architecture)

    @staticmethod
    def _new_actor(config: SACConfig, obs_dim: int, action_low: Sequence[float], action_high: Sequence[float],
                   architecture: dict[str, Any]) -> GaussianActor:
        return GaussianActor(obs_dim, (len(action_low),), config.hidden, architecture["layer_norm"],
                             config.log_std_min, config.log_std_max, action_low=list(action_low),
                             action_high=list(action_high), activation=architecture["activation"],
                             normalize_observations=config.normalize_observations)

    def _build_networks(self, seed: int) -> tuple[GaussianActor, TwinQCritic]:
        """Freshly initialized actor and critic (on the CPU) from ``seed``, under a forked global RNG."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            actor = self._new_actor(cfg, self.obs_dim, self.action_low.tolist(), self.action_high.tolist(),
                                    self._arch["actor"])
            critic = TwinQCritic(self.obs_dim, self.act_dim, cfg.hidden, self._arch["critic"]["layer_norm"],
                                 activation=self._arch["critic"]["activation"],
                                 normalize_observations=cfg.normalize_observations)
        return actor, critic

    # ------------------------------------------------------------------ properties

    @property
    def step(self) -> int:
        """Updates taken so far (``ctx.step``; one critic step each)."""
        return self.ctx.step

    @property
    def alpha(self) -> float:
        """The current temperature ``exp(log_alpha)`` (a device sync)."""
        return float(self.log_alpha.detach().exp())

    def networks(self) -> dict[str, NetworkSlot]:
        """``{"actor": NetworkSlot(actor, actor_optimizer, None), "critic": NetworkSlot(critic, critic_optimizer, target)}``."""
        return dict(self.ctx.networks)

    def _cache_parameters(self) -> None:
        # Parameter lists read on the hot path, rebuilt whenever an intervention changes the module tree.
        self._actor_params = list(self.actor.parameters())
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        self._critic_buffers = list(self.critic.buffers())
        self._target_buffers = list(self.critic_target.buffers())
        if len(self._critic_params) != len(self._target_params):
            raise RuntimeError(
                f"critic ({len(self._critic_params)}) and target ({len(self._target_params)}) networks have "
                "different parameter counts; an intervention changed one without the other"
            )
        self._structure = structure_version(self.ctx)

    def _refresh_if_restructured(self) -> None:
        if structure_version(self.ctx) != self._structure:
            self._cache_parameters()

    # ------------------------------------------------------------------ batches

    @staticmethod
    def _tensor(name: str, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        raise InvalidBatch(f"batch[{name!r}] must be a torch.Tensor or numpy array, got {type(value).__name__}")

    def _bound(self, table: dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
        if device not in table:
            table[device] = table[torch.device("cpu")].to(device)
        return table[device]

    def _autocast(self) -> Any:
        """``sac.bf16``: forward passes and losses in bfloat16 (parameters, gradients and Adam stay float32)."""
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def check_batch(self, batch: Mapping[str, Any], *, weights: Any = None) -> None:
        """Raise :class:`InvalidBatch` where :meth:`update` would refuse ``batch``; change nothing (what
        data-parallel ranks agree on before they update)."""
        self._validated(batch, weights)

    def _prepare(self, batch: Mapping[str, Any], weights: Any) -> tuple[torch.Tensor, ...]:
        """Validate the whole batch before anything is touched, then move it to the device."""
        t, w = self._validated(batch, weights)
        dev = self.device
        return (
            t["obs"].to(dev, torch.float32, non_blocking=True),
            t["action"].to(dev, torch.float32, non_blocking=True),
            t["reward"].to(dev, torch.float32, non_blocking=True),
            t["discount"].to(dev, torch.float32, non_blocking=True),
            t["next_obs"].to(dev, torch.float32, non_blocking=True),
            None if w is None else w.to(dev, torch.float32, non_blocking=True),
        )

    def _validated(self, batch: Mapping[str, Any], weights: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The batch's fields and weights as tensors, where they are, once every check passed.

        Value checks run where the batch is, with one host read for all of them (on host tensors,
        what the replay dataset hands over, no device synchronization at all).
        """
        if not isinstance(batch, Mapping):
            raise InvalidBatch(f"batch must be a mapping of field -> array, got {type(batch).__name__}")
        missing = [k for k in BATCH_FIELDS if k not in batch]
        if missing:
            raise InvalidBatch(f"batch lacks fields {missing}; expected {list(BATCH_FIELDS)}, got {sorted(batch)}")
        t = {k: self._tensor(k, batch[k]) for k in BATCH_FIELDS}
        size = t["obs"].shape[0] if t["obs"].dim() >= 1 else 0
        if size < 1:
            raise InvalidBatch(f"batch['obs'] must have shape [B, {self.obs_dim}] with B >= 1, got {tuple(t['obs'].shape)}")
        expected = {"obs": (size, self.obs_dim), "next_obs": (size, self.obs_dim), "action": (size, self.act_dim),
                    "reward": (size,), "discount": (size,)}
        for key in BATCH_FIELDS:
            if tuple(t[key].shape) != expected[key]:
                raise InvalidBatch(f"batch[{key!r}] has shape {tuple(t[key].shape)}; expected {expected[key]}")
            if not t[key].is_floating_point():
                raise InvalidBatch(f"batch[{key!r}] must be floating point, got dtype {t[key].dtype}")
        w = None
        if weights is not None:
            w = self._tensor("weights", weights)
            if tuple(w.shape) != (size,) or not w.is_floating_point():
                raise InvalidBatch(f"weights must be a float array of shape ({size},), got {w.dtype} {tuple(w.shape)}")
        action = t["action"]
        low, high = self._bound(self._low, action.device), self._bound(self._high, action.device)
        a_min, a_max = action.amin(dim=0).double(), action.amax(dim=0).double()
        d_min, d_max = torch.aminmax(t["discount"])
        checks = [
            torch.isfinite(t["obs"]).all(),
            torch.isfinite(t["next_obs"]).all(),
            torch.isfinite(t["reward"]).all(),
            (d_min >= 0) & (d_max <= 1),  # False for NaN
            ((a_min >= low - ACTION_TOLERANCE) & (a_max <= high + ACTION_TOLERANCE)).all(),  # False for NaN
        ]
        if w is not None:
            w_min, w_max = torch.aminmax(w)
            checks.append((w_min >= 0) & torch.isfinite(w_max))
        ok = torch.stack([c.to(t["obs"].device) for c in checks]).tolist()  # the one host read
        if not all(ok):
            self._raise_invalid(ok, t, w)
        return t, w

    def _raise_invalid(self, ok: list[bool], t: dict[str, torch.Tensor], w: torch.Tensor | None) -> None:
        for key, good in zip(("obs", "next_obs", "reward"), ok[:3], strict=True):
            if not good:
                raise InvalidBatch(f"batch[{key!r}] holds non-finite values (NaN or inf)")
        if not ok[3]:
            d = t["discount"].double()
            raise InvalidBatch(f"batch['discount'] must be finite and in [0, 1] (gamma^n * (1 - terminal)), got min "
                               f"{float(d.min())}, max {float(d.max())}, NaN {bool(d.isnan().any())}")
        if not ok[4]:
            a = t["action"].double()
            raise InvalidBatch(
                f"batch['action'] holds values outside the action bounds low {self.action_low.tolist()}, high "
                f"{self.action_high.tolist()} (tolerance {ACTION_TOLERANCE}): per-dimension min "
                f"{a.amin(dim=0).tolist()}, max {a.amax(dim=0).tolist()}, NaN {bool(a.isnan().any())}")
        w_min, w_max = torch.aminmax(w.double())
        raise InvalidBatch(f"weights must be finite and >= 0, got min {float(w_min)}, max {float(w_max)}")

    # ------------------------------------------------------------------ the losses

    def _target_values(self, reward, discount, next_obs, alpha, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(``y = reward + discount * (min_j Q'_j(next_obs, a') - alpha * logp')`` [B], ``logp'`` [B]); no grad."""
        with torch.no_grad():
            mean, log_std = self.actor.distribution_params(next_obs)
            next_action, next_logp = self.actor.rsample(mean, log_std, noise=self._noise(mean, generator))
            next_q = self.critic_target.q(next_obs, next_action).min(dim=1).values
            return reward + discount * (next_q - alpha * next_logp), next_logp

    def _noise(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` ``[B, act_dim]``. With data-parallel ranks, this rank's
        rows of one draw for the whole group's batch: every rank draws the same numbers (the generators
        stay in step) and the group's update is one process's update on the concatenated batch."""
        rank, ranks = self.parallel.rank, self.parallel.world_size
        rows = like.shape[0]
        noise = torch.randn((rows * ranks, *like.shape[1:]), generator=generator, device=like.device,
                            dtype=torch.float32)   # float32 under bf16 autocast too: the same draws either way
        return noise if ranks == 1 else noise[rank * rows:(rank + 1) * rows]

    @staticmethod
    def _td(q: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss ``sum_j (Q_j - y)^2`` [B] with grad, priorities ``mean_j |Q_j - y|`` [B])."""
        diff = q - y[:, None]
        return diff.pow(2).sum(dim=1), diff.detach().abs().mean(dim=1)

    def per_sample_loss(self, batch: Mapping[str, Any], *, network: str | None = None) -> torch.Tensor:
        """``[B]`` per-sample loss, with grad: ``"critic"`` (default) the twin TD loss the update trains,
        ``"actor"`` ``alpha * logp - min_j Q_j(obs, a)`` with ``a ~ pi(obs)``.

        The noise comes from a copy of :attr:`generator`, which is left as it is: the critic's loss is
        exactly the one the next :meth:`update` on ``batch`` would train (without importance
        weights), repeated calls give the same values, and calling this does not change training.
        """
        if network not in (None, *self.NETWORKS):
            raise ValueError(f"SAC's networks are 'actor' and 'critic'; got network={network!r}")
        obs, action, reward, discount, next_obs, _ = self._prepare(batch, None)
        generator = torch.Generator(device=self.device)
        generator.set_state(self.generator.get_state())
        alpha = self.log_alpha.detach().exp()
        if network == "actor":
            pi, logp = self.actor.sample(obs, generator)
            return alpha * logp - self.critic.q(obs, pi).min(dim=1).values
        y, _ = self._target_values(reward, discount, next_obs, alpha, generator)
        return self._td(self.critic.q(obs, action), y)[0]

    # ------------------------------------------------------------------ the update

    @staticmethod
    def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    @staticmethod
    def _zero_grads(params: list[torch.Tensor]) -> None:
        current = [p.grad for p in params if p.grad is not None]
        if current:
            torch._foreach_zero_(current)

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, network_params: list[torch.Tensor]) -> torch.Tensor:
        """Backward into ``optimizer``'s parameters only, clip the network's gradients, Adam step; the norm."""
        inputs = self._trainable(optimizer)
        self._zero_grads(inputs)
        loss.backward(inputs=inputs)
        grads = [p.grad for p in network_params if p.grad is not None]
        # The mean over ranks, before clipping (the temperature has no network: its own gradient).
        self.parallel.grad_sync(grads if network_params else [p.grad for p in inputs if p.grad is not None])
        norm = clip_grad_norm(grads, self.config.max_grad_norm) if grads else torch.zeros((), device=self.device)
        adam_step(optimizer)
        return norm

    def update(self, batch: Mapping[str, torch.Tensor | np.ndarray], *, weights: Any = None,
               defer: bool = False) -> UpdateResult | DeferredResult:
        """One SAC update on ``batch`` (fields: see the module docstring); ``weights``: importance weights [B];
        ``defer``: see :meth:`learner.core.Algorithm.update`.

        A malformed batch raises :class:`learner.core.InvalidBatch` before any state changes.
        """
        obs, action, reward, discount, next_obs, w = self._prepare(batch, weights)
        cfg = self.config
        alpha = self.log_alpha.detach().exp()
        if cfg.normalize_observations:  # this batch's rows (every rank's) join the statistics before anything reads them
            self.actor.normalizer.update(self.parallel.gather_rows(obs))
            self._share_observation_statistics()

        # Critic (forward passes and loss under sac.bf16's autocast; backward and Adam outside it, in float32).
        with self._autocast():
            y, next_logp = self._target_values(reward, discount, next_obs, alpha, self.generator)
            x = torch.cat([obs, action], dim=-1)
            features = self.critic.features(x)
            q = self.critic.head(features).float()
            per_sample, priorities = self._td(q, y.float())
            critic_loss = _weighted_mean(per_sample, w)
            extra, terms = self.interventions.loss(self.ctx, "critic", obs=x, features=features)
        grad_norm_critic = self._step(critic_loss if extra is None else critic_loss + extra.float(),
                                      self.critic_optimizer, self._critic_params)

        # Actor and temperature.
        actor_updated = (self.ctx.step + 1) % cfg.policy_frequency == 0
        if actor_updated:
            with self._autocast():
                actor_features = self.actor.features(obs)
                mean, log_std = self.actor.params_from_output(self.actor.head(actor_features))
                pi, logp = self.actor.rsample(mean, log_std, noise=self._noise(mean, self.generator))
                logp = logp.float()
                actor_loss = (alpha * logp - self.critic.q(obs, pi).min(dim=1).values.float()).mean()
                extra, actor_terms = self.interventions.loss(self.ctx, "actor", obs=obs, features=actor_features)
            terms.update(actor_terms)
            grad_norm_actor = self._step(actor_loss if extra is None else actor_loss + extra.float(),
                                         self.actor_optimizer, self._actor_params)
            if cfg.autotune:
                alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
                self._step(alpha_loss, self.alpha_optimizer, [])
            else:
                alpha_loss = torch.zeros((), device=self.device)
            # The group's mean with data-parallel ranks: this state is checkpointed, and replicas stay identical.
            self._last_policy = self.parallel.all_reduce_mean(
                torch.stack([actor_loss.detach(), alpha_loss.detach(), grad_norm_actor.detach()]))

        self.ctx.step += 1
        metrics: dict[str, float] = self.interventions.after_step(self.ctx, probe_obs=self._probes)
        self._refresh_if_restructured()
        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._critic_params, cfg.tau)
            if self._target_buffers:
                torch._foreach_copy_(self._target_buffers, self._critic_buffers)
        reset = cfg.reset_every is not None and self.ctx.step % cfg.reset_every == 0
        if reset:
            self._reset_networks()

        names = ["critic_loss", "q", "entropy", "td_error", "grad_norm_critic", "alpha",
                 "actor_loss", "alpha_loss", "grad_norm_actor", *terms]
        scalars = torch.stack([
            critic_loss.detach(), q[:, 0].detach().mean(), -next_logp.mean(), priorities.mean(),
            grad_norm_critic.detach(), self.log_alpha.detach().exp(), *self._last_policy, *terms.values(),
        ]).float()
        metrics["actor_updated"] = float(actor_updated)
        metrics["step"] = float(self.ctx.step)
        if cfg.reset_every is not None:
            metrics["sac/reset"] = float(reset)
        # One device->host transfer for priorities and every scalar metric (deferred: no wait for it here).
        return packed_result(priorities, names, scalars, metrics, defer=defer)

    def _reset_networks(self) -> None:
        """Primacy-bias reset: fresh actor, critic (and target = critic), empty Adam states, initial alpha."""
        actor, critic = self._build_networks(_derived_seed(self.seed, _RESET_STREAM, self.ctx.step))
        # The observation statistics describe the data, not what was learned: they survive the reset.
        statistics = copy.deepcopy(self.actor.normalizer.state_dict())
        with torch.no_grad():
            self.actor.load_state_dict(actor.state_dict())
            self.critic.load_state_dict(critic.state_dict())
            self.critic_target.load_state_dict(critic.state_dict())
            self.log_alpha.fill_(math.log(self.config.init_alpha))
            if self.config.normalize_observations:
                self.actor.normalizer.load_state_dict(statistics)
                self._share_observation_statistics()
        for optimizer in (self.actor_optimizer, self.critic_optimizer, self.alpha_optimizer):
            optimizer.state.clear()
        if self._probes is not None:
            self._probes.invalidate()

    @torch.no_grad()
    def _share_observation_statistics(self) -> None:
        """The critic and its target normalize with the actor's statistics."""
        source = self.actor.normalizer
        for critic in (self.critic, self.critic_target):
            for name in ("mean", "var", "count"):
                getattr(critic.normalizer, name).copy_(getattr(source, name))

    # ------------------------------------------------------------------ probes and task switches

    def set_probe(self, obs: torch.Tensor | np.ndarray | None) -> None:
        """The probe observations ``[P, obs_dim]`` behind ``after_step``'s per-network probes (None: no probe).

        Not checkpointed.
        """
        if obs is None:
            self._probes = None
            return
        probe = self._tensor("probe", obs)
        if probe.dim() != 2 or probe.shape[1] != self.obs_dim or probe.shape[0] < 1:
            raise ValueError(f"probe obs has shape {tuple(probe.shape)}; expected (P, {self.obs_dim})")
        if not probe.is_floating_point():
            raise ValueError(f"probe obs has dtype {probe.dtype}; expected floating point")
        self._probes = _Probes(self, probe.to(self.device, torch.float32))

    def task_switch(self, task: int | None = None) -> dict[str, float]:
        """Tell the interventions that the task changed (``ctx.task`` becomes ``task`` or ``task + 1``)."""
        metrics = switch_task(self.ctx, self.interventions, task)
        self._refresh_if_restructured()
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints

    def acting_network(self) -> GaussianActor:
        """The live actor (what actors act with)."""
        return self.actor

    def acting_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the actor's state dict (``action_scale``/``action_bias`` buffers included)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.actor.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: networks, Adam states, temperature, counters,
        interventions, both generators.

        Tensors alias live state (as ``nn.Module.state_dict`` does): save or deep-copy before further
        updates. The probe batch and ``ctx.shared`` are not included (as for DQN).
        """
        return {
            "format": _STATE_FORMAT,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "log_alpha": self.log_alpha.detach(),
            "step": self.ctx.step,
            "task": self.ctx.task,
            "interventions": self.interventions.state_dict(),
            "generator": self.ctx.generator.get_state(),
            "noise_generator": self.generator.get_state(),
            "last_policy": self._last_policy,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; on any error the previous state is put back and ValueError raised."""
        load_state_or_keep(state, algorithm="SAC", keys=_STATE_KEYS, state_format=_STATE_FORMAT,
                           interventions=self.interventions, current=self.state_dict, apply=self._apply_state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        # Interventions first: one that changes a network's structure (e.g. a head injection) rebuilds
        # it before the networks' and optimizers' tensors are loaded into that structure.
        self.interventions.load_state_dict(state["interventions"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        log_alpha = state["log_alpha"]
        if not isinstance(log_alpha, torch.Tensor) or log_alpha.shape != () or not bool(torch.isfinite(log_alpha)):
            raise ValueError(f"log_alpha must be a finite scalar tensor, got {log_alpha!r}")
        last = state["last_policy"]
        if not isinstance(last, torch.Tensor) or last.shape != (3,):
            raise ValueError(f"last_policy must be a tensor of shape (3,), got {last!r}")
        for key in ("step", "task"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {state[key]!r}")
        with torch.no_grad():
            self.log_alpha.copy_(log_alpha)
        self._last_policy = last.detach().to(self.device, torch.float32, copy=True)
        self.ctx.step = state["step"]
        self.ctx.task = state["task"]
        self.ctx.generator.set_state(state["generator"])
        self.generator.set_state(state["noise_generator"])
        self._cache_parameters()
        if self._probes is not None:
            self._probes.invalidate()


__all__ = ["BATCH_FIELDS", "SAC", "GaussianActor", "SACConfig", "TwinEncoder", "TwinHead", "TwinQCritic"]
