"""plasticity_injection: outputs unchanged at injection (exactly), optimizer groups, target, restore."""

from __future__ import annotations

import copy

import pytest
import torch

from plasticity.base import structure_version
from plasticity.interventions.injection import InjectedHead, PlasticityInjection
from tests.unit.plasticity.nets import MLP, DuelingNet, QRNet, make_ctx, regression_step


def _setup(factory):
    net = factory()
    target = copy.deepcopy(net)
    for p in target.parameters():
        p.requires_grad_(False)
    ctx = make_ctx(net, target=target)
    obs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    regression_step(ctx, obs)
    return net, target, ctx, obs


@pytest.mark.parametrize("factory", [MLP, DuelingNet, QRNet], ids=["mlp", "dueling", "qr"])
def test_outputs_unchanged_exactly_at_injection(factory):
    net, target, ctx, obs = _setup(factory)
    with torch.no_grad():
        target.load_state_dict(net.state_dict())
    before, before_target = net(obs).detach(), target(obs).detach()
    inj = PlasticityInjection()
    assert inj.on_task_switch(ctx) == {"plasticity_injection/injected": 1.0}
    assert isinstance(net.head, InjectedHead) and isinstance(target.head, InjectedHead)
    assert torch.equal(net(obs), before)
    assert torch.equal(target(obs), before_target)
    # online and target keep matching state_dict keys (the learner's target sync still works)
    assert set(net.state_dict()) == set(target.state_dict())
    assert structure_version(ctx) == 1


def test_only_the_fresh_head_trains_and_moments_are_kept():
    net, target, ctx, obs = _setup(MLP)
    old_head = net.head
    old_head_w = old_head.weight.detach().clone()
    enc = net._hidden[0][0]
    enc_moment = ctx.optimizer.state[enc.weight]["exp_avg"].clone()
    groups = len(ctx.optimizer.param_groups)
    PlasticityInjection(step=1, on_task_switch=False).after_step(ctx)  # ctx.step == 1
    head = net.head
    assert len(ctx.optimizer.param_groups) == groups + 1
    assert ctx.optimizer.param_groups[-1]["params"] == list(head.fresh.parameters())
    assert ctx.optimizer.param_groups[-1]["lr"] == ctx.optimizer.param_groups[0]["lr"]
    assert torch.equal(ctx.optimizer.state[enc.weight]["exp_avg"], enc_moment)
    assert not any(p.requires_grad for p in head.base.parameters())
    assert not any(p.requires_grad for p in head.frozen.parameters())
    assert all(p.requires_grad for p in head.fresh.parameters())
    frozen_w = head.frozen.weight.detach().clone()
    fresh_w = head.fresh.weight.detach().clone()
    enc_w = enc.weight.detach().clone()
    assert not torch.equal(fresh_w, old_head_w)  # fresh weights, not a copy of the old head
    regression_step(ctx, obs)
    assert torch.equal(head.base.weight, old_head_w) and torch.equal(head.frozen.weight, frozen_w)
    assert not torch.equal(head.fresh.weight, fresh_w)
    assert not torch.equal(enc.weight, enc_w)  # the encoder still trains


def test_triggers_and_max_injections():
    net, target, ctx, obs = _setup(MLP)
    inj = PlasticityInjection(step=5, on_task_switch=True, max_injections=2)
    ctx.step = 4
    assert inj.after_step(ctx) == {}
    ctx.step = 5
    assert inj.after_step(ctx) == {"plasticity_injection/injected": 1.0}
    before = net(obs).detach()
    assert inj.on_task_switch(ctx) == {"plasticity_injection/injected": 1.0}
    assert isinstance(net.head.base, InjectedHead)  # nested
    assert torch.equal(net(obs), before)
    assert inj.on_task_switch(ctx) == {}
    with pytest.raises(ValueError, match="never triggers"):
        PlasticityInjection(step=0, on_task_switch=False)


def test_checkpoint_restore_rebuilds_structure():
    net, target, ctx, obs = _setup(MLP)
    inj = PlasticityInjection()
    inj.on_task_switch(ctx)
    regression_step(ctx, obs)
    saved_net, saved_opt, saved_iv = net.state_dict(), ctx.optimizer.state_dict(), inj.state_dict()
    assert saved_iv == {"injections": 1}
    # a resumed learner: fresh network and optimizer, interventions loaded, setup, then weights
    net2 = MLP()
    ctx2 = make_ctx(net2, target=copy.deepcopy(net2))
    inj2 = PlasticityInjection()
    inj2.load_state_dict(saved_iv)
    inj2.setup(ctx2)
    net2.load_state_dict(saved_net)
    ctx2.optimizer.load_state_dict(saved_opt)
    assert torch.equal(net2(obs), net(obs))
    assert inj2.state_dict() == {"injections": 1}
    with pytest.raises(ValueError, match="'injections' must be an int"):
        inj2.load_state_dict({"injections": -1})


def test_load_after_setup_rebuilds_at_once_like_the_learner_does():
    net, target, ctx, obs = _setup(MLP)
    inj = PlasticityInjection()
    inj.setup(ctx)
    inj.on_task_switch(ctx)
    regression_step(ctx, obs)
    saved = {"net": net.state_dict(), "target": target.state_dict(), "opt": ctx.optimizer.state_dict(),
             "iv": inj.state_dict()}
    net2 = MLP()
    ctx2 = make_ctx(net2, target=copy.deepcopy(net2))
    inj2 = PlasticityInjection()
    inj2.setup(ctx2)  # learner order: build, setup, then load interventions, networks, optimizer
    inj2.load_state_dict(saved["iv"])
    net2.load_state_dict(saved["net"])
    ctx2.target_network.load_state_dict(saved["target"])
    ctx2.optimizer.load_state_dict(saved["opt"])
    assert torch.equal(net2(obs), net(obs))
    inj2.load_state_dict(saved["iv"])  # same count again: nothing to do
    with pytest.raises(ValueError, match="cannot load a state with 2 injections"):
        inj2.load_state_dict({"injections": 2})


def test_redo_after_injection_skips_frozen_layers_and_zeroes_all_consumers():
    from plasticity.interventions.units import ReDo
    from tests.unit.plasticity.nets import DuelingNet

    net, target, ctx, obs = _setup(DuelingNet)
    PlasticityInjection().on_task_switch(ctx)
    head = net.head
    from plasticity.layers import HiddenLayer

    layer = HiddenLayer(name="fc", producer=net.fc, activation=net.act,
                        consumers=[head.base.value_fc, head.fresh.value_fc, head.frozen.value_fc])
    frozen_layer = HiddenLayer(name="v", producer=head.base.value_fc, activation=head.base.value_act,
                               consumers=[head.base.value_out])
    net.hidden_layers = lambda: [layer, frozen_layer]
    with torch.no_grad():
        net.fc.weight[1] = 0.0
        net.fc.bias[1] = -1.0
        head.base.value_fc.weight.zero_()
        head.base.value_fc.bias.fill_(-1.0)  # every frozen unit is dead, but frozen: not reset
    metrics = ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    # only the killed unit 1 is dead, out of the 6 scored units: the frozen layer's 5 are not scored
    assert metrics == {"redo/units_reset": 1.0, "redo/dormant_fraction": 1 / 6, "redo/skipped_nonfinite": 0.0}
    assert torch.equal(head.base.value_fc.bias, torch.full((5,), -1.0))
    for consumer in layer.consumers:
        assert torch.equal(consumer.weight[:, 1], torch.zeros(5))
