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

DQN implements :class:`learner.core.Algorithm`; its one network is named ``"q"``.

Hot path (CPU and GPU): the batch is validated on the host before it is moved (no device sync for
the checks), the parameter lists are cached (refreshed when an intervention changes the module
tree), Adam is fused where the device supports it (else multi-tensor), the Polyak target update is
one ``_foreach_lerp_``, and priorities and every scalar metric come back in one transfer.

Example::

    dqn = DQN(DQNConfig(), NetworkConfig(encoder="nature_cnn"), obs_shape=(4, 84, 84), num_actions=18,
              obs_dtype="uint8", device="cuda", seed=0,
              interventions=bind_interventions("redo", {}, networks=DQN.NETWORKS))
    dqn.set_probe(probe_obs)
    result = dqn.update(batch, weights=importance_weights)
    client.update_priorities(keys, result.priorities)
    print(result.metrics["loss"], result.metrics["q"])
    publish(dqn.acting_weights())
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
from learner.networks import NetworkConfig, QNetwork, build_network, torch_obs_dtype
from learner.parallel import SINGLE, SingleProcess
from plasticity.base import Intervention, InterventionContext, InterventionSet, NetworkSlot, structure_version

BATCH_FIELDS = ("obs", "action", "reward", "discount", "next_obs")
_log = logging.getLogger(__name__)
_STATE_FORMAT = 2
_STATE_KEYS = frozenset({"format", "online", "target", "optimizer", "step", "task", "interventions", "generator"})


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
    lr_end: float | None = None
    """Linear learning-rate decay: lr goes from ``lr`` to ``lr_end`` over ``lr_decay_steps`` optimizer
    steps, then stays at ``lr_end``; null keeps ``lr`` constant."""
    lr_decay_steps: int = 100_000
    """Optimizer steps over which lr decays linearly to ``lr_end`` (ignored when ``lr_end`` is null)."""
    compile: bool = False
    """Compute the TD loss and its gradient in one ``torch.compile``-d function (inductor; on the CPU it
    needs a C compiler). On small networks the eager update is mostly per-op overhead, which this
    removes (about 2x the updates/s of the eager update for the cartpole preset); it costs a one-time
    compilation of ~10-30 s at the first update. Used only while no intervention adds a loss term
    (those run eager); if compilation fails the learner logs why and stays eager."""
    bf16: bool = False
    """Run the update's forward passes and loss under bfloat16 autocast (tensor cores on CUDA; the
    parameters, gradients, Adam state and priorities stay float32). Meant for GPUs: on the CPU it
    works but is slower than float32."""

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
        if self.lr_end is not None:
            _positive("dqn.lr_end", self.lr_end, suffix=" (or null for a constant lr)")
        if isinstance(self.lr_decay_steps, bool) or not isinstance(self.lr_decay_steps, int) or self.lr_decay_steps < 1:
            raise ValueError(f"dqn.lr_decay_steps must be an integer >= 1, got {self.lr_decay_steps!r}")
        for name in ("compile", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dqn.{name} must be true or false, got {getattr(self, name)!r}")
        return self

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): ``lr``, or its linear decay to ``lr_end``."""
        if self.lr_end is None:
            return self.lr
        return self.lr + (self.lr_end - self.lr) * min(1.0, step / self.lr_decay_steps)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _positive(name: str, value: object, suffix: str = "") -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{suffix}, got {value!r}")


class DQN:
    """Online and target Q-networks, Adam, interventions; one :meth:`update` per batch.

    ``network_config`` is combined with the interventions' build-time overrides for the ``"q"``
    network; the result is :attr:`network_config`, which is what actors must build to load
    :meth:`acting_weights`. Networks are initialized from ``seed`` under a forked RNG (the global
    torch RNG is left alone); ``ctx.generator`` lives on ``device`` and is seeded from ``seed`` as
    well, so DDP ranks built with one seed make identical decisions.

    ``interventions``: an :class:`plasticity.base.InterventionSet` (from
    :func:`plasticity.interventions.bind_interventions` with ``networks=DQN.NETWORKS``), or a plain
    list of interventions, which are all bound to ``"q"``.

    Data-parallel use (one DQN per rank, each sampling its own batches): ``parallel`` is the rank's
    :class:`learner.parallel.ReplicaGroup`; its ``grad_sync`` averages the gradients after backward
    and before clipping, and its ``all_reduce_mean`` becomes ``ctx.all_reduce_mean`` for the
    interventions' data-dependent decisions. The default is one process.

    Example: see the module docstring.
    """

    #: The plastic networks this algorithm trains (what interventions may target).
    NETWORKS = ("q",)
    #: ``update(..., defer=True)`` hands back a :class:`learner.core.DeferredResult` on CUDA devices.
    supports_defer = True

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
        interventions: InterventionSet | Sequence[Intervention] = (),
        parallel: SingleProcess = SINGLE,
    ):
        config.validate()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(interventions, InterventionSet):
            listed = list(interventions)
            for iv in listed:
                if not isinstance(iv, Intervention):
                    raise ValueError(f"interventions must be plasticity.base.Intervention instances, got {iv!r}")
            interventions = InterventionSet([("q", iv) for iv in listed], networks=self.NETWORKS)
        if set(interventions.networks) - set(self.NETWORKS):
            raise ValueError(f"interventions target networks {list(interventions.networks)}; DQN has {list(self.NETWORKS)}")
        overrides = interventions.network_overrides("q")
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
        self.optimizer = _adam(self.online.parameters(), lr=config.lr, eps=config.adam_eps, device=self.device)
        self.ctx = InterventionContext.of(
            {"q": NetworkSlot(self.online, self.optimizer, self.target)},
            generator=torch.Generator(device=self.device).manual_seed(seed),
        )
        self.parallel = parallel
        self.ctx.all_reduce_mean = parallel.all_reduce_mean
        self._probe: torch.Tensor | None = None
        self._quantile_tau = (
            (torch.arange(self.online.num_quantiles, dtype=torch.float32, device=self.device) + 0.5)
            / self.online.num_quantiles
            if self.online.num_quantiles
            else None
        )
        self.interventions.setup(self.ctx)
        # config.compile: "pending" until the first compiled call succeeds ("on") or fails ("failed").
        self._compile_state = "off" if not config.compile or self._has_loss_terms() else "pending"
        self._cache_parameters()

    # ------------------------------------------------------------------ properties

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (``ctx.step``)."""
        return self.ctx.step

    @property
    def distributional(self) -> bool:
        return self.online.num_quantiles is not None

    def networks(self) -> dict[str, NetworkSlot]:
        """``{"q": NetworkSlot(online, optimizer, target)}``."""
        return dict(self.ctx.networks)

    def _cache_parameters(self) -> None:
        # Iterating module parameters walks the module tree (~tens of microseconds a call); the hot
        # path reads these lists instead, rebuilt whenever an intervention changes the tree.
        self._online_params = list(self.online.parameters())
        self._target_params = list(self.target.parameters())
        self._online_buffers = list(self.online.buffers())
        self._target_buffers = list(self.target.buffers())
        if len(self._online_params) != len(self._target_params):
            raise RuntimeError(
                f"online ({len(self._online_params)}) and target ({len(self._target_params)}) networks have "
                "different parameter counts; an intervention changed one without the other"
            )
        self._structure = structure_version(self.ctx)
        # Trainable parameters by their name in _TDLossModule (what the compiled function takes).
        self._trainable = [(f"online.{name}", p) for name, p in self.online.named_parameters() if p.requires_grad]
        self._compiled_grad: Callable | None = None  # a changed module tree gets a freshly compiled function,
        if self._compile_state == "on":  # compiled under the same fallback as the first one
            self._compile_state = "pending"

    def _has_loss_terms(self) -> bool:
        return any(type(iv).loss is not Intervention.loss for name, iv in self.interventions.bound if name == "q")

    def _refresh_if_restructured(self) -> None:
        if structure_version(self.ctx) != self._structure:
            self._cache_parameters()

    # ------------------------------------------------------------------ batches

    def _tensor(self, name: str, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        raise InvalidBatch(f"batch[{name!r}] must be a torch.Tensor or numpy array, got {type(value).__name__}")

    def _autocast(self) -> Any:
        """``dqn.bf16``: the forward passes and the loss in bfloat16 (parameters, gradients and Adam stay float32)."""
        if not self.config.bf16:
            return contextlib.nullcontext()   # (an autocast context that is off still costs ~2 us per enter)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def check_batch(self, batch: Mapping[str, Any], *, weights: Any = None) -> None:
        """Raise :class:`InvalidBatch` where :meth:`update` would refuse ``batch``; change nothing.

        What data-parallel ranks agree on before they update (a rank that refused its batch inside
        ``update`` would leave the others waiting in the gradient all-reduce)."""
        self._validated(batch, weights)

    def _prepare(
        self, batch: Mapping[str, Any], weights: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate the whole batch before anything is touched, then move it to the device."""
        t, w = self._validated(batch, weights)
        dev = self.device
        return (
            t["obs"].to(dev, non_blocking=True),
            t["action"].to(dev, torch.long, non_blocking=True),
            t["reward"].to(dev, torch.float32, non_blocking=True),
            t["discount"].to(dev, torch.float32, non_blocking=True),
            t["next_obs"].to(dev, non_blocking=True),
            None if w is None else w.to(dev, torch.float32, non_blocking=True),
        )

    def _validated(self, batch: Mapping[str, Any], weights: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The batch's fields and weights as tensors, where they are, once every check passed.

        Value checks run where the batch is: on host tensors (what the replay dataset hands over)
        they cost no device synchronization.
        """
        missing = [k for k in BATCH_FIELDS if k not in batch]
        if missing:
            raise InvalidBatch(f"batch lacks fields {missing}; expected {list(BATCH_FIELDS)}, got {sorted(batch)}")
        t = {k: self._tensor(k, batch[k]) for k in BATCH_FIELDS}
        size = t["action"].shape[0] if t["action"].dim() >= 1 else 0
        if size < 1:
            raise InvalidBatch(f"batch['action'] must have shape [B] with B >= 1, got {tuple(t['action'].shape)}")
        for key in ("obs", "next_obs"):
            if tuple(t[key].shape) != (size, *self.obs_shape):
                raise InvalidBatch(f"batch[{key!r}] has shape {tuple(t[key].shape)}; expected {(size, *self.obs_shape)}")
            if (t[key].dtype == torch.uint8) != (self._obs_torch_dtype == torch.uint8) or not (
                t[key].dtype == torch.uint8 or t[key].is_floating_point()
            ):
                raise InvalidBatch(f"batch[{key!r}] has dtype {t[key].dtype}; expected {self.obs_dtype}")
        for key in ("action", "reward", "discount"):
            if tuple(t[key].shape) != (size,):
                raise InvalidBatch(f"batch[{key!r}] has shape {tuple(t[key].shape)}; expected ({size},)")
        if t["action"].is_floating_point() or t["action"].dtype == torch.bool or t["action"].is_complex():
            raise InvalidBatch(f"batch['action'] must hold integers, got dtype {t['action'].dtype}")
        for key in ("reward", "discount"):
            if not t[key].is_floating_point():
                raise InvalidBatch(f"batch[{key!r}] must be floating point, got dtype {t[key].dtype}")
        w = None
        if weights is not None:
            w = self._tensor("weights", weights)
            if tuple(w.shape) != (size,) or not w.is_floating_point():
                raise InvalidBatch(f"weights must be a float array of shape ({size},), got {w.dtype} {tuple(w.shape)}")
        action = t["action"]
        # min/max in one reduction each; on host tensors these are plain reads.
        low, high = torch.aminmax(action)
        if int(low) < 0 or int(high) >= self.num_actions:
            raise InvalidBatch(
                f"batch['action'] holds values outside [0, {self.num_actions}): min {int(low)}, max {int(high)}"
            )
        if w is not None:
            w_low, w_high = torch.aminmax(w)
            if not (bool(torch.isfinite(w_high)) and float(w_low) >= 0):
                raise InvalidBatch(f"weights must be finite and >= 0, got min {float(w_low)}, max {float(w_high)}")
        return t, w

    # ------------------------------------------------------------------ the loss

    def _td_loss(self, obs, action, reward, discount, next_obs):
        """(per-sample loss [B] with grad, priorities [B], |TD| [B], Q of taken actions [B], features)."""
        cfg = self.config
        features = self.online.encoder(obs)
        out = self.online.head(features)
        with torch.no_grad():
            # The double-DQN action selector gets its own pass without autograd: folding it into the
            # online pass (one forward over cat(obs, next_obs)) saves per-op overhead in the forward
            # but doubles the backward's matrix products, and was slower in the learner benchmark.
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
        return per_sample, priorities, td_error, q_taken, features

    def per_sample_loss(self, batch: Mapping[str, Any], *, network: str | None = None) -> torch.Tensor:
        """``[B]`` per-sample TD loss the update trains (Huber; QR-DQN: the quantile Huber loss), with grad."""
        if network not in (None, "q"):
            raise ValueError(f"DQN has one network, 'q'; got network={network!r}")
        obs, action, reward, discount, next_obs, _ = self._prepare(batch, None)
        return self._td_loss(obs, action, reward, discount, next_obs)[0]

    # ------------------------------------------------------------------ the compiled gradient

    def _compiled_loss_and_grads(self, obs, action, reward, discount, next_obs, w):
        """With ``config.compile``: set every trainable parameter's ``.grad`` from one compiled call and
        return (loss, priorities, |TD|, Q of taken actions), all detached; None where the eager path runs.

        The function compiled is ``torch.func.grad_and_value`` of :meth:`_td_loss` evaluated with the
        online network's parameters passed in (``functional_call``), so forward, backward and the
        loss arithmetic become a few fused kernels instead of a few hundred eager ops. Gradients are
        the same quantity the eager ``backward`` produces (equal up to float rounding; tested).
        """
        if self._compile_state in ("off", "failed"):
            return None
        if self._compiled_grad is None:
            loss_module = _TDLossModule(self)
            self._compiled_grad = torch.compile(torch.func.grad_and_value(
                lambda params, *batch: torch.func.functional_call(loss_module, params, batch), has_aux=True),
                dynamic=False)
        first = self._compile_state == "pending"
        if first:
            _log.info("compiling the DQN loss and gradient (torch.compile; once, ~10-30 s)")
        try:
            grads, (loss, aux) = self._compiled_grad(
                {name: p.detach() for name, p in self._trainable}, obs, action, reward, discount, next_obs, w)
        except Exception as error:  # noqa: BLE001 - any compiler failure: stay eager, say why
            if not first:
                raise
            _log.warning("torch.compile of the DQN update failed (%s: %s); running eager",
                         type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self._compile_state = "failed"
            return None
        self._compile_state = "on"
        for name, p in self._trainable:
            p.grad = grads[name]
        return (loss, *aux)

    # ------------------------------------------------------------------ the update

    def update(self, batch: Mapping[str, torch.Tensor | np.ndarray], *, weights: Any = None,
               defer: bool = False) -> UpdateResult | DeferredResult:
        """One gradient step on ``batch`` (fields: see the module docstring); ``weights``: importance weights [B];
        ``defer``: see :meth:`learner.core.Algorithm.update`.

        A malformed batch raises ValueError before any state changes.
        """
        obs, action, reward, discount, next_obs, w = self._prepare(batch, weights)
        cfg = self.config
        with self._autocast():
            stats = self._compiled_loss_and_grads(obs, action, reward, discount, next_obs, w)
        if stats is not None:
            loss, priorities, td_error, q_taken = stats
            td_loss, terms = loss, {}
        else:
            with self._autocast():   # the forward passes and the loss; the backward runs outside, as autocast wants
                per_sample, priorities, td_error, q_taken, features = self._td_loss(obs, action, reward, discount,
                                                                                    next_obs)
                td_loss = _weighted_mean(per_sample.float(), w)
                extra, terms = self.interventions.loss(self.ctx, "q", obs=obs, features=features)
                loss = td_loss if extra is None else td_loss + extra.float()

            # Gradients are zeroed in place and reused (no per-update allocation of gradient tensors),
            # in one foreach call: Optimizer.zero_grad's per-parameter Python loop costs as much as the
            # small network's backward. Every parameter the optimizer steps (auxiliary heads of an
            # intervention included) is zeroed; a gradient created since (p.grad was None) is fresh.
            current = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            if current:
                torch._foreach_zero_(current)
            loss.backward()
        # Frozen parameters (e.g. an injected head's frozen copies) have no gradient and are skipped.
        grads = [p.grad for p in self._online_params if p.grad is not None]
        self.parallel.grad_sync(grads)   # the mean over ranks (nothing with one process)
        grad_norm = clip_grad_norm(grads, cfg.max_grad_norm)  # the norm before clipping
        if cfg.lr_end is not None:
            # A function of the step count alone, so a resumed run continues the same schedule.
            lr = cfg.learning_rate(self.ctx.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        adam_step(self.optimizer)
        self.ctx.step += 1

        metrics: dict[str, float] = self.interventions.after_step(self.ctx, probe_obs=self._probe)
        self._refresh_if_restructured()
        target_updated = self._update_target()

        scalars = torch.stack(
            [loss.detach(), td_loss.detach(), td_error.mean(), q_taken.detach().mean(), grad_norm.detach(),
             *terms.values()]
        ).float()
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["step"] = float(self.ctx.step)
        metrics["target_updated"] = float(target_updated)
        # One device->host transfer for priorities and every scalar metric (deferred: no wait for it here).
        return packed_result(priorities, ["loss", "td_loss", "td_error", "q", "grad_norm", *terms], scalars, metrics,
                             defer=defer)

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
            torch._foreach_lerp_(self._target_params, self._online_params, self.config.tau)
            if self._target_buffers:
                torch._foreach_copy_(self._target_buffers, self._online_buffers)
        return True

    # ------------------------------------------------------------------ probes and task switches

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

    def task_switch(self, task: int | None = None) -> dict[str, float]:
        """Tell the interventions that the task changed (``ctx.task`` becomes ``task`` or ``task + 1``)."""
        metrics = switch_task(self.ctx, self.interventions, task)
        self._refresh_if_restructured()
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints

    def acting_network(self) -> QNetwork:
        """The live online network (what actors act with)."""
        return self.online

    def acting_weights(self) -> dict[str, torch.Tensor]:
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
            "interventions": self.interventions.state_dict(),
            "generator": self.ctx.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; on any error the previous state is put back and ValueError raised."""
        load_state_or_keep(state, algorithm="DQN", keys=_STATE_KEYS, state_format=_STATE_FORMAT,
                           interventions=self.interventions, current=self.state_dict, apply=self._apply_state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        # Interventions first: one that changes the network's structure (e.g. a head injection)
        # rebuilds it before the networks' and optimizer's tensors are loaded into that structure.
        self.interventions.load_state_dict(state["interventions"])
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ctx.step = int(state["step"])
        self.ctx.task = int(state["task"])
        self.ctx.generator.set_state(state["generator"])
        self._cache_parameters()


class _TDLossModule(nn.Module):
    """The weighted TD loss of ``dqn`` as a module whose one submodule is ``dqn.online``, so that
    ``torch.func.functional_call`` can run it with the online parameters passed in (the target
    network's parameters stay constants)."""

    def __init__(self, dqn: DQN):
        super().__init__()
        self.online = dqn.online
        self._loss = dqn._td_loss  # a bound method: dqn itself is not registered as a submodule

    def forward(self, obs, action, reward, discount, next_obs, w):
        per_sample, priorities, td_error, q_taken, _ = self._loss(obs, action, reward, discount, next_obs)
        return _weighted_mean(per_sample, w), (priorities.detach(), td_error.detach(), q_taken.detach())


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The batch loss: ``mean_i w_i * loss_i`` (plain mean without importance weights)."""
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm before.

    The arithmetic of ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    capped at 1) in four multi-tensor ops, without its per-call grouping work.
    """
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm is not None:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` for a fused Adam with one parameter group on one device and dtype (as
    :func:`_adam` builds it for DQN), in one kernel call.

    ``Optimizer.step`` spends more time in Python (hooks, regrouping tensors by device and dtype on
    every call) than the fused kernel takes on a small network. This calls the kernel on the
    optimizer's own state tensors, so checkpoints and interventions that edit that state see the
    same thing. Whenever the fast path does not apply (another optimizer or option, a parameter
    without state yet, e.g. on the first step or after an intervention dropped it), it is plain
    ``optimizer.step()``.

        loss.backward(); adam_step(optimizer)
    """
    groups = optimizer.param_groups
    group = groups[0]
    if (len(groups) != 1 or not isinstance(optimizer, torch.optim.Adam) or not group.get("fused")
            or group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay")):
        optimizer.step()
        return
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    state = optimizer.state
    for p in group["params"]:
        if p.grad is None:
            continue
        s = state.get(p)
        if not s:
            optimizer.step()
            return
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(s["exp_avg"])
        exp_avg_sqs.append(s["exp_avg_sq"])
        steps.append(s["step"])
    if not params:
        return
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                       beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                       maximize=False, grad_scale=None, found_inf=None)


def _adam(params, *, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fastest implementation the device has: fused (CPU and CUDA), else multi-tensor."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=device.type != "cpu")


__all__ = ["BATCH_FIELDS", "DQN", "DQNConfig", "UpdateResult", "clip_grad_norm"]
