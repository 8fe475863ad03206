"""layer_norm, nap, elr_increase."""

from __future__ import annotations

import pytest
import torch

from plasticity.interventions.normalization import ELRIncrease, LayerNormIntervention, NormalizeAndProject
from tests.unit.plasticity.nets import MLP, ConvNet, make_ctx, regression_step


def test_layer_norm_override():
    assert LayerNormIntervention().network_overrides() == {"norm": "layer_norm"}
    LayerNormIntervention().setup(make_ctx(ConvNet(norm="layer_norm")))
    with pytest.raises(ValueError, match="no normalized hidden layers"):
        LayerNormIntervention().setup(make_ctx(ConvNet()))


def test_nap_projects_to_initial_norms():
    net = MLP(hidden=(8, 6), norm="layer_norm")
    ctx = make_ctx(net)
    nap = NormalizeAndProject()
    assert nap.network_overrides() == {"norm": "layer_norm"}
    nap.setup(ctx)
    fc0, ln0 = net._hidden[0][0], net._hidden[0][1]
    rho = fc0.weight.detach().norm().item()
    head_before = net.head.weight.detach().clone()
    with torch.no_grad():
        fc0.weight.mul_(3.0)
        fc0.weight[0, 0] += 1.0
        ln0.weight.fill_(2.0)
        ln0.bias.fill_(1.0)
        net.head.weight.mul_(5.0)
    direction = fc0.weight.detach() / fc0.weight.detach().norm()
    bias_before = fc0.bias.detach().clone()
    ctx.step = 1
    nap.after_step(ctx)
    assert fc0.weight.norm().item() == pytest.approx(rho, rel=1e-6)
    assert torch.allclose(fc0.weight / fc0.weight.norm(), direction, atol=1e-7)
    assert torch.equal(fc0.bias, bias_before)
    # LN: [gain, offset] jointly to its initial norm sqrt(8): scale sqrt(8 / (8*4 + 8*1)) = sqrt(1/5)
    scale = (1 / 5) ** 0.5
    assert torch.allclose(ln0.weight, torch.full((8,), 2 * scale)) and torch.allclose(ln0.bias, torch.full((8,), scale))
    # the output layer is free by default
    assert torch.allclose(net.head.weight, head_before * 5.0)


def test_nap_include_output_and_period():
    net = MLP(hidden=(8,), norm="layer_norm")
    ctx = make_ctx(net)
    nap = NormalizeAndProject(period=2, include_output=True)
    nap.setup(ctx)
    rho = net.head.weight.detach().norm().item()
    with torch.no_grad():
        net.head.weight.mul_(4.0)
    ctx.step = 1
    nap.after_step(ctx)
    assert net.head.weight.norm().item() == pytest.approx(4 * rho, rel=1e-6)
    ctx.step = 2
    nap.after_step(ctx)
    assert net.head.weight.norm().item() == pytest.approx(rho, rel=1e-6)
    state = nap.state_dict()
    other = NormalizeAndProject(period=2, include_output=True)
    other.load_state_dict(state)
    assert other.targets == nap.targets
    with pytest.raises(ValueError, match="no normalized hidden layers"):
        NormalizeAndProject().setup(make_ctx(MLP()))


def test_nap_keeps_norms_through_training():
    net = MLP(hidden=(8, 6), norm="layer_norm")
    ctx = make_ctx(net, lr=0.1)
    nap = NormalizeAndProject()
    nap.setup(ctx)
    targets = dict(nap.targets)
    obs = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        regression_step(ctx, obs, [nap])
    for name, module in net.named_modules():
        if name in targets and isinstance(module, torch.nn.Linear) and module is not net.head:
            assert module.weight.norm().item() == pytest.approx(targets[name], rel=1e-5)


def test_elr_increase_scales_invariant_weights_keeping_outputs():
    net = MLP(hidden=(8, 6), norm="layer_norm")
    ctx = make_ctx(net)
    elr = ELRIncrease(factor=0.5)
    elr.setup(ctx)
    obs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    before = net(obs).detach()
    w0 = net._hidden[0][0].weight.detach().clone()
    head = net.head.weight.detach().clone()
    assert elr.on_task_switch(ctx) == {"elr_increase/layers_scaled": 2.0}
    assert torch.equal(net._hidden[0][0].weight, w0 * 0.5)
    assert torch.equal(net.head.weight, head)
    assert torch.allclose(net(obs), before, atol=2e-3)  # equal up to LayerNorm's epsilon
    with pytest.raises(ValueError, match="never triggers"):
        ELRIncrease(on_task_switch=False, period=0)
    with pytest.raises(ValueError, match="'factor' must be > 0.0"):
        ELRIncrease(factor=0.0)
    with pytest.raises(ValueError, match="no normalized hidden layers"):
        ELRIncrease().setup(make_ctx(MLP()))


def test_nap_targets_loaded_from_a_checkpoint_survive_a_later_setup():
    net = MLP(hidden=(8, 6), norm="layer_norm")
    ctx = make_ctx(net)
    fc0, ln0 = net._hidden[0][0], net._hidden[0][1]
    fresh = {name: float(module.weight.detach().norm()) for name, module in net.named_modules()
             if isinstance(module, torch.nn.Linear)}
    # a checkpoint whose initial norms differ from this fresh network's: 2x for fc0 and a LN target of 5;
    # "encoder.3" (fc1) is missing from it (e.g. written by an older run)
    state = {"targets": {"encoder.0": 2 * fresh["encoder.0"], "encoder.1": 5.0}}
    nap = NormalizeAndProject()
    nap.load_state_dict(state)
    nap.setup(ctx)  # e.g. a DDP learner or the resume path sets up after loading
    assert nap.targets["encoder.0"] == 2 * fresh["encoder.0"] and nap.targets["encoder.1"] == 5.0
    assert nap.targets["encoder.3"] == pytest.approx(fresh["encoder.3"])  # filled in from the network
    nap.setup(ctx)  # a second setup changes nothing either
    assert nap.targets["encoder.0"] == 2 * fresh["encoder.0"]
    ctx.step = 1
    nap.after_step(ctx)
    assert fc0.weight.norm().item() == pytest.approx(2 * fresh["encoder.0"], rel=1e-6)
    assert torch.cat([ln0.weight, ln0.bias]).norm().item() == pytest.approx(5.0, rel=1e-6)
    # loading after setup: the checkpoint's targets replace the recorded ones, the others stay
    later = NormalizeAndProject()
    later.setup(make_ctx(MLP(hidden=(8, 6), norm="layer_norm")))
    recorded = dict(later.targets)
    later.load_state_dict(state)
    assert later.targets == {**recorded, **state["targets"]}
    with pytest.raises(ValueError, match=r"targets must be finite norms >= 0, got \{'encoder.0': nan\}"):
        later.load_state_dict({"targets": {"encoder.0": float("nan")}})
