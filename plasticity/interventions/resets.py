"""Parameter-level resets: reset (hard or soft re-initialization of layers), shrink_perturb, soft_reset.

Fresh values come from :func:`plasticity.interventions._common.fresh_parameters` with
``ctx.generator`` (identical on every DDP rank).

Example::

    ivs = build_interventions("reset", {"reset": {"layers": "head", "period": 40000}})
    ivs = build_interventions("shrink_perturb", {"shrink_perturb": {"alpha": 0.8, "sigma": 0.2}})
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import (
    ScheduledIntervention,
    check_number,
    default_bound,
    fresh_parameters,
    matching_module,
    parametrized_modules,
    randn_like_param,
)
from plasticity.optim_state import reset_parameter


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _scope_modules(network: nn.Module, scope: str, owner: str) -> list[nn.Module]:
    if scope == "output":
        outputs = getattr(network, "output_layers", None)
        if not callable(outputs):
            raise ValueError(f"{owner}: layers='output' needs network.output_layers()")
        return list(outputs())
    if scope == "head":
        return parametrized_modules(network.head)
    if scope == "encoder":
        return parametrized_modules(network.encoder)
    if scope == "all":
        return parametrized_modules(network)
    raise ValueError(f"{owner}: unknown layers {scope!r}; expected 'output', 'head', 'encoder' or 'all'")


def _check_triggers(owner: str, period: int, on_task_switch: bool) -> None:
    if period == 0 and not on_task_switch:
        raise ValueError(f"{owner}: never triggers (period=0 and on_task_switch=False); enable one")


class Reset(ScheduledIntervention):
    """Re-initialize chosen layers every ``period`` steps (0 = never) and/or at each task switch.

    ``layers``: ``"output"`` (``network.output_layers()``, the default), ``"head"``, ``"encoder"`` or
    ``"all"``. Hard reset: fresh initial values. Soft (``soft=True``):
    ``theta <- shrink * theta + perturb * theta_fresh`` (SR-SPR's shrink-and-perturb: 0.8 / 0.2).
    The optimizer state of every touched parameter is zeroed (and its step count with
    ``reset_step``). With ``target=True`` the target network's matching layers get the same update
    (hard: the same fresh values; soft: ``s * theta' + p * theta_fresh`` with the same draw), so the
    bootstrap target does not point at the forgotten function. The default ``period`` (0) resets only
    at task switches; SR-SPR-style periodic resets are e.g. ``period=40000``.
    """

    name = "reset"

    def __init__(
        self,
        *,
        layers: Literal["output", "head", "encoder", "all"] = "output",
        period: int = 0,
        on_task_switch: bool = True,
        soft: bool = False,
        shrink: float = 0.8,
        perturb: float = 0.2,
        target: bool = True,
        reset_step: bool = True,
    ) -> None:
        if layers not in ("output", "head", "encoder", "all"):
            raise ValueError(f"{self.name}: unknown layers {layers!r}; expected 'output', 'head', 'encoder' or 'all'")
        self.layers = layers
        self.period = check_number(self.name, "period", period, low=0, integer=True)
        self.on_switch = bool(on_task_switch)
        _check_triggers(self.name, self.period, self.on_switch)
        self.soft = bool(soft)
        self.shrink = check_number(self.name, "shrink", shrink, low=0.0)
        self.perturb = check_number(self.name, "perturb", perturb, low=0.0)
        self.target = bool(target)
        self.reset_step = bool(reset_step)

    def apply(self, ctx: InterventionContext) -> dict[str, float]:
        """Reset now (what the triggers call)."""
        modules = _scope_modules(ctx.network, self.layers, self.name)
        held = _held(ctx.optimizer)
        count = 0
        with torch.no_grad():
            for module in modules:
                fresh = fresh_parameters(module, ctx.generator, ctx.network)
                twin = None
                if self.target and ctx.target_network is not None:
                    twin = matching_module(ctx.network, ctx.target_network, module)
                for name, value in fresh.items():
                    param = getattr(module, name)
                    new = self.shrink * param + self.perturb * value if self.soft else value
                    param.copy_(new)
                    if id(param) in held:
                        reset_parameter(ctx.optimizer, param, reset_step=self.reset_step)
                    if twin is not None:
                        other = getattr(twin, name)
                        other.copy_(self.shrink * other + self.perturb * value if self.soft else value)
                count += 1
        return {f"{self.name}/layers_reset": float(count)}


class ShrinkPerturb(ScheduledIntervention):
    """Shrink and perturb (Ash & Adams 2020): ``theta <- alpha * theta + sigma * noise``.

    ``variant="init_noise"`` (default): ``noise`` is a fresh draw from the initialization distribution
    (:func:`fresh_parameters`; LayerNorm: gain 1, offset 0), so ``alpha=0.8, sigma=0.2`` is SR-SPR's
    interpolation toward a fresh network and ``sigma = 1 - alpha`` in general interpolates.
    ``variant="gaussian"``: ``noise ~ N(0, 1)`` per entry. Applies to every parameter of the chosen
    ``layers`` ("all", "encoder" or "head") every ``period`` steps (0 = never; 1 = every step) and/or
    at each task switch. Optimizer state is kept unless ``reset_optimizer`` (the parameters are
    shrunk, not replaced); the target network is left to its own update rule.
    """

    name = "shrink_perturb"

    def __init__(
        self,
        *,
        alpha: float = 0.8,
        sigma: float = 0.2,
        variant: Literal["init_noise", "gaussian"] = "init_noise",
        layers: Literal["all", "encoder", "head"] = "all",
        period: int = 0,
        on_task_switch: bool = True,
        reset_optimizer: bool = False,
    ) -> None:
        self.alpha = check_number(self.name, "alpha", alpha, low=0.0)
        self.sigma = check_number(self.name, "sigma", sigma, low=0.0)
        if variant not in ("init_noise", "gaussian"):
            raise ValueError(f"{self.name}: unknown variant {variant!r}; expected 'init_noise' or 'gaussian'")
        if layers not in ("all", "encoder", "head"):
            raise ValueError(f"{self.name}: unknown layers {layers!r}; expected 'all', 'encoder' or 'head'")
        self.variant, self.layers = variant, layers
        self.period = check_number(self.name, "period", period, low=0, integer=True)
        self.on_switch = bool(on_task_switch)
        _check_triggers(self.name, self.period, self.on_switch)
        self.reset_optimizer = bool(reset_optimizer)

    def apply(self, ctx: InterventionContext) -> dict[str, float]:
        held = _held(ctx.optimizer)
        with torch.no_grad():
            for module in _scope_modules(ctx.network, self.layers, self.name):
                if self.variant == "init_noise":
                    noise = fresh_parameters(module, ctx.generator, ctx.network)
                else:
                    noise = {
                        name: randn_like_param(p, ctx.generator)
                        for name, p in module.named_parameters(recurse=False)
                    }
                for name, value in noise.items():
                    param = getattr(module, name)
                    param.copy_(self.alpha * param + self.sigma * value)
                    if self.reset_optimizer and id(param) in held:
                        reset_parameter(ctx.optimizer, param, reset_step=False)
        return {f"{self.name}/applied": 1.0}


class SoftReset(Intervention):
    """Soft reset: parameters drift toward the initial distribution at a gradient-driven rate.

    A *simplified* version of Galashov et al. 2024 ("Non-stationary learning of neural networks with
    automatic soft parameter reset"). What is the same: an Ornstein-Uhlenbeck drift toward the
    initialization distribution, ``theta <- gamma * theta + sqrt(1 - gamma^2) * sigma_0 * eps``,
    ``eps ~ N(0, 1)``, whose stationary law ``N(0, sigma_0^2)`` has the initialization variance
    (``sigma_0 = b / sqrt(3)``, ``b = 1/sqrt(fan_in)``: PyTorch's default uniform init), applied after
    each step to every Linear/Conv2d weight and bias. What is *not* the paper's: the paper learns
    ``gamma`` per parameter group by maximizing the likelihood of new data under the drift model;
    here ``gamma = 1 - kappa`` per parameter tensor with a heuristic non-stationarity signal, the ratio
    ``r = sqrt(fast EMA / slow EMA)`` of squared gradient norms (decays ``fast_decay`` and
    ``slow_decay``, bias-corrected): ``kappa = kappa_min + (kappa_max - kappa_min) * clip(r - 1, 0, 1)``.
    A stationary stream keeps ``r ~ 1`` (almost no drift); a task switch that makes gradients jump
    drives ``kappa`` toward ``kappa_max``. No drift during the first ``warmup`` steps. Optimizer state
    is kept. Metrics: ``soft_reset/kappa_mean`` (mean over tensors this step).
    """

    name = "soft_reset"

    def __init__(
        self,
        *,
        kappa_min: float = 0.0,
        kappa_max: float = 0.01,
        fast_decay: float = 0.9,
        slow_decay: float = 0.999,
        warmup: int = 1000,
    ) -> None:
        self.kappa_min = check_number(self.name, "kappa_min", kappa_min, low=0.0, high=1.0)
        self.kappa_max = check_number(self.name, "kappa_max", kappa_max, low=0.0, high=1.0)
        if self.kappa_max < self.kappa_min:
            raise ValueError(f"{self.name}: kappa_max {kappa_max!r} must be >= kappa_min {kappa_min!r}")
        self.fast_decay = check_number(self.name, "fast_decay", fast_decay, low=0.0, high=1.0)
        self.slow_decay = check_number(self.name, "slow_decay", slow_decay, low=0.0, high=1.0)
        if not self.fast_decay < self.slow_decay < 1.0:
            raise ValueError(f"{self.name}: need fast_decay < slow_decay < 1, got {fast_decay!r}, {slow_decay!r}")
        self.warmup = check_number(self.name, "warmup", warmup, low=0, integer=True)
        self.stats: dict[str, list[float]] = {}  # name -> [fast EMA, slow EMA, updates seen]

    def kappa(self, fast: float, slow: float, seen: int) -> float:
        """Drift rate from the bias-corrected gradient-norm EMAs (0 when there is no signal)."""
        fast_hat = fast / (1.0 - self.fast_decay**seen)
        slow_hat = slow / (1.0 - self.slow_decay**seen)
        if not (slow_hat > 0.0 and math.isfinite(fast_hat) and math.isfinite(slow_hat)):
            return self.kappa_min
        ratio = math.sqrt(fast_hat / slow_hat)
        return self.kappa_min + (self.kappa_max - self.kappa_min) * min(max(ratio - 1.0, 0.0), 1.0)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        entries = []
        for module_name, module in ctx.network.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad and param.grad is not None:
                    entries.append((f"{module_name}.{pname}", module, param))
        if not entries:
            return {}
        # One all-reduce for all squared gradient norms: every rank takes the same kappa.
        sq = torch.stack([p.grad.detach().double().pow(2).sum() for _, _, p in entries])
        sq = ctx.all_reduce_mean(sq).cpu().tolist()
        kappas = []
        with torch.no_grad():
            for (name, module, param), g2 in zip(entries, sq, strict=True):
                stat = self.stats.setdefault(name, [0.0, 0.0, 0])
                stat[0] = self.fast_decay * stat[0] + (1.0 - self.fast_decay) * g2
                stat[1] = self.slow_decay * stat[1] + (1.0 - self.slow_decay) * g2
                stat[2] += 1
                if stat[2] <= self.warmup:
                    continue
                kappa = self.kappa(stat[0], stat[1], stat[2])
                kappas.append(kappa)
                if kappa == 0.0:
                    continue
                gamma = 1.0 - kappa
                sigma0 = default_bound(module) / math.sqrt(3.0)
                noise = randn_like_param(param, ctx.generator)
                param.mul_(gamma).add_(noise, alpha=math.sqrt(1.0 - gamma * gamma) * sigma0)
        if not kappas:
            return {}
        return {f"{self.name}/kappa_mean": sum(kappas) / len(kappas)}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"stats"}:
            raise ValueError(f"{self.name}: expected state keys ['stats'], got {sorted(state)}")
        self.stats = {str(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in state["stats"].items()}


__all__ = ["Reset", "ShrinkPerturb", "SoftReset"]
