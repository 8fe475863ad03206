"""infer: auxiliary heads, targets from the frozen initial network, optimizer group, all-reduce, state."""

from __future__ import annotations

import pytest
import torch

from plasticity.interventions.auxiliary import InFeR
from tests.unit.plasticity.nets import MLP, make_ctx, regression_step


def test_initial_loss_and_exact_formula():
    net = MLP()
    ctx = make_ctx(net)
    infer = InFeR(num_heads=3, beta=2.0, alpha=0.5)
    infer.setup(ctx)
    obs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    feats = net.features(obs)
    loss = infer.loss(ctx, obs=obs, features=feats)
    heads = infer.heads
    assert heads.weight.shape == (3, 6)
    assert ctx.optimizer.param_groups[-1]["params"] == [heads.weight, heads.bias]
    # at the start phi_t == phi_0 and g == g_0: (g - 2 g)^2 = g^2
    expected = 0.5 * (heads(feats) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert infer.after_step(ctx) == {"infer/aux_loss": pytest.approx(expected.item() / 0.5, rel=1e-6)}
    assert infer.after_step(ctx) == {}


def test_targets_stay_frozen_while_network_trains():
    net = MLP()
    ctx = make_ctx(net, lr=0.05)
    infer = InFeR(num_heads=2, beta=1.0, alpha=1.0)
    infer.setup(ctx)
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    regression_step(ctx, obs, [infer])
    init_feats = infer.initial_network.features(obs)
    target = infer.initial_heads(init_feats)
    h0 = infer.initial_heads.weight.detach().clone()
    for _ in range(3):
        regression_step(ctx, obs, [infer])
    assert torch.equal(infer.initial_heads.weight, h0)
    assert torch.equal(infer.initial_heads(infer.initial_network.features(obs)), target)
    loss = infer.loss(ctx, obs=obs, features=net.features(obs))
    assert loss.item() == pytest.approx(((infer.heads(net.features(obs)) - target) ** 2).mean().item(), rel=1e-5)


def test_aux_gradients_go_through_all_reduce():
    calls = []

    def fake(t):
        calls.append(tuple(t.shape))
        return t * 0.0

    net = MLP()
    ctx = make_ctx(net, all_reduce_mean=fake)
    infer = InFeR(num_heads=2)
    infer.setup(ctx)
    obs = torch.randn(4, 4)
    infer.loss(ctx, obs=obs, features=net.features(obs)).backward()
    assert sorted(calls) == [(2,), (2, 6)]
    assert infer.heads.weight.grad.abs().sum().item() == 0.0


def test_state_roundtrip_and_errors():
    net = MLP()
    ctx = make_ctx(net)
    infer = InFeR(num_heads=2)
    with pytest.raises(ValueError, match="before setup"):
        infer.loss(ctx, obs=torch.zeros(1, 4), features=torch.zeros(1, 6))
    assert infer.state_dict() == {}
    infer.setup(ctx)
    obs = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    regression_step(ctx, obs, [infer])
    state = infer.state_dict()
    net2 = MLP(seed=9)
    ctx2 = make_ctx(net2)
    restored = InFeR(num_heads=2)
    restored.load_state_dict(state)
    restored.setup(ctx2)
    assert torch.equal(restored.heads.weight, infer.heads.weight)
    assert torch.equal(restored.initial_network.features(obs), infer.initial_network.features(obs))
    with pytest.raises(ValueError, match="unexpected state keys"):
        restored.load_state_dict({"heads": {}})
    with pytest.raises(ValueError, match="'num_heads' must be >= 1"):
        InFeR(num_heads=0)


def test_load_after_setup_creates_heads_before_the_optimizer_loads():
    net = MLP()
    ctx = make_ctx(net)
    infer = InFeR(num_heads=2)
    infer.setup(ctx)
    obs = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    regression_step(ctx, obs, [infer])
    saved_iv, saved_opt, saved_net = infer.state_dict(), ctx.optimizer.state_dict(), net.state_dict()
    net2 = MLP(seed=3)
    ctx2 = make_ctx(net2)
    other = InFeR(num_heads=2)
    other.setup(ctx2)
    other.load_state_dict(saved_iv)
    net2.load_state_dict(saved_net)
    ctx2.optimizer.load_state_dict(saved_opt)  # needs the heads' param group to exist already
    assert torch.equal(other.heads.weight, infer.heads.weight)
    assert torch.equal(ctx2.optimizer.state[other.heads.weight]["exp_avg"], ctx.optimizer.state[infer.heads.weight]["exp_avg"])
