"""redo and continual_backprop: exact unit surgery, optimizer state, all-reduce, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plasticity.interventions._common import fresh_parameters
from plasticity.interventions.units import ContinualBackprop, ReDo
from plasticity.layers import unit_activity, unit_scores
from tests.unit.plasticity.nets import MLP, ConvNet, DuelingNet, make_ctx, regression_step


def _obs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kill(producer, units, norm=None):
    with torch.no_grad():
        if norm is None:
            producer.weight[units] = 0.0
            producer.bias[units] = -1.0
        else:
            norm.weight[units] = 0.0
            norm.bias[units] = -1.0


def _moments(opt, param):
    return {k: opt.state[param][k].clone() for k in ("exp_avg", "exp_avg_sq")}


def _expected_fresh(ctx, module):
    clone = torch.Generator().set_state(ctx.generator.get_state())
    return fresh_parameters(module, clone)["weight"]


def test_redo_resets_exactly_the_dead_units_mlp():
    net = MLP(hidden=(8, 6))
    ctx = make_ctx(net)
    obs = _obs(32, 4)
    regression_step(ctx, obs)  # populate Adam moments
    fc0, fc1 = net._hidden[0][0], net._hidden[1][0]
    _kill(fc0, [2, 5])
    layers = net.hidden_layers()
    with torch.no_grad():
        h1 = net._hidden[1][2](fc1(net._hidden[0][2](fc0(obs))))
    assert (h1.abs().sum(0) > 0).all()  # fc1 has no dead units, so only fc0 draws fresh weights
    w0, b0, w1 = fc0.weight.detach().clone(), fc0.bias.detach().clone(), fc1.weight.detach().clone()
    m_w0, m_b0, m_w1 = _moments(ctx.optimizer, fc0.weight), _moments(ctx.optimizer, fc0.bias), _moments(
        ctx.optimizer, fc1.weight)
    fresh = _expected_fresh(ctx, fc0)
    metrics = ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    assert metrics == {"redo/units_reset": 2.0, "redo/dormant_fraction": 2 / 14, "redo/skipped_nonfinite": 0.0}
    dead, alive = [2, 5], [0, 1, 3, 4, 6, 7]
    assert torch.equal(fc0.weight[dead], fresh[dead]) and torch.equal(fc0.weight[alive], w0[alive])
    assert torch.equal(fc0.bias[dead], torch.zeros(2)) and torch.equal(fc0.bias[alive], b0[alive])
    assert torch.equal(fc1.weight[:, dead], torch.zeros(6, 2)) and torch.equal(fc1.weight[:, alive], w1[:, alive])
    for key in ("exp_avg", "exp_avg_sq"):
        st = ctx.optimizer.state
        assert torch.equal(st[fc0.weight][key][dead], torch.zeros(2, 4))
        assert torch.equal(st[fc0.weight][key][alive], m_w0[key][alive])
        assert torch.equal(st[fc0.bias][key][dead], torch.zeros(2))
        assert torch.equal(st[fc0.bias][key][alive], m_b0[key][alive])
        assert torch.equal(st[fc1.weight][key][:, dead], torch.zeros(6, 2))
        assert torch.equal(st[fc1.weight][key][:, alive], m_w1[key][:, alive])
    assert len(layers) == 2


def test_redo_layer_norm_gain_and_offset_reset():
    net = MLP(hidden=(8, 6), norm="layer_norm")
    ctx = make_ctx(net)
    obs = _obs(32, 4)
    regression_step(ctx, obs)
    fc0, ln0 = net._hidden[0][0], net._hidden[0][1]
    with torch.no_grad():
        ln0.bias.fill_(3.0)  # LN outputs lie in (-sqrt(7), sqrt(7)): every other unit stays active
        net._hidden[1][1].bias.fill_(3.0)
    _kill(fc0, [3], norm=ln0)
    ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    assert ln0.weight[3].item() == 1.0 and ln0.bias[3].item() == 0.0 and fc0.bias[3].item() == 0.0
    assert ctx.optimizer.state[ln0.weight]["exp_avg"][3].item() == 0.0
    assert ctx.optimizer.state[ln0.weight]["exp_avg"][2].item() != 0.0


def test_redo_conv_flatten_linear():
    net = ConvNet()
    ctx = make_ctx(net)
    obs = _obs(16, 2, 9, 9)
    regression_step(ctx, obs)
    _kill(net.conv2, [1])
    with torch.no_grad():
        net.fc.bias.fill_(100.0)  # keep the consumer's own units active (else their rows are fresh too)
    fc_before = net.fc.weight.detach().clone()
    moments = _moments(ctx.optimizer, net.fc.weight)
    metrics = ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    assert metrics["redo/units_reset"] >= 1.0
    cols = list(range(9, 18))
    keep = list(range(0, 9)) + list(range(18, 27))
    assert torch.equal(net.fc.weight[:, cols], torch.zeros(5, 9))
    assert torch.equal(net.fc.weight[:, keep], fc_before[:, keep])
    assert torch.equal(ctx.optimizer.state[net.fc.weight]["exp_avg"][:, cols], torch.zeros(5, 9))
    assert torch.equal(ctx.optimizer.state[net.fc.weight]["exp_avg"][:, keep], moments["exp_avg"][:, keep])
    assert ctx.optimizer.state[net.conv2.weight]["exp_avg_sq"][1].abs().sum().item() == 0.0
    assert net.conv2.bias[1].item() == 0.0


def test_redo_dueling_zeroes_both_consumers():
    net = DuelingNet()
    ctx = make_ctx(net)
    obs = _obs(16, 4)
    regression_step(ctx, obs)
    _kill(net.fc, [4])
    with torch.no_grad():
        net.head.value_fc.bias.fill_(100.0)
        net.head.adv_fc.bias.fill_(100.0)
    ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    assert torch.equal(net.head.value_fc.weight[:, 4], torch.zeros(5))
    assert torch.equal(net.head.adv_fc.weight[:, 4], torch.zeros(5))
    assert net.head.adv_fc.weight[:, 3].abs().sum() > 0


def test_redo_score_threshold_and_period():
    net = MLP(hidden=(4,), in_dim=2)
    ctx = make_ctx(net)
    fc = net._hidden[0][0]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 0.0]]))
        fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    obs = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # E|h| = [1.5, 0.15, 3.0, 0.9], mean 1.3875 -> scores [1.08, 0.108, 2.16, 0.649]
    redo = ReDo(period=3, tau=0.2)
    ctx.step = 2
    assert redo.after_step(ctx, probe_obs=obs) == {}
    ctx.step = 3
    assert redo.after_step(ctx, probe_obs=obs)["redo/units_reset"] == 1.0
    assert fc.bias[1].item() == 0.0 and fc.bias[3].item() == pytest.approx(0.9)
    ctx.step = 6
    with pytest.raises(ValueError, match="step 6 is a reset step but after_step got no probe_obs"):
        redo.after_step(ctx, probe_obs=None)


def _four_unit_layer():
    """MLP(2 -> 4 -> head) whose per-unit mean |activation| on ``obs`` is exactly [1.5, 0.15, 3.0, 0.9]."""
    net = MLP(hidden=(4,), in_dim=2)
    fc = net._hidden[0][0]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 0.0]]))
        fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    obs = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    return net, fc, obs


def test_redo_scores_by_the_layer_mean_not_the_max():
    net, fc, obs = _four_unit_layer()
    activity = torch.tensor([1.5, 0.15, 3.0, 0.9], dtype=torch.float64)
    (layer,) = net.hidden_layers()
    with torch.no_grad():
        torch.testing.assert_close(unit_activity(layer, layer.activation(fc(obs))), activity)
    tau = 0.5
    # mean-normalized (ours): [1.081, 0.108, 2.162, 0.649] -> {1}; max-normalized: [0.5, 0.05, 1, 0.3] -> {0, 1, 3}
    assert torch.nonzero(unit_scores(activity) <= tau).flatten().tolist() == [1]
    assert torch.nonzero(activity / activity.max() <= tau).flatten().tolist() == [0, 1, 3]
    ctx = make_ctx(net)
    w, b, head = fc.weight.detach().clone(), fc.bias.detach().clone(), net.head.weight.detach().clone()
    fresh = _expected_fresh(ctx, fc)
    metrics = ReDo(period=1, tau=tau).after_step(ctx, probe_obs=obs)
    assert metrics == {"redo/units_reset": 1.0, "redo/dormant_fraction": 0.25, "redo/skipped_nonfinite": 0.0}
    kept = [0, 2, 3]
    assert torch.equal(fc.weight[1], fresh[1]) and fc.bias[1].item() == 0.0
    assert torch.equal(fc.weight[kept], w[kept]) and torch.equal(fc.bias[kept], b[kept])
    assert torch.equal(net.head.weight[:, 1], torch.zeros(3)) and torch.equal(net.head.weight[:, kept], head[:, kept])


def test_redo_skips_the_period_on_a_nan_probe():
    net, fc, obs = _four_unit_layer()
    with torch.no_grad():
        fc.weight[3] = 0.0
        fc.bias[3] = -1.0  # unit 3 dead: a normal reset step would recycle it
    ctx = make_ctx(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = obs.clone()
    bad[0, 1] = float("nan")
    redo = ReDo(period=1, tau=0.0)
    with pytest.warns(RuntimeWarning, match="redo: step 0: NaN/inf in the probe batch or its activations"):
        metrics = redo.after_step(ctx, probe_obs=bad)
    assert metrics["redo/skipped_nonfinite"] == 1.0 and metrics["redo/units_reset"] == 0.0
    assert math.isnan(metrics["redo/dormant_fraction"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # the next period with a finite probe resets as usual
    assert redo.after_step(ctx, probe_obs=obs) == {"redo/units_reset": 1.0, "redo/dormant_fraction": 0.25,
                                                   "redo/skipped_nonfinite": 0.0}
    assert fc.bias[3].item() == 0.0


def test_redo_skips_when_another_rank_saw_nan():
    net, fc, obs = _four_unit_layer()
    ctx = make_ctx(net, all_reduce_mean=lambda t: t + float("nan"))  # another rank's probe held a NaN
    before = fc.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped this period's reset"):
        assert ReDo(period=1, tau=0.5).after_step(ctx, probe_obs=obs)["redo/skipped_nonfinite"] == 1.0
    assert torch.equal(fc.weight, before)
    with pytest.raises(ValueError, match=r"redo: probe batch has 0 rows \(shape \(0, 2\)\)"):
        ReDo(period=1).after_step(ctx, probe_obs=obs[:0])


def test_redo_decides_on_all_reduced_statistics():
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        out = t.clone()
        out[:8] = 0.0  # pretend the other ranks saw fc0 entirely silent
        return out

    net = MLP(hidden=(8, 6))
    ctx = make_ctx(net, all_reduce_mean=fake_all_reduce)
    obs = _obs(16, 4)
    metrics = ReDo(period=1, tau=0.0).after_step(ctx, probe_obs=obs)
    assert len(calls) == 1 and calls[0].shape == (14,)
    assert metrics["redo/units_reset"] >= 8.0
    assert torch.equal(net._hidden[0][0].bias, torch.zeros(8))


def _train_with(iv_factory, seed):
    net = MLP(hidden=(8, 6), seed=0)
    ctx = make_ctx(net, seed=seed)
    ivs = [iv_factory()]
    for iv in ivs:
        iv.setup(ctx)
    obs = _obs(16, 4)
    for _ in range(6):
        regression_step(ctx, obs, ivs, probe_obs=obs)
    return net.state_dict()


@pytest.mark.parametrize(
    "factory",
    [lambda: ReDo(period=2, tau=0.9), lambda: ContinualBackprop(replacement_rate=0.3, maturity=1)],
    ids=["redo", "continual_backprop"],
)
def test_same_seed_same_parameters_bitwise(factory):
    a, b, c = _train_with(factory, 5), _train_with(factory, 5), _train_with(factory, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the generator really is used


def _tiny():
    net = MLP(in_dim=2, hidden=(3,), actions=1)
    fc = net._hidden[0][0]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        fc.bias.zero_()
        net.head.weight.copy_(torch.tensor([[2.0, -0.5, 1.0]]))
    return net, fc


def test_cbp_utility_exact_from_training_batch():
    net, fc = _tiny()
    calls = []
    ctx = make_ctx(net, all_reduce_mean=lambda t: calls.append(1) or t)
    cbp = ContinualBackprop(replacement_rate=0.0, decay=0.5, maturity=100)
    batch = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # h = [[1,2,3],[3,0,3]] -> E|h| = [2, 1, 3]
    probe = torch.zeros(1, 2)  # would give zero activity: must not be used when the loss hook ran
    assert cbp.loss(ctx, obs=batch, features=net.features(batch)) is None
    assert cbp.after_step(ctx, probe_obs=probe) == {"continual_backprop/units_replaced": 0.0}
    state = cbp.layers["fc0"]
    # u = 0.5 * 0 + 0.5 * E|h| * |w_out| = 0.5 * [2*2, 1*0.5, 3*1]
    assert state["utility"].tolist() == [2.0, 0.25, 1.5]
    assert state["age"].tolist() == [1, 1, 1]
    assert len(calls) == 1
    # without a loss call the probe batch is used
    cbp.after_step(ctx, probe_obs=batch)
    assert state["utility"].tolist() == [3.0, 0.375, 2.25]
    with pytest.raises(ValueError, match="no training-batch activations"):
        cbp.after_step(ctx, probe_obs=None)


def test_cbp_fractional_accumulation_and_lowest_utility_replaced():
    net, fc = _tiny()
    with torch.no_grad():
        net.head.weight[0, 1] = 0.0  # unit 1 contributes nothing
    ctx = make_ctx(net)
    cbp = ContinualBackprop(replacement_rate=0.2, decay=0.5, maturity=0)
    batch = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    counts = []
    for step in range(1, 5):
        ctx.step = step
        if step == 2:
            fresh = _expected_fresh(ctx, fc)
        counts.append(cbp.after_step(ctx, probe_obs=batch)["continual_backprop/units_replaced"])
        if step == 2:
            assert torch.equal(fc.weight[1], fresh[1])
            assert fc.weight[0].tolist() == [1.0, 0.0] and fc.weight[2].tolist() == [1.0, 1.0]
            assert fc.bias[1].item() == 0.0 and net.head.weight[0, 1].item() == 0.0
            assert cbp.layers["fc0"]["age"].tolist() == [2, 0, 2]
    # 3 mature units * 0.2 = 0.6 per step: 0.6 -> 1.2 (1 replaced) -> 0.2+0.6 -> 1.4 (1 replaced)
    assert counts == [0.0, 1.0, 0.0, 1.0]
    assert cbp.layers["fc0"]["accumulated"] == pytest.approx(0.4)


def test_cbp_maturity_protects_young_units():
    net, _ = _tiny()
    ctx = make_ctx(net)
    cbp = ContinualBackprop(replacement_rate=1.0, decay=0.5, maturity=2)
    batch = torch.ones(2, 2)
    assert [cbp.after_step(ctx, probe_obs=batch)["continual_backprop/units_replaced"] for _ in range(3)] == [
        0.0, 0.0, 3.0]


def test_cbp_nan_guard_and_state_roundtrip():
    net, fc = _tiny()
    ctx = make_ctx(net)
    cbp = ContinualBackprop(replacement_rate=0.4, decay=0.5, maturity=0)
    cbp.load_state_dict({"layers": {"fc0": {"utility": torch.tensor([float("nan"), 5.0, 5.0], dtype=torch.float64),
                                            "age": torch.tensor([10, 10, 10]), "accumulated": 0.0}}})
    batch = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert cbp.after_step(ctx, probe_obs=batch)["continual_backprop/units_replaced"] == 1.0
    state = cbp.state_dict()["layers"]["fc0"]
    assert torch.isfinite(state["utility"]).all()
    assert state["age"].tolist() == [0, 11, 11]  # the NaN unit (utility -> 0) was replaced first
    other = ContinualBackprop()
    other.load_state_dict(cbp.state_dict())
    assert torch.equal(other.layers["fc0"]["utility"], cbp.layers["fc0"]["utility"])
    with pytest.raises(ValueError, match="expected state keys"):
        other.load_state_dict({"utility": 1})
    with pytest.raises(ValueError, match="must be < 1"):
        ContinualBackprop(decay=1.0)


def test_cbp_conv_outgoing_mass_uses_column_layout():
    from plasticity.interventions.units import outgoing_weight_mass

    net = ConvNet()
    layer = net.hidden_layers()[1]
    with torch.no_grad():
        net.fc.weight.fill_(0.0)
        net.fc.weight[:, 9:18] = 1.0  # channel 1 of conv2
    assert outgoing_weight_mass(layer).tolist() == [0.0, 45.0, 0.0]
    assert isinstance(net.fc, nn.Linear)
