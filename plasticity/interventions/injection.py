"""Plasticity injection (Nikishin et al. 2023): add fresh capacity to the head without changing outputs.

At injection: the current head ``h_theta`` is frozen; a fresh head ``h_theta1`` (same architecture,
newly initialized from ``ctx.generator``) is trainable and a frozen copy ``h_theta2`` of it is kept:
``Q(x) = h_theta(x) + (h_theta1(x) - h_theta2(x))``. At the instant of injection the bracket is exactly
zero (identical weights, identical computation), so the outputs are bit-for-bit unchanged.

Example::

    inj = PlasticityInjection(step=250_000)
    inj.setup(ctx)
    metrics = inj.after_step(ctx)     # at step 250000: {"plasticity_injection/injected": 1.0}
    # the learner must re-wrap a DDP model after an injection (the module tree changed)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from plasticity.base import Intervention, InterventionContext, mark_structure_changed
from plasticity.interventions._common import check_number, fresh_parameters, parametrized_modules
from plasticity.optim_state import add_parameters


class InjectedHead(nn.Module):
    """``base(x) + (fresh(x) - frozen(x))``; ``base`` and ``frozen`` have ``requires_grad=False``."""

    def __init__(self, base: nn.Module, fresh: nn.Module, frozen: nn.Module):
        super().__init__()
        self.base, self.fresh, self.frozen = base, fresh, frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parenthesized so that at injection the correction is an exact zero: base(x) + 0 == base(x).
        return self.base(x) + (self.fresh(x) - self.frozen(x))


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None  # an optimizer skips parameters without gradients


class PlasticityInjection(Intervention):
    """Freeze the head, add a fresh trainable head minus its frozen copy (outputs unchanged at injection).

    Triggers: after optimizer step ``step`` (0 = never by step) and/or at task switches
    (``on_task_switch``), at most ``max_injections`` times (0 = unlimited; repeated injections nest:
    the whole current head becomes the next frozen base). The fresh head's parameters are added to
    the optimizer as a new param group with the first group's hyper-parameters; existing moments
    (encoder, frozen head) are kept. The target network gets the same structure and the same fresh
    weights (all frozen), so online and target ``state_dict`` keys still match. ``output_layers`` of a
    network that does not track ``head`` dynamically may be stale afterwards.

    Checkpoints: ``state_dict`` holds the number of injections. ``load_state_dict`` rebuilds that
    structure on the spot when ``setup`` has run (else ``setup`` does), so the network's and the
    optimizer's checkpoint tensors are loaded afterwards into matching modules and param groups.
    """

    name = "plasticity_injection"

    def __init__(self, *, step: int = 0, on_task_switch: bool = True, max_injections: int = 1) -> None:
        self.step = check_number(self.name, "step", step, low=0, integer=True)
        self.on_switch = bool(on_task_switch)
        self.max_injections = check_number(self.name, "max_injections", max_injections, low=0, integer=True)
        if self.step == 0 and not self.on_switch:
            raise ValueError(f"{self.name}: never triggers (step=0 and on_task_switch=False); enable one")
        self.injections = 0
        self._pending: int | None = None
        self._ctx: InterventionContext | None = None

    def _allowed(self) -> bool:
        return self.max_injections == 0 or self.injections < self.max_injections

    def inject(self, ctx: InterventionContext) -> dict[str, float]:
        """Inject now (whatever the triggers say)."""
        network = ctx.network
        head = network.head
        fresh = copy.deepcopy(head)
        with torch.no_grad():
            for module in parametrized_modules(fresh):
                for name, value in fresh_parameters(module, ctx.generator, network).items():
                    getattr(module, name).copy_(value)
        for p in fresh.parameters():
            p.requires_grad_(True)
            p.grad = None
        frozen = copy.deepcopy(fresh)
        _freeze(frozen)
        _freeze(head)
        network.head = InjectedHead(head, fresh, frozen)
        add_parameters(ctx.optimizer, fresh.parameters())
        if ctx.target_network is not None:
            target_fresh, target_frozen = copy.deepcopy(fresh), copy.deepcopy(frozen)
            _freeze(target_fresh)
            _freeze(ctx.target_network.head)
            ctx.target_network.head = InjectedHead(ctx.target_network.head, target_fresh, target_frozen)
        self.injections += 1
        mark_structure_changed(ctx)
        return {f"{self.name}/injected": 1.0}

    def restore(self, ctx: InterventionContext) -> None:
        """Re-apply the injections recorded in a loaded ``state_dict`` (weights come from the checkpoint)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._restore_to(ctx, pending)

    def _restore_to(self, ctx: InterventionContext, count: int) -> None:
        if count == self.injections:
            return
        if self.injections:
            raise ValueError(
                f"{self.name}: cannot load a state with {count} injections into a network that already has "
                f"{self.injections}; load checkpoints into a freshly built learner"
            )
        for _ in range(count):
            self.inject(ctx)

    def setup(self, ctx: InterventionContext) -> None:
        self._ctx = ctx
        self.restore(ctx)

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        if self.step and ctx.step == self.step and self._allowed():
            return self.inject(ctx)
        return {}

    def on_task_switch(self, ctx: InterventionContext) -> dict[str, float]:
        if self.on_switch and self._allowed():
            return self.inject(ctx)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"injections": self.injections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"injections"}:
            raise ValueError(f"{self.name}: expected state keys ['injections'], got {sorted(state)}")
        count = state["injections"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{self.name}: 'injections' must be an int >= 0, got {count!r}")
        if self._ctx is not None:  # set up already (the learner loads after building): rebuild now
            self._restore_to(self._ctx, count)
        else:
            self._pending = count
