"""DQN family as a plain class: (Double) DQN and QR-DQN updates on n-step batches, with interventions.

No Ray, no gRPC: :class:`DQN` takes a batch of tensors/arrays and returns priorities and metrics.
The learner loop (``learner/loop.py``) feeds it prefetched batches, writes the priorities back to
replay and publishes :meth:`DQN.weights` to actors.

Batch fields (leading dimension ``B``), as written by the actors' n-step adder:

=============  ==========================  ===================================================
``obs``        ``[B, *obs_shape]``         ``obs_dtype`` (uint8 frames stay uint8)
``action``     ``[B]`` integer             action taken at ``obs``
``reward``     ``[B]`` float               n-step discounted return ``sum_k gamma^k r_k``
``discount``   ``[B]`` float               ``gamma^n * (1 - terminal)``: bootstrap multiplier
``next_obs``   ``[B, *obs_shape]``         observation n steps later
=============  ==========================  ===================================================

Target: ``y = reward + discount * Q_target(next_obs, a*)`` with ``a* = argmax_a Q_online(next_obs, a)``
(double) or ``argmax_a Q_target(next_obs, a)``. Loss: ``mean_i w_i * huber_delta(y_i - Q(obs_i, a_i))``
with importance weights ``w`` (1 without). QR-DQN (``NetworkConfig.distributional == "qr"``): the
quantile Huber loss of Dabney et al. (2018), summed over online quantiles and averaged over target
quantiles, actions chosen by the mean over quantiles.

One update, in order: forward, TD loss + every intervention's ``loss`` (features from the online
net), backward, gradient clipping, Adam step, ``ctx.step += 1``, every intervention's
``after_step``, then the target update (hard copy every ``target_period`` steps, or Polyak). The
target is updated *after* the interventions so that it copies the weights they leave (projected,
clipped or reset), never the transient pre-intervention weights.

Example::

    dqn = DQN(DQNConfig(), NetworkConfig(encoder="nature_cnn"), obs_shape=(4, 84, 84), num_actions=18,
              obs_dtype="uint8", device="cuda", seed=0, interventions=build_interventions("redo", {}))
    dqn.set_probe(probe_obs)
    result = dqn.update(batch, weights=importance_weights)
    client.update_priorities(keys, result.priorities)
    print(result.metrics["loss"], result.metrics["q"])
    publish(dqn.weights())
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from learner.networks import NetworkConfig, QNetwork, build_network, torch_obs_dtype
from plasticity.base import Intervention, InterventionContext, network_overrides

BATCH_FIELDS = ("obs", "action", "reward", "discount", "next_obs")
_STATE_FORMAT = 1


@dataclass(frozen=True)
class DQNConfig:
    """Hyper-parameters of the DQN-family update. The discount lives in the batch (n-step adder).

    Example::

        DQNConfig(lr=6.25e-5, target_update="polyak", tau=0.005).validate()
    """

    double: bool = True
    """Double DQN: the online network picks the next action, the target network evaluates it."""
    huber_delta: float = 1.0
    """Huber loss threshold on the TD error: quadratic inside [-delta, delta], linear outside."""
    lr: float = 1e-4
    """Adam learning rate."""
    adam_eps: float = 1.5e-4
    """Adam epsilon (Dopamine's Atari value; larger than PyTorch's 1e-8 to damp rare-gradient steps)."""
    max_grad_norm: float | None = 10.0
    """Clip the global gradient L2 norm to this value before the Adam step; null disables clipping."""
    target_update: Literal["hard", "polyak"] = "hard"
    """"hard": copy the online network every target_period steps; "polyak": EMA every step with tau."""
    target_period: int = 2000
    """Hard target updates: optimizer steps between copies."""
    tau: float = 0.005
    """Polyak target updates: target <- (1 - tau) * target + tau * online after every step."""
    qr_kappa: float = 1.0
    """QR-DQN: threshold of the quantile Huber loss (the loss is divided by it, as in the paper)."""

    def validate(self) -> DQNConfig:
        """Raise ValueError naming the first bad field; return self."""
        if not isinstance(self.double, bool):
            raise ValueError(f"dqn.double must be true or false, got {self.double!r}")
        for name in ("huber_delta", "lr", "adam_eps", "qr_kappa"):
            _positive(f"dqn.{name}", getattr(self, name))
        if self.max_grad_norm is not None:
            _positive("dqn.max_grad_norm", self.max_grad_norm, suffix=" (or null to disable clipping)")
        if self.target_update not in ("hard", "polyak"):
            raise ValueError(f"dqn.target_update must be 'hard' or 'polyak', got {self.target_update!r}")
        if isinstance(self.target_period, bool) or not isinstance(self.target_period, int) or self.target_period < 1:
            raise ValueError(f"dqn.target_period must be an integer >= 1, got {self.target_period!r}")
        if not _is_number(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"dqn.tau must be in (0, 1], got {self.tau!r}")
        return self


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _positive(name: str, value: object, suffix: str = "") -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{suffix}, got {value!r}")


@dataclass(frozen=True)
class UpdateResult:
    """What one update returns: per-sample priorities (batch order) and scalar metrics."""

    priorities: np.ndarray
    """``[B]`` float32: |TD error| (QR-DQN: the sample's quantile Huber loss averaged over both quantile axes)."""
    metrics: dict[str, float]
    """loss, td_loss, td_error, q, grad_norm, lr, step, target_updated, and ``<intervention>/...`` entries."""


class DQN:
    """Online and target Q-networks, Adam, interventions; one :meth:`update` per batch.

    ``network_config`` is combined with the interventions' build-time overrides
    (:func:`plasticity.base.network_overrides`); the result is :attr:`network_config`, which is
    what actors must build to load :meth:`weights`. Networks are initialized from ``seed`` under a
    forked RNG (the global torch RNG is left alone); ``ctx.generator`` lives on ``device`` and is
    seeded from ``seed`` as well, so DDP ranks built with one seed make identical decisions.

    Data-parallel use (one DQN per rank, each sampling its own batches): ``grad_sync(grads)`` is
    called after backward and before clipping with the gradient tensors, to average them across
    ranks in place (e.g. ``dist.all_reduce`` of a flattened copy, divided by the world size);
    ``all_reduce_mean`` becomes ``ctx.all_reduce_mean`` for interventions' data-dependent decisions.
    Both default to single-process behaviour.

    Example: see the module docstring.
    """

    def __init__(
        self,
        config: DQNConfig,
        network_config: NetworkConfig,
        *,
        obs_shape: tuple[int, ...],
        num_actions: int,
        obs_dtype: str,
        device: str | torch.device = "cpu",
        seed: int = 0,
        interventions: Sequence[Intervention] = (),
        grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        config.validate()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        interventions = list(interventions)
        for iv in interventions:
            if not isinstance(iv, Intervention):
                raise ValueError(f"interventions must be plasticity.base.Intervention instances, got {iv!r}")
        overrides = network_overrides(interventions)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(NetworkConfig)})
        if unknown:
            raise ValueError(f"interventions override unknown network fields {unknown}")
        self.config = config
        self.network_config = dataclasses.replace(network_config, **overrides).validate()
        self.obs_shape = tuple(obs_shape)
        self.num_actions = num_actions
        self.obs_dtype = obs_dtype
        self.device = torch.device(device)
        self.seed = seed
        self.interventions = interventions
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            online = build_network(
                self.network_config, obs_shape=self.obs_shape, num_actions=num_actions, obs_dtype=obs_dtype
            )
        self._obs_torch_dtype = torch_obs_dtype(obs_dtype)
        self.online: QNetwork = online.to(self.device)
        self.target: QNetwork = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=config.lr, eps=config.adam_eps)
        self.ctx = InterventionContext(
            network=self.online,
            optimizer=self.optimizer,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            target_network=self.target,
        )
        if all_reduce_mean is not None:
            self.ctx.all_reduce_mean = all_reduce_mean
        self._grad_sync = grad_sync
        self._act_rng = np.random.default_rng(seed)
        self._probe: torch.Tensor | None = None
        self._quantile_tau = (
            (torch.arange(self.online.num_quantiles, dtype=torch.float32, device=self.device) + 0.5)
            / self.online.num_quantiles
            if self.online.num_quantiles
            else None
        )
        for iv in self.interventions:
            iv.setup(self.ctx)

    # ------------------------------------------------------------------ properties

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (``ctx.step``)."""
        return self.ctx.step

    @property
    def distributional(self) -> bool:
        return self.online.num_quantiles is not None

    # ------------------------------------------------------------------ batches

    def _tensor(self, name: str, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        raise ValueError(f"batch[{name!r}] must be a torch.Tensor or numpy array, got {type(value).__name__}")

    def _prepare(
        self, batch: Mapping[str, Any], weights: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate the whole batch before anything is touched, then move it to the device."""
        missing = [k for k in BATCH_FIELDS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks fields {missing}; expected {list(BATCH_FIELDS)}, got {sorted(batch)}")
        t = {k: self._tensor(k, batch[k]) for k in BATCH_FIELDS}
        size = t["action"].shape[0] if t["action"].dim() >= 1 else 0
        if size < 1:
            raise ValueError(f"batch['action'] must have shape [B] with B >= 1, got {tuple(t['action'].shape)}")
        for key in ("obs", "next_obs"):
            if tuple(t[key].shape) != (size, *self.obs_shape):
                raise ValueError(f"batch[{key!r}] has shape {tuple(t[key].shape)}; expected {(size, *self.obs_shape)}")
            if (t[key].dtype == torch.uint8) != (self._obs_torch_dtype == torch.uint8) or not (
                t[key].dtype == torch.uint8 or t[key].is_floating_point()
            ):
                raise ValueError(f"batch[{key!r}] has dtype {t[key].dtype}; expected {self.obs_dtype}")
        for key in ("action", "reward", "discount"):
            if tuple(t[key].shape) != (size,):
                raise ValueError(f"batch[{key!r}] has shape {tuple(t[key].shape)}; expected ({size},)")
        if t["action"].is_floating_point() or t["action"].dtype == torch.bool or t["action"].is_complex():
            raise ValueError(f"batch['action'] must hold integers, got dtype {t['action'].dtype}")
        for key in ("reward", "discount"):
            if not t[key].is_floating_point():
                raise ValueError(f"batch[{key!r}] must be floating point, got dtype {t[key].dtype}")
        w = None
        if weights is not None:
            w = self._tensor("weights", weights)
            if tuple(w.shape) != (size,) or not w.is_floating_point():
                raise ValueError(f"weights must be a float array of shape ({size},), got {w.dtype} {tuple(w.shape)}")
        # One host sync for all value checks (action range, finite non-negative weights).
        action = t["action"]
        bad = torch.stack([(action < 0).any(), (action >= self.num_actions).any()])
        if w is not None:
            bad = torch.cat([bad.to(w.device), torch.stack([(w < 0).any(), ~torch.isfinite(w).all()])])
        flags = bad.tolist()
        if flags[0] or flags[1]:
            raise ValueError(
                f"batch['action'] holds values outside [0, {self.num_actions}): "
                f"min {int(action.min())}, max {int(action.max())}"
            )
        if w is not None and (flags[2] or flags[3]):
            raise ValueError(f"weights must be finite and >= 0, got min {float(w.min())}, max {float(w.max())}")
        dev = self.device
        return (
            t["obs"].to(dev, non_blocking=True),
            action.to(dev, torch.long, non_blocking=True),
            t["reward"].to(dev, torch.float32, non_blocking=True),
            t["discount"].to(dev, torch.float32, non_blocking=True),
            t["next_obs"].to(dev, non_blocking=True),
            None if w is None else w.to(dev, torch.float32, non_blocking=True),
        )

    # ------------------------------------------------------------------ the update

    def update(self, batch: Mapping[str, torch.Tensor | np.ndarray], *, weights: Any = None) -> UpdateResult:
        """One gradient step on ``batch`` (fields: see the module docstring); ``weights``: importance weights [B].

        A malformed batch raises ValueError before any state changes.
        """
        obs, action, reward, discount, next_obs, w = self._prepare(batch, weights)
        cfg = self.config
        features = self.online.encoder(obs)
        out = self.online.head(features)
        with torch.no_grad():
            next_target = self.target(next_obs)
            selector = self.online(next_obs) if cfg.double else next_target
        if self.distributional:
            per_sample, priorities, td_error, q_taken = self._quantile_loss(out, action, reward, discount, next_target, selector)
        else:
            q_taken = out.gather(1, action[:, None]).squeeze(1)
            with torch.no_grad():
                best = selector.argmax(dim=1, keepdim=True)
                target = reward + discount * next_target.gather(1, best).squeeze(1)
            per_sample = nn.functional.huber_loss(q_taken, target, reduction="none", delta=cfg.huber_delta)
            td_error = (target - q_taken).detach().abs()
            priorities = td_error
        td_loss = (per_sample * w).mean() if w is not None else per_sample.mean()

        loss = td_loss
        names, terms = [], []
        for iv in self.interventions:
            term = iv.loss(self.ctx, obs=obs, features=features)
            if term is not None:
                loss = loss + term
                names.append(f"{iv.name}/loss")
                terms.append(term.detach().reshape(()).float())

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Frozen parameters (e.g. an injected head's frozen copies) have no gradient and are skipped.
        params = [p for p in self.online.parameters() if p.grad is not None]
        if self._grad_sync is not None:
            self._grad_sync([p.grad for p in params])
        if cfg.max_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # the norm before clipping
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        self.ctx.step += 1

        metrics: dict[str, float] = {}
        for iv in self.interventions:
            metrics.update(iv.after_step(self.ctx, probe_obs=self._probe))
        target_updated = self._update_target()

        scalars = torch.stack(
            [loss.detach(), td_loss.detach(), td_error.mean(), q_taken.detach().mean(), grad_norm.detach(), *terms]
        ).float()
        # One device->host transfer for priorities and every scalar metric.
        packed = torch.cat([priorities.float(), scalars]).cpu().numpy()
        size = priorities.shape[0]
        values = packed[size:].tolist()
        metrics.update(zip(["loss", "td_loss", "td_error", "q", "grad_norm", *names], values, strict=True))
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["step"] = float(self.ctx.step)
        metrics["target_updated"] = float(target_updated)
        return UpdateResult(priorities=packed[:size].copy(), metrics=metrics)

    def _quantile_loss(
        self,
        out: torch.Tensor,
        action: torch.Tensor,
        reward: torch.Tensor,
        discount: torch.Tensor,
        next_target: torch.Tensor,
        selector: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """QR-DQN: per-sample loss ``sum_i mean_j |tau_i - 1{u_ij < 0}| * huber_kappa(u_ij) / kappa``.

        ``u_ij = T_j - theta_i`` with online quantiles ``theta_i`` (midpoints ``tau_i = (2i + 1) / 2N``)
        and target quantiles ``T_j = reward + discount * theta'_j(next_obs, a*)``.
        """
        kappa = self.config.qr_kappa
        n = out.shape[2]
        theta = out.gather(1, action[:, None, None].expand(-1, 1, n)).squeeze(1)  # [B, N]
        with torch.no_grad():
            best = selector.mean(dim=2).argmax(dim=1)
            next_theta = next_target.gather(1, best[:, None, None].expand(-1, 1, n)).squeeze(1)
            target = reward[:, None] + discount[:, None] * next_theta  # [B, N]
        u = target[:, None, :] - theta[:, :, None]  # [B, N_i, N_j]
        abs_u = u.abs()
        huber = torch.where(abs_u <= kappa, 0.5 * u * u, kappa * (abs_u - 0.5 * kappa)) / kappa
        weight = (self._quantile_tau[None, :, None] - (u.detach() < 0).float()).abs()
        per_sample = (weight * huber).mean(dim=2).sum(dim=1)
        priorities = per_sample.detach() / n
        td_error = (target.mean(dim=1) - theta.detach().mean(dim=1)).abs()
        return per_sample, priorities, td_error, theta.mean(dim=1)

    def _update_target(self) -> bool:
        if self.config.target_update == "hard":
            if self.ctx.step % self.config.target_period != 0:
                return False
            self.target.load_state_dict(self.online.state_dict())
            return True
        with torch.no_grad():
            online, target = list(self.online.parameters()), list(self.target.parameters())
            if len(online) != len(target):
                raise RuntimeError(
                    f"online ({len(online)}) and target ({len(target)}) networks have different parameter counts; "
                    "an intervention changed one without the other"
                )
            torch._foreach_lerp_(target, online, self.config.tau)
            for t_buf, o_buf in zip(self.target.buffers(), self.online.buffers(), strict=True):
                t_buf.copy_(o_buf)
        return True

    # ------------------------------------------------------------------ acting, probes, task switches

    def set_probe(self, obs: torch.Tensor | np.ndarray | None) -> None:
        """The probe batch ``[P, *obs_shape]`` handed to ``after_step`` (None: no probe). Not checkpointed."""
        if obs is None:
            self._probe = None
            return
        probe = self._tensor("probe", obs)
        if tuple(probe.shape[1:]) != self.obs_shape or probe.shape[0] < 1:
            raise ValueError(f"probe obs has shape {tuple(probe.shape)}; expected (P, {', '.join(map(str, self.obs_shape))})")
        if (probe.dtype == torch.uint8) != (self._obs_torch_dtype == torch.uint8):
            raise ValueError(f"probe obs has dtype {probe.dtype}; expected {self.obs_dtype}")
        self._probe = probe.to(self.device)

    @torch.no_grad()
    def q_values(self, obs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Online Q-values ``[B, A]`` (QR: the mean over quantiles)."""
        out = self.online(self._tensor("obs", obs).to(self.device))
        return out.mean(dim=2) if self.distributional else out

    def act(self, obs: torch.Tensor | np.ndarray, epsilon: float) -> np.ndarray:
        """Epsilon-greedy actions ``[B]`` (int64) for observations ``[B, *obs_shape]``."""
        if not _is_number(epsilon) or not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        tensor = self._tensor("obs", obs)
        if tuple(tensor.shape[1:]) != self.obs_shape:
            raise ValueError(f"obs has shape {tuple(tensor.shape)}; expected (B, {', '.join(map(str, self.obs_shape))})")
        greedy = self.q_values(tensor).argmax(dim=1).cpu().numpy()
        size = greedy.shape[0]
        explore = self._act_rng.random(size) < epsilon
        random_actions = self._act_rng.integers(self.num_actions, size=size)
        return np.where(explore, random_actions, greedy).astype(np.int64)

    def task_switch(self, *, task: int | None = None) -> dict[str, float]:
        """Tell the interventions that the task changed (``ctx.task`` becomes ``task`` or ``task + 1``)."""
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
            raise ValueError(f"task must be an integer >= 0, got {task!r}")
        self.ctx.task = self.ctx.task + 1 if task is None else task
        metrics: dict[str, float] = {}
        for iv in self.interventions:
            metrics.update(iv.on_task_switch(self.ctx))
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the online network's state_dict, for actors built from :attr:`network_config`."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.online.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: networks, Adam, counters, interventions, RNGs.

        Tensors alias live state (as ``nn.Module.state_dict`` does): save or deep-copy before further
        updates. The probe batch and ``ctx.shared`` are not included: the loop sets the probe again,
        and interventions rebuild ``shared`` in ``setup`` (the networks are re-initialized from the
        same seed) and keep resumable state in their own ``state_dict``.
        """
        return {
            "format": _STATE_FORMAT,
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.ctx.step,
            "task": self.ctx.task,
            "interventions": [{"name": iv.name, "state": iv.state_dict()} for iv in self.interventions],
            "generator": self.ctx.generator.get_state(),
            "act_rng": copy.deepcopy(self._act_rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; on any error the previous state is put back and ValueError raised."""
        expected = {"format", "online", "target", "optimizer", "step", "task", "interventions", "generator", "act_rng"}
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"DQN state must have keys {sorted(expected)}, got {got}")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"DQN state format {state['format']!r} is not supported (expected {_STATE_FORMAT})")
        entries = state["interventions"]
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and set(e) == {"name", "state"} for e in entries):
            raise ValueError(f"DQN state 'interventions' must be a list of {{name, state}} entries, got {entries!r}")
        names = [entry["name"] for entry in entries]
        if names != [iv.name for iv in self.interventions]:
            raise ValueError(
                f"checkpoint interventions {names} differ from this learner's {[iv.name for iv in self.interventions]}"
            )
        backup = copy.deepcopy(self.state_dict())
        try:
            self._apply_state(state)
        except Exception as exc:
            self._apply_state(backup)
            raise ValueError(f"could not load DQN state ({exc}); the previous state was kept") from exc

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        # Interventions first: one that changes the network's structure (e.g. a head injection)
        # rebuilds it before the networks' and optimizer's tensors are loaded into that structure.
        for iv, entry in zip(self.interventions, state["interventions"], strict=True):
            iv.load_state_dict(entry["state"])
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ctx.step = int(state["step"])
        self.ctx.task = int(state["task"])
        self.ctx.generator.set_state(state["generator"])
        self._act_rng.bit_generator.state = copy.deepcopy(state["act_rng"])


__all__ = ["BATCH_FIELDS", "DQN", "DQNConfig", "UpdateResult"]
