"""Weight averaging: hare_tortoise (Lee et al. 2024, "Slow and steady wins the race").

Example::

    ht = HareTortoise(momentum=0.999, period=10000)
    ht.setup(ctx)
    ht.after_step(ctx)          # tortoise <- m * tortoise + (1 - m) * hare; every period: hare <- tortoise
"""

from __future__ import annotations

from typing import Any

import torch

from plasticity.base import Intervention, InterventionContext
from plasticity.interventions._common import check_number
from plasticity.optim_state import reset_module


class HareTortoise(Intervention):
    """Hare & Tortoise: an EMA "tortoise" of the trained "hare"; the hare is reset to it periodically.

    After every step the tortoise (a copy of every parameter *and* buffer, by ``state_dict`` name)
    becomes ``m * tortoise + (1 - m) * hare`` (integer buffers are copied). Every ``period`` steps
    (and at each task switch with ``on_task_switch``) the hare is overwritten with the tortoise.
    Choice: the optimizer state of the hare is reset at that moment (``reset_optimizer``, default on,
    step counts included): Adam's moments were accumulated along the hare's own trajectory and do not
    describe the tortoise's point. Metrics on reset steps: ``hare_tortoise/reset`` = 1.
    """

    name = "hare_tortoise"

    def __init__(
        self, *, momentum: float = 0.999, period: int = 10000, on_task_switch: bool = False, reset_optimizer: bool = True
    ) -> None:
        self.momentum = check_number(self.name, "momentum", momentum, low=0.0, high=1.0)
        self.period = check_number(self.name, "period", period, low=0, integer=True)
        self.on_switch = bool(on_task_switch)
        self.reset_optimizer = bool(reset_optimizer)
        self.tortoise: dict[str, torch.Tensor] = {}

    def setup(self, ctx: InterventionContext) -> None:
        if not self.tortoise:
            self.tortoise = {k: v.detach().clone() for k, v in ctx.network.state_dict().items()}
        self._check(ctx)

    def _check(self, ctx: InterventionContext) -> dict[str, torch.Tensor]:
        hare = ctx.network.state_dict()
        if set(hare) != set(self.tortoise):
            raise ValueError(
                f"{self.name}: network entries changed since setup (added {sorted(set(hare) - set(self.tortoise))}, "
                f"removed {sorted(set(self.tortoise) - set(hare))}); hare_tortoise needs a fixed architecture"
            )
        return hare

    def after_step(self, ctx: InterventionContext, *, probe_obs: torch.Tensor | None = None) -> dict[str, float]:
        hare = self._check(ctx)
        with torch.no_grad():
            for key, slow in self.tortoise.items():
                fast = hare[key]
                if slow.is_floating_point():
                    slow.mul_(self.momentum).add_(fast.detach(), alpha=1.0 - self.momentum)
                else:
                    slow.copy_(fast)
        if self.period and ctx.step % self.period == 0:
            return self.reset_hare(ctx)
        return {}

    def reset_hare(self, ctx: InterventionContext) -> dict[str, float]:
        """Copy the tortoise into the hare (and reset the hare's optimizer state if configured)."""
        hare = self._check(ctx)
        with torch.no_grad():
            for key, slow in self.tortoise.items():
                hare[key].copy_(slow)
        if self.reset_optimizer:
            reset_module(ctx.optimizer, ctx.network, reset_step=True)
        return {f"{self.name}/reset": 1.0}

    def on_task_switch(self, ctx: InterventionContext) -> dict[str, float]:
        return self.reset_hare(ctx) if self.on_switch else {}

    def state_dict(self) -> dict[str, Any]:
        return {"tortoise": {k: v.clone() for k, v in self.tortoise.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"tortoise"}:
            raise ValueError(f"{self.name}: expected state keys ['tortoise'], got {sorted(state)}")
        self.tortoise = {str(k): v.detach().clone() for k, v in state["tortoise"].items()}
