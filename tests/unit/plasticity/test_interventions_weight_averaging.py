"""hare_tortoise: EMA of parameters and buffers, periodic hare <- tortoise, optimizer reset, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plasticity.interventions.weight_averaging import HareTortoise
from tests.unit.plasticity.nets import MLP, make_ctx, regression_step


class BufferNet(MLP):
    def __init__(self):
        super().__init__(in_dim=2, hidden=(2,), actions=1)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_of_params_and_buffers_exact():
    net = BufferNet()
    ctx = make_ctx(net)
    ht = HareTortoise(momentum=0.75, period=0)
    ht.setup(ctx)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(4.0)
        net.running.fill_(8.0)
        net.count.fill_(3)
    ctx.step = 1
    assert ht.after_step(ctx) == {}
    for key, value in ht.tortoise.items():
        if key == "running":
            assert torch.equal(value, torch.full((2,), 2.0))
        elif key == "count":
            assert value.item() == 3  # integer buffers are copied
        else:
            assert torch.allclose(value, start[key] + 1.0)


def test_periodic_reset_copies_tortoise_and_resets_optimizer():
    net = MLP()
    ctx = make_ctx(net)
    ht = HareTortoise(momentum=0.5, period=2)
    ht.setup(ctx)
    obs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert regression_step(ctx, obs, [ht]) == {}
    assert regression_step(ctx, obs, [ht]) == {"hare_tortoise/reset": 1.0}
    for key, value in net.state_dict().items():
        assert torch.equal(value, ht.tortoise[key])
    for p in net.parameters():
        assert float(ctx.optimizer.state[p]["step"]) == 0.0
        assert ctx.optimizer.state[p]["exp_avg"].abs().sum().item() == 0.0


def test_task_switch_reset_option_and_no_optimizer_reset():
    net = MLP()
    ctx = make_ctx(net)
    obs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    ht = HareTortoise(period=0, on_task_switch=True, reset_optimizer=False)
    ht.setup(ctx)
    regression_step(ctx, obs, [ht])
    assert ht.on_task_switch(ctx) == {"hare_tortoise/reset": 1.0}
    assert float(ctx.optimizer.state[net.head.weight]["step"]) == 1.0
    assert HareTortoise().on_task_switch(ctx) == {}


def test_state_roundtrip_and_architecture_change_refused():
    net = MLP()
    ctx = make_ctx(net)
    ht = HareTortoise()
    ht.setup(ctx)
    other = HareTortoise()
    other.load_state_dict(ht.state_dict())
    assert all(torch.equal(other.tortoise[k], v) for k, v in ht.tortoise.items())
    net.extra = nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"network entries changed since setup \(added \['extra.bias', 'extra.weight'\]"):
        ht.after_step(ctx)
    with pytest.raises(ValueError, match="expected state keys"):
        other.load_state_dict({})
