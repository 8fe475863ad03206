"""Shared pieces of the interventions: fresh initial values, unit re-initialization, option checks.

Fresh values. :func:`fresh_parameters` draws a module's initial values from ``generator`` on the
generator's device (a learner may hold a CUDA generator), in float64, then casts them to the
parameter's dtype and device; every DDP rank, seeded alike, draws the same numbers. Linear/Conv2d use PyTorch's
default initialization (``kaiming_uniform_(a=sqrt(5))``, i.e. weight and bias ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in))); LayerNorm gets ones/zeros; other modules with ``reset_parameters`` are reset in a
copy under a forked RNG seeded from ``generator``. A network that initializes differently can
define ``fresh_parameters(module, generator) -> dict[name, Tensor]``; it is used instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext
from plasticity.layers import HiddenLayer, WeightLayer
from plasticity.optim_state import reset_entries

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def fan_in(module: WeightLayer) -> int:
    """Inputs per output unit: in_features, or in_channels/groups * kernel area for Conv2d."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[1] * module.weight[0, 0].numel()


def default_bound(module: WeightLayer) -> float:
    """Half-width of PyTorch's default uniform initialization, ``1/sqrt(fan_in)``."""
    return 1.0 / math.sqrt(fan_in(module))


def _uniform(shape, bound: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    values = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64) * (2 * bound) - bound
    return values.to(device=like.device, dtype=like.dtype)


def fresh_parameters(module: nn.Module, generator: torch.Generator, network: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Freshly drawn initial values for ``module``'s own parameters (see the module docstring)."""
    custom = getattr(network, "fresh_parameters", None) if network is not None else None
    if callable(custom):
        return dict(custom(module, generator))
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        bound = default_bound(module)
        out = {"weight": _uniform(module.weight.shape, bound, generator, module.weight)}
        if module.bias is not None:
            out["bias"] = _uniform(module.bias.shape, bound, generator, module.bias)
        return out
    if isinstance(module, NORM_TYPES):
        out = {}
        if getattr(module, "weight", None) is not None:
            out["weight"] = torch.ones_like(module.weight)
        if getattr(module, "bias", None) is not None:
            out["bias"] = torch.zeros_like(module.bias)
        return out
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return {}
    if not callable(getattr(module, "reset_parameters", None)):
        raise ValueError(f"cannot re-initialize {type(module).__name__}: it has no reset_parameters()")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = copy.deepcopy(module).cpu()
        twin.reset_parameters()
    return {name: tensor.detach().to(own[name]) for name, tensor in twin.named_parameters(recurse=False)}


def parametrized_modules(root: nn.Module) -> list[nn.Module]:
    """Modules of ``root`` (itself included) that own parameters directly, in registration order."""
    return [m for m in root.modules() if any(True for _ in m.parameters(recurse=False))]


def weight_layers(root: nn.Module) -> list[WeightLayer]:
    return [m for m in root.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def matching_module(online: nn.Module, target: nn.Module, module: nn.Module) -> nn.Module:
    """The module of ``target`` at the path where ``module`` sits in ``online`` (same architecture)."""
    for name, candidate in online.named_modules():
        if candidate is module:
            return target.get_submodule(name) if name else target
    raise ValueError(f"{type(module).__name__} is not a submodule of the online network")


def reinit_units(
    layer: HiddenLayer,
    units: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    network: nn.Module | None = None,
) -> None:
    """Re-initialize hidden ``units`` of ``layer`` (ReDo / continual backprop).

    Incoming weights (producer rows or filters) come from a freshly initialized copy of the producer;
    the bias is zeroed; a norm's gain/offset for those units goes back to 1/0; every consumer's
    outgoing weights for the units are zeroed (all spatial positions and multiplier blocks); the
    optimizer state of exactly those entries is zeroed. Parameters not in the optimizer are skipped.
    """
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1).cpu()
    if units.numel() == 0:
        return
    if int(units.min()) < 0 or int(units.max()) >= layer.num_units:
        raise ValueError(f"layer {layer.name!r}: units {units.tolist()} out of range [0, {layer.num_units})")
    held = set()
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}

    def touch(param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
        if id(param) in held:
            reset_entries(optimizer, param, index, dim=dim)

    fresh = fresh_parameters(layer.producer, generator, network)
    producer = layer.producer
    with torch.no_grad():
        rows = units.to(producer.weight.device)
        producer.weight.index_copy_(0, rows, fresh["weight"].index_select(0, rows))
        touch(producer.weight, units, 0)
        if producer.bias is not None:
            producer.bias.index_fill_(0, rows, 0.0)
            touch(producer.bias, units, 0)
        norm = layer.norm
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[0] == layer.num_units:
            norm.weight.index_fill_(0, rows, 1.0)
            touch(norm.weight, units, 0)
            if norm.bias is not None:
                norm.bias.index_fill_(0, rows, 0.0)
                touch(norm.bias, units, 0)
        for consumer in layer.consumers:
            columns = layer.consumer_columns(consumer, units)
            consumer.weight.index_fill_(1, columns.to(consumer.weight.device), 0.0)
            touch(consumer.weight, columns, 1)


def check_number(owner: str, option: str, value, *, low=None, high=None, low_open=False, integer=False):
    """Validate a numeric option; the error names the intervention, the option, the value and the range."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise ValueError(f"{owner}: option {option!r} must be {'an int' if integer else 'a finite number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{owner}: option {option!r} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{owner}: option {option!r} must be <= {high}, got {value!r}")
    return value


def randn_like_param(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``param``, drawn on the generator's device, cast to ``param``."""
    return torch.randn(param.shape, generator=generator, device=generator.device, dtype=torch.float64).to(param)


def trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]


class ScheduledIntervention(Intervention):
    """An intervention that acts every ``period`` optimizer steps (0 = never) and/or at task switches.

    Subclasses set ``self.period`` and ``self.on_switch`` in ``__init__`` and define ``apply(ctx)``,
    which does the work and returns its metrics.
    """

    period: int = 0
    on_switch: bool = False

    def apply(self, ctx: InterventionContext) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} must define apply(ctx)")

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if self.period and ctx.step % self.period == 0:
            return self.apply(ctx)
        return {}

    def on_task_switch(self, ctx: InterventionContext) -> dict[str, float]:
        return self.apply(ctx) if self.on_switch else {}
