"""reset, shrink_perturb, soft_reset: exact values from the generator, optimizer state, triggers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from plasticity.interventions._common import fresh_parameters
from plasticity.interventions.resets import Reset, ShrinkPerturb, SoftReset
from tests.unit.plasticity.nets import MLP, DuelingNet, make_ctx, regression_step


def _trained(net_factory=MLP, seed=123):
    net = net_factory()
    target = copy.deepcopy(net)
    ctx = make_ctx(net, target=target, seed=seed)
    obs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    regression_step(ctx, obs)
    regression_step(ctx, obs)
    return net, target, ctx


def _clone_gen(ctx):
    return torch.Generator().set_state(ctx.generator.get_state())


def test_hard_reset_of_output_layer_with_optimizer_and_target():
    net, target, ctx = _trained()
    expected = fresh_parameters(net.head, _clone_gen(ctx))
    encoder_state = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    enc_moments = ctx.optimizer.state[net._hidden[0][0].weight]["exp_avg"].clone()
    metrics = Reset().on_task_switch(ctx)
    assert metrics == {"reset/layers_reset": 1.0}
    assert torch.equal(net.head.weight, expected["weight"]) and torch.equal(net.head.bias, expected["bias"])
    assert torch.equal(target.head.weight, expected["weight"]) and torch.equal(target.head.bias, expected["bias"])
    assert all(torch.equal(v, encoder_state[k]) for k, v in net.encoder.state_dict().items())
    state = ctx.optimizer.state[net.head.weight]
    assert torch.equal(state["exp_avg"], torch.zeros(3, 6)) and float(state["step"]) == 0.0
    assert torch.equal(ctx.optimizer.state[net._hidden[0][0].weight]["exp_avg"], enc_moments)
    # the bound of PyTorch's default init: |w| <= 1/sqrt(fan_in)
    assert net.head.weight.abs().max().item() <= 1 / math.sqrt(6)


def test_soft_reset_head_formula_and_period():
    net, target, ctx = _trained(DuelingNet)
    reset = Reset(layers="head", soft=True, shrink=0.8, perturb=0.2, period=2, on_task_switch=False)
    old = {k: v.clone() for k, v in net.head.state_dict().items()}
    old_target = {k: v.clone() for k, v in target.head.state_dict().items()}
    gen = _clone_gen(ctx)
    expected_fresh = {}
    for name, module in net.head.named_modules():
        for pname, value in fresh_parameters(module, gen).items():
            expected_fresh[f"{name}.{pname}"] = value
    assert reset.on_task_switch(ctx) == {}
    ctx.step = 3
    assert reset.after_step(ctx) == {}
    ctx.step = 4
    assert reset.after_step(ctx) == {"reset/layers_reset": 4.0}
    for key, value in net.head.state_dict().items():
        assert torch.allclose(value, 0.8 * old[key] + 0.2 * expected_fresh[key], atol=1e-7)
        assert torch.allclose(target.head.state_dict()[key], 0.8 * old_target[key] + 0.2 * expected_fresh[key],
                              atol=1e-7)


def test_reset_without_target_and_all_layers():
    net, target, ctx = _trained()
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    Reset(layers="all", target=False, reset_step=False).on_task_switch(ctx)
    assert all(torch.equal(v, before_target[k]) for k, v in target.state_dict().items())
    for p in net.parameters():
        assert float(ctx.optimizer.state[p]["step"]) == 2.0
        assert ctx.optimizer.state[p]["exp_avg_sq"].abs().sum().item() == 0.0
    ln_net = MLP(norm="layer_norm")
    ln_ctx = make_ctx(ln_net)
    with torch.no_grad():
        ln_net._hidden[0][1].weight.fill_(3.0)
    Reset(layers="encoder").on_task_switch(ln_ctx)
    assert torch.equal(ln_net._hidden[0][1].weight, torch.ones(8))


def test_shrink_perturb_init_noise_exact():
    net, _, ctx = _trained()
    old = {k: v.clone() for k, v in net.state_dict().items()}
    gen = _clone_gen(ctx)
    fresh = {}
    for name, module in net.named_modules():
        for pname, value in fresh_parameters(module, gen).items():
            fresh[f"{name}.{pname}"] = value
    moments = ctx.optimizer.state[net.head.weight]["exp_avg"].clone()
    assert ShrinkPerturb(alpha=0.4, sigma=0.1).on_task_switch(ctx) == {"shrink_perturb/applied": 1.0}
    for key, value in net.state_dict().items():
        assert torch.allclose(value, 0.4 * old[key] + 0.1 * fresh[key], atol=1e-7)
    assert torch.equal(ctx.optimizer.state[net.head.weight]["exp_avg"], moments)


def test_shrink_perturb_gaussian_every_step_head_only():
    net, _, ctx = _trained()
    encoder = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    old = net.head.weight.detach().clone()
    gen = _clone_gen(ctx)
    noise = torch.randn(old.shape, generator=gen, dtype=torch.float64).float()
    sp = ShrinkPerturb(alpha=1.0, sigma=0.01, variant="gaussian", layers="head", period=1, reset_optimizer=True)
    ctx.step = 7
    sp.after_step(ctx)
    assert torch.allclose(net.head.weight, old + 0.01 * noise, atol=1e-7)
    assert all(torch.equal(v, encoder[k]) for k, v in net.encoder.state_dict().items())
    assert ctx.optimizer.state[net.head.weight]["exp_avg"].abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="unknown variant"):
        ShrinkPerturb(variant="interpolate")
    with pytest.raises(ValueError, match="never triggers"):
        ShrinkPerturb(period=0, on_task_switch=False)


def test_soft_reset_kappa_rule():
    sr = SoftReset(kappa_min=0.001, kappa_max=0.011, fast_decay=0.5, slow_decay=0.9, warmup=0)
    # bias-corrected EMAs equal -> ratio 1 -> kappa_min
    assert sr.kappa(0.5 * 4.0, 0.1 * 4.0, 1) == pytest.approx(0.001)
    # fast 2.25x slow -> ratio 1.5 -> kappa_min + 0.5 * range
    assert sr.kappa(0.5 * 9.0, 0.1 * 4.0, 1) == pytest.approx(0.006)
    # ratio >= 2 saturates; no signal -> kappa_min
    assert sr.kappa(0.5 * 100.0, 0.1 * 4.0, 1) == pytest.approx(0.011)
    assert sr.kappa(0.0, 0.0, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="kappa_max"):
        SoftReset(kappa_min=0.5, kappa_max=0.1)
    with pytest.raises(ValueError, match="fast_decay < slow_decay < 1"):
        SoftReset(fast_decay=0.99, slow_decay=0.9)


def test_soft_reset_ou_update_exact_and_all_reduced():
    net = MLP(in_dim=2, hidden=(2,), actions=1)
    calls = []
    ctx = make_ctx(net, all_reduce_mean=lambda t: calls.append(t.shape) or t)
    sr = SoftReset(kappa_min=0.1, kappa_max=0.1, warmup=0)
    obs = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    (net(obs) ** 2).sum().backward()  # gradients for every Linear parameter
    old = {k: v.clone() for k, v in net.state_dict().items()}
    gen = _clone_gen(ctx)
    metrics = sr.after_step(ctx)
    assert metrics == {"soft_reset/kappa_mean": pytest.approx(0.1)}
    assert calls == [torch.Size([4])]
    gamma = 0.9
    for key, fan in (("encoder.0.weight", 2), ("encoder.0.bias", 2), ("head.weight", 2), ("head.bias", 2)):
        noise = torch.randn(old[key].shape, generator=gen, dtype=torch.float64).float()
        sigma0 = (1 / math.sqrt(fan)) / math.sqrt(3)
        expected = old[key] * gamma + math.sqrt(1 - gamma**2) * sigma0 * noise
        assert torch.allclose(net.state_dict()[key], expected, atol=1e-7)
    restored = SoftReset()
    restored.load_state_dict(sr.state_dict())
    assert restored.stats == sr.stats


def test_soft_reset_warmup_and_stationary_stream_do_nothing():
    net = MLP(in_dim=2, hidden=(2,), actions=1)
    ctx = make_ctx(net)
    sr = SoftReset(kappa_min=0.0, kappa_max=0.5, warmup=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    for _ in range(3):
        assert sr.after_step(ctx) == {}
    # a stationary gradient stream keeps fast == slow (bias-corrected): kappa 0, parameters unchanged
    assert sr.after_step(ctx) == {"soft_reset/kappa_mean": pytest.approx(0.0, abs=1e-12)}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
