"""Diagnostics against hand-computed values on hand-built weights and activations."""

from __future__ import annotations

import math

import pytest
import torch
from diag_nets import OBS, HandNet, linear_scorer, tanh_net
from torch import nn

from plasticity import diagnostics as D
from plasticity.activations import CReLU, make_activation
from plasticity.layers import HiddenLayer, layer_names, unit_activity, unit_scores
from tests.unit.plasticity.nets import MLP

SQRT221 = math.sqrt(221.0)
# Singular values of [[1, 2], [3, 4]]: sqrt(15 +- sqrt(221)).
SIG = (math.sqrt(15 + SQRT221), math.sqrt(15 - SQRT221))


# --------------------------------------------------------------------------------- unit scores
def _layer(units, activation=None):
    return HiddenLayer("l", nn.Linear(1, units), activation if activation is not None else nn.ReLU())


def test_unit_scores_linear_exact():
    h = torch.tensor([[1.0, 2.0, 0.0, 0.01], [3.0, 4.0, 0.0, 0.03]])
    activity = unit_activity(_layer(4), h)
    assert activity.dtype == torch.float64
    scores = unit_scores(activity)
    mean = (2 + 3 + 0 + 0.02) / 4
    torch.testing.assert_close(scores, torch.tensor([2 / mean, 3 / mean, 0.0, 0.02 / mean], dtype=torch.float64))
    assert int((scores <= 0.025).sum()) == 2
    assert int((scores <= 0.0).sum()) == 1
    assert int((scores <= 0.01).sum()) == 1  # 0.02/1.255 = 0.0159 > 0.01


def test_unit_scores_conv_mean_over_space_and_multiplier():
    # [B=1, m*units=4 (m=2, units=2), H=1, W=2]; unit i reads channels i and 2+i.
    h = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]], [[2.0, -2.0]], [[0.0, 0.4]]]])
    scores = unit_scores(unit_activity(_layer(2, CReLU()), h))
    e0, e1 = (1 + 3 + 2 + 2) / 4, 0.4 / 4
    mean = (e0 + e1) / 2
    torch.testing.assert_close(scores, torch.tensor([e0 / mean, e1 / mean], dtype=torch.float64))


def test_unit_scores_all_zero_layer_nan_and_bad_shapes():
    assert unit_scores(unit_activity(_layer(5), torch.zeros(3, 5))).tolist() == [0.0] * 5  # all dormant
    # one NaN value poisons the layer: no unit may read as "not dormant" (NaN <= tau is False)
    h = torch.ones(3, 5)
    h[1, 2] = float("nan")
    assert torch.isnan(unit_scores(unit_activity(_layer(5), h))).all()
    with pytest.raises(ValueError, match=r"does not have 10 \(= multiplier 2 x units 5\)"):
        unit_activity(_layer(5, CReLU()), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"shape \(0, 5\) has 0 samples"):
        unit_activity(_layer(5), torch.zeros(0, 5))
    with pytest.raises(ValueError, match=r"non-empty \[units\] tensor, got shape \(2, 2\)"):
        unit_scores(torch.ones(2, 2))


def test_active_and_saturated_fractions():
    h = torch.tensor([[0.0, 1.0], [2.0, 0.5]])
    assert D.active_fraction(h, num_units=2).tolist() == [0.5, 1.0]
    t = torch.tensor([[0.995, -0.999], [0.5, 0.99]])
    assert D.saturated_fraction(t, num_units=2).tolist() == [0.5, 0.5]


# ------------------------------------------------------------------------------------ features
def test_srank_effective_rank_feature_rank_on_diagonal():
    f = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert D.srank(f, delta=0.01) == 4
    assert D.srank(f, delta=0.15) == 3  # cumsum 4, 7, 9 >= 8.5
    assert D.srank(f, delta=0.3) == 2  # 7 >= 7 exactly
    p = [0.4, 0.3, 0.2, 0.1]
    assert D.effective_rank(f) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    # sigma / sqrt(4) = 2, 1.5, 1, 0.5
    assert D.feature_rank(f, eps=0.01) == 4
    assert D.feature_rank(f, eps=0.5) == 3
    assert D.feature_rank(f, eps=1.0) == 2


def test_rank_of_zero_and_rank_one_matrices():
    assert D.srank(torch.zeros(3, 2)) == 0
    assert D.effective_rank(torch.zeros(3, 2)) == 0.0
    assert D.feature_rank(torch.zeros(3, 2)) == 0
    rank_one = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert D.srank(rank_one) == 1
    assert D.effective_rank(rank_one) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="delta"):
        D.srank(rank_one, delta=1.0)
    with pytest.raises(ValueError, match="shape"):
        D.srank(torch.zeros(0, 2))


def test_feature_stats():
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    stats = D.feature_stats(f)
    assert stats["feature_norm"] == pytest.approx((5 + 0 + 2) / 3)
    # column vars (population): [3,0,0] -> 2; [4,0,2] -> 8/3
    assert stats["feature_var"] == pytest.approx((2 + 8 / 3) / 2)


# ---------------------------------------------------------------------------------- parameters
def test_weight_norms_and_distance_to_init():
    net = HandNet()
    init = D.snapshot_parameters(net)
    norms = D.weight_norms(net)
    assert norms["weight_norm/encoder.0"] == pytest.approx(math.sqrt(3 + 1e-4))
    assert norms["weight_norm/encoder.2"] == pytest.approx(math.sqrt(3))
    assert norms["weight_norm/head"] == pytest.approx(math.sqrt(2))
    assert norms["weight_norm/total"] == pytest.approx(math.sqrt(8 + 1e-4))
    with torch.no_grad():
        net.head.weight[0, 0] += 3.0
        net.head.bias[1] -= 4.0
    dist = D.distances_to_init(net, init)
    assert dist["dist_to_init/head"] == pytest.approx(5.0)
    assert dist["dist_to_init/encoder.0"] == 0.0
    assert dist["dist_to_init/total"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="initial parameters are for modules"):
        D.distances_to_init(net, {"other": torch.zeros(1)})
    # a head swapped in after theta_0 (plasticity injection) is left out, not an error
    net.head = nn.Sequential(nn.Linear(3, 2))  # modules "head.0" now, "head" at init
    dist = D.distances_to_init(net, init)
    assert "dist_to_init/head" not in dist and dist["dist_to_init/total"] == 0.0


def test_effective_lr_tracker_with_sgd_step():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 4.0]]))
        net.bias.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    tracker = D.EffectiveLRTracker(net)
    with pytest.raises(RuntimeError, match="snapshot"):
        tracker.measure()
    net(torch.tensor([[1.0, 0.0]])).sum().backward()  # grad w = [1, 0], grad b = 1
    tracker.snapshot()
    opt.step()
    out = tracker.measure()
    # delta = 0.5 * [1, 0, 1] -> ||delta|| = sqrt(0.5); ||theta|| = 5
    assert out == {"effective_lr/root": pytest.approx(math.sqrt(0.5) / 5), "effective_lr/total": pytest.approx(math.sqrt(0.5) / 5)}
    assert not tracker.armed


def test_grad_stats_from_dot_grad_and_missing_grads():
    net = HandNet()
    net.head.weight.grad = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 2.0]])
    net.head.bias.grad = torch.tensor([0.0, 0.0])
    out = D.grad_stats(net)
    assert out["grad_l1/head"] == 5.0
    assert out["grad_l2/head"] == pytest.approx(3.0)
    assert out["grad_zero_frac/head"] == pytest.approx(5 / 8)
    # encoder params have no .grad: all-zero gradients
    assert out["grad_l1/encoder.0"] == 0.0 and out["grad_zero_frac/encoder.0"] == 1.0
    n_params = sum(p.numel() for p in net.parameters())
    assert out["grad_zero_frac/total"] == pytest.approx((n_params - 3) / n_params)


# ------------------------------------------------------------------------------------- outputs
def test_churn_greedy_and_entropy():
    assert D.churn(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 0.5
    q = torch.tensor([[[1.0, 3.0], [2.5, 2.5]]])  # QR [B=1, A=2, N=2]: means 2, 2.5
    assert D.greedy_actions(q).tolist() == [1]
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    e = math.e
    h1 = math.log(3 + e) - e / (3 + e)
    assert D.policy_entropy(logits) == pytest.approx((math.log(4) + h1) / 2)
    assert D.policy_entropy(torch.tensor([[0.0, 2.0]]), temperature=2.0) == pytest.approx(
        math.log(1 + e) - e / (1 + e)
    )
    with pytest.raises(ValueError, match="temperature"):
        D.policy_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="equal shape"):
        D.churn(torch.tensor([0]), torch.tensor([0, 1]))


def test_q_value_policy_view_exact():
    view = D.q_value_policy(2.0)(torch.tensor([[0.0, 2.0], [1.0, 1.0]]))
    assert view.actions.tolist() == [1, 0] and view.actions.dtype == torch.long  # ties: the first action
    e = math.e
    torch.testing.assert_close(view.entropy, torch.tensor([math.log(1 + e) - e / (1 + e), math.log(2)],
                                                          dtype=torch.float64))
    assert D.q_value_policy()(torch.tensor([[[1.0, 3.0], [2.5, 2.5]]])).actions.tolist() == [1]  # QR: mean 2 < 2.5
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        D.q_value_policy(0)


def test_churn_integer_and_float_actions_exact():
    assert D.churn(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 0.5
    before = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, -0.5], [0.0, 0.0]], dtype=torch.float64)
    after = torch.tensor([[0.0, 0.002], [1.0, 1.0005], [0.4, -0.5], [0.0, -0.001]], dtype=torch.float64)
    # max-norm moves 0.002, 0.0005, 0.1, 0.001: above the default 1e-3 only rows 0 and 2 (0.001 is not > 0.001)
    assert D.churn(before, after) == 0.5
    assert D.churn(before, after, tolerance=0.05) == 0.25
    assert D.churn(before, after, tolerance=0.0) == 1.0
    after[3, 0] = float("nan")
    assert math.isnan(D.churn(before, after))
    with pytest.raises(ValueError, match="equal shape"):
        D.churn(torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B\] integer or \[B, d\] float actions, got shape \(2,\)"):
        D.churn(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        D.churn(before, before, tolerance=-1.0)


def test_policy_fn_continuous_actions_churn_and_no_entropy():
    net = HandNet()  # output on OBS: [[1, 2], [3, 4]], read here as 2-d continuous actions
    diag = D.Diagnostics(net, names="churn,policy_entropy", every=1, probe_obs=OBS,
                         policy_fn=lambda out: D.PolicyView(actions=out), churn_tolerance=0.1)
    assert diag.after_step() == {}  # no previous actions, and a policy without entropy
    with torch.no_grad():
        net.head.weight[0, 0] += 0.05  # actions [[1.05, 2], [3.15, 4]]: moves 0.05 and 0.15
    assert diag.after_step() == {"churn": 0.5}
    assert diag.after_step() == {"churn": 0.0}


def test_policy_fn_discrete_actions_with_entropy():
    net = HandNet()

    def policy(out):
        return D.PolicyView(actions=(out[:, 0] > 2).long(), entropy=torch.tensor([0.5, 1.5]))

    diag = D.Diagnostics(net, names="churn,policy_entropy", every=1, probe_obs=OBS, policy_fn=policy)
    assert diag.after_step() == {"policy_entropy": 1.0}
    with torch.no_grad():
        net.head.weight[0, 0] = 5.0  # out[:, 0] = [5, 15]: state 0's action flips 0 -> 1
    assert diag.after_step() == {"churn": 0.5, "policy_entropy": 1.0}


def test_policy_fn_bad_views_and_options():
    with pytest.raises(ValueError, match=r"actions must be \[2\] integer or \[2, d\] float for 2 probe states, "
                                         r"got \(3,\)"):
        D.Diagnostics(HandNet(), names="churn", probe_obs=OBS,
                      policy_fn=lambda out: D.PolicyView(actions=torch.zeros(3, dtype=torch.long))).compute()
    with pytest.raises(ValueError, match=r"entropy must be None or a \[2\] tensor"):
        D.Diagnostics(HandNet(), names="policy_entropy", probe_obs=OBS,
                      policy_fn=lambda out: D.PolicyView(actions=out, entropy=torch.zeros(2, 2))).compute()
    with pytest.raises(ValueError, match="must return a PolicyView, got Tensor"):
        D.Diagnostics(HandNet(), names="churn", probe_obs=OBS, policy_fn=lambda out: out).compute()
    with pytest.raises(ValueError, match="entropy_temperature=2.0 only sets the default q_value_policy"):
        D.Diagnostics(HandNet(), policy_fn=D.q_value_policy(), entropy_temperature=2.0)


# ---------------------------------------------------------------------------------- loss-based
def _quadratic(eigenvalues, angle=0.3):
    """Loss ``0.5 x^T A x`` with ``A = R diag(eigenvalues) R^T`` (R a rotation): the Hessian is A."""
    n = len(eigenvalues)
    rot, _ = torch.linalg.qr(torch.eye(n, dtype=torch.float64) + angle * torch.arange(n * n, dtype=torch.float64
                                                                                        ).reshape(n, n).sin())
    a = rot @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ rot.T
    x = torch.nn.Parameter(torch.tensor([0.2, -0.1, 0.4][:n], dtype=torch.float64))
    return (lambda: 0.5 * x @ a @ x), [x]


@pytest.mark.parametrize("eigenvalues, top", [
    ((-3.0, 1.0), 1.0),          # dominant -3 (largest magnitude), but the top eigenvalue is 1
    ((3.0, -1.0), 3.0),          # dominant and top agree
    ((-4.0, 1.0), 1.0),
    ((3.0, -1.0, 0.5), 3.0),
    ((-3.0, -1.0), -1.0),        # all negative: the largest algebraic one, not the smallest magnitude
], ids=["-3,1", "3,-1", "-4,1", "3,-1,0.5", "-3,-1"])
def test_hessian_max_eig_is_the_largest_algebraic_eigenvalue(eigenvalues, top):
    closure, params = _quadratic(eigenvalues)
    assert D.hessian_max_eig(closure, params, generator=torch.Generator().manual_seed(1)) == pytest.approx(top, rel=1e-3)


def test_hessian_max_eig_edge_cases():
    closure, params = _quadratic((-3.0, 1.0))
    x = params[0]
    assert D.hessian_max_eig(lambda: (x * 2.0).sum(), [x]) == 0.0  # linear: zero curvature
    assert math.isnan(D.hessian_max_eig(lambda: 0.5 * x @ x * float("nan"), [x]))
    with pytest.raises(ValueError, match="scalar"):
        D.hessian_max_eig(lambda: x * 1.0, [x])
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        D.hessian_max_eig(closure, params, iters=0)


def test_hessian_samples_uses_the_first_rows_of_the_loss_batch():
    # loss_i = (w . x_i)^2 -> H = (2/B) sum x_i x_i^T. All 3 rows: (2/3)[[2, 1], [1, 2]], top 2.
    # The first 2 rows ([1, 0], [0, 1]): H = I, top 1.
    batch = {"obs": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "weight": torch.ones(3)}
    seen = []

    def loss_fn(m, b):
        seen.append(b["obs"].shape[0])
        return m(b["obs"]).squeeze(1) ** 2 * b["weight"]

    diag = D.Diagnostics(linear_scorer(), names="hessian_max_eig", loss_fn=loss_fn, loss_batch=batch,
                         hessian_samples=2, generator=torch.Generator().manual_seed(3))
    assert diag.compute()["hessian_max_eig"] == pytest.approx(1.0, rel=1e-3)
    assert seen == [3, 2]  # the finiteness check reads every row, the Hessian only the first 2
    full = D.Diagnostics(linear_scorer(), names="hessian_max_eig", loss_fn=loss_fn, loss_batch=batch,
                         generator=torch.Generator().manual_seed(3))
    assert full.hessian_samples == 512
    assert full.compute()["hessian_max_eig"] == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(ValueError, match="hessian_samples must be an integer >= 1, got 0"):
        D.Diagnostics(linear_scorer(), names="hessian_max_eig", loss_fn=loss_fn, hessian_samples=0)


def test_gradient_interference_exact():
    net = linear_scorer()
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rows = D.per_sample_gradients(net, lambda m, b: m(b).squeeze(1), batch, max_samples=8)
    torch.testing.assert_close(rows, batch.to(torch.float64))
    # cos: (0, 1/sqrt2, 1/sqrt2)
    assert D.gradient_interference(rows) == pytest.approx(math.sqrt(2) / 3)
    zero_row = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert D.gradient_interference(zero_row) == 0.0
    with pytest.raises(ValueError, match="S >= 2"):
        D.gradient_interference(rows[:1])


def test_plasticity_probe_dead_network_equals_bias_only_fit():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
    before = [p.clone() for p in net.parameters()]
    obs = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    out = D.plasticity_probe(net, obs, steps=30, lr=0.01, out_dim=3, generator=torch.Generator().manual_seed(5))
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)  # the probe trains copies
    # Features are all 0 and ReLU'(0) = 0, so only the head bias (init 0) learns: replay it by hand.
    gen = torch.Generator().manual_seed(5)
    targets = torch.randn(16, 3, generator=gen)
    bias = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([bias], lr=0.01)
    for _ in range(30):
        loss = ((bias.expand(16, 3) - targets) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = float(((bias.detach() - targets) ** 2).mean())
    assert out["plasticity_probe/loss"] == pytest.approx(expected, rel=1e-6)
    assert out["plasticity_probe/fresh_loss"] < out["plasticity_probe/loss"]
    assert out["plasticity_probe/ratio"] == pytest.approx(out["plasticity_probe/loss"] / out["plasticity_probe/fresh_loss"])
    again = D.plasticity_probe(net, obs, steps=30, lr=0.01, out_dim=3, generator=torch.Generator().manual_seed(5))
    assert again == out
    with pytest.raises(ValueError, match="steps >= 1"):
        D.plasticity_probe(net, obs, steps=0)


# ----------------------------------------------------------------------------------- entry point
def test_diagnostics_default_set_on_hand_net():
    net = HandNet()
    out = D.Diagnostics(net, probe_obs=OBS).compute()
    expected = {
        "dormant_ratio/encoder.0": 0.5, "dormant_ratio/encoder.2": 1 / 3, "dormant_ratio/total": 3 / 7,
        "dead_ratio/encoder.0": 0.25, "dead_ratio/encoder.2": 1 / 3, "dead_ratio/total": 2 / 7,
        "active_units/encoder.0": 0.75, "active_units/encoder.2": 2 / 3, "active_units/total": 5 / 7,
        "srank": 2.0, "feature_rank": 2.0,
        "feature_norm": (math.sqrt(5) + 5) / 2, "feature_var": 2 / 3,
        "weight_norm/head": math.sqrt(2), "dist_to_init/total": 0.0,
        "policy_entropy": math.log(1 + math.e) - math.e / (1 + math.e),
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    p = [s / sum(SIG) for s in SIG]
    assert out["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert "churn" not in out and not any(k.startswith("effective_lr") for k in out)
    # grads absent -> all-zero gradient stats
    assert out["grad_l2/total"] == 0.0 and out["grad_zero_frac/total"] == 1.0


def test_diagnostics_thresholds_are_configurable():
    out = D.Diagnostics(HandNet(), names="dormant_ratio,srank,feature_rank", probe_obs=OBS, tau=0.01,
                        srank_delta=0.1, rank_eps=0.3).compute()
    # tau 0.01: only the dead units; srank delta 0.1: 5.465/5.831 = 0.937 >= 0.9; sigma/sqrt2 = 3.86, 0.26
    assert out == {"dormant_ratio/encoder.0": 0.25, "dormant_ratio/encoder.2": 1 / 3, "dormant_ratio/total": 2 / 7,
                   "srank": 1.0, "feature_rank": 1.0}


def test_diagnostics_schedule_effective_lr_and_churn():
    net = HandNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    diag = D.Diagnostics(net, names="effective_lr,churn", every=2, probe_obs=OBS)
    results = []
    for step in range(4):
        opt.zero_grad()
        net.head.weight.grad = torch.zeros(2, 3)
        net.head.bias.grad = torch.tensor([0.0, 0.0])
        if step == 3:  # head.weight[0, 0] 1 -> 1.5: Q = [[1.5, 2], [4.5, 4]] flips sample 1 only
            net.head.weight.grad = torch.tensor([[-1.0, 0, 0], [0, 0, 0]])
        diag.before_step()
        opt.step()
        results.append(diag.after_step())
    assert results[0] == {} and results[2] == {}
    # measurement 1 (step 1): nothing moved; no previous greedy actions yet
    assert results[1]["effective_lr/head"] == 0.0 and "churn" not in results[1]
    # measurement 2 (step 3): one head weight moved by 0.5, ||theta_head|| = sqrt(2)
    assert results[3]["effective_lr/head"] == pytest.approx(0.5 / math.sqrt(2))
    assert results[3]["effective_lr/encoder.0"] == 0.0
    assert results[3]["churn"] == 0.5


def test_diagnostics_loss_based_through_entry_point():
    net = linear_scorer()
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    diag = D.Diagnostics(net, names="grad_interference,grad_norm,hessian_max_eig",
                         loss_fn=lambda m, b: m(b).squeeze(1), loss_batch=batch)
    out = diag.compute()
    assert out["grad_interference"] == pytest.approx(math.sqrt(2) / 3)
    # mean loss gradient = mean of rows = [2/3, 2/3]
    assert out["grad_l1/root"] == pytest.approx(4 / 3)
    assert out["grad_l2/root"] == pytest.approx(math.sqrt(8) / 3)
    assert out["hessian_max_eig"] == 0.0  # a linear loss has a zero Hessian


def test_tanh_saturation_with_inferred_layers():
    out = D.Diagnostics(tanh_net(), names="active_units,dead_ratio", probe_obs=torch.tensor([[1.0], [0.1]])).compute()
    assert out == {"saturated_units/layer0_1": 0.25, "dead_ratio/layer0_1": 0.0, "dead_ratio/total": 0.0}


def test_name_selection_and_bad_inputs():
    assert D.parse_names("srank, dormant_ratio") == ("dormant_ratio", "srank")
    assert D.parse_names("default") == D.DEFAULT_NAMES
    assert D.parse_names(["all"]) == D.ALL_NAMES
    with pytest.raises(ValueError, match=r"unknown diagnostic 'sranks'; valid: default, all, dormant_ratio"):
        D.parse_names("sranks")
    with pytest.raises(ValueError, match="no diagnostics selected"):
        D.parse_names(" , ")
    with pytest.raises(ValueError, match="need loss_fn"):
        D.Diagnostics(HandNet(), names="hessian_max_eig")
    with pytest.raises(ValueError, match="every must be"):
        D.Diagnostics(HandNet(), every=0)
    with pytest.raises(ValueError, match="need probe_obs"):
        D.Diagnostics(HandNet(), names="srank").compute()


def test_hessian_through_entry_point_on_squared_linear_loss():
    # loss_i = (w . x_i)^2 -> H = (2/B) sum x_i x_i^T = (2/3) [[2, 1], [1, 2]], eigenvalues 2 and 2/3
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    diag = D.Diagnostics(linear_scorer(), names="hessian_max_eig", loss_fn=lambda m, b: m(b).squeeze(1) ** 2,
                         loss_batch=batch, generator=torch.Generator().manual_seed(3))
    assert diag.compute()["hessian_max_eig"] == pytest.approx(2.0, rel=1e-3)


# ----------------------------------------------------------------------------------- layer names
def test_one_name_per_layer_across_unit_and_parameter_diagnostics():
    net = MLP(hidden=(8, 6), norm="layer_norm")  # modules encoder.0 (Linear), encoder.1 (LN), encoder.3, encoder.4, head
    assert list(layer_names(net).values()) == ["fc0", "fc0.norm", "fc1", "fc1.norm", "head"]
    obs = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    diag = D.Diagnostics(net, names="dormant_ratio,weight_norm,dist_to_init,grad_norm,effective_lr", every=1,
                         probe_obs=obs, loss_fn=lambda m, b: m(b).pow(2).mean(dim=1), loss_batch=obs)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(obs).pow(2).mean().backward()
    diag.before_step()
    opt.step()
    out = diag.after_step()
    labels = {}
    for key in out:
        name, _, layer = key.partition("/")
        labels.setdefault(name, set()).add(layer)
    assert labels["dormant_ratio"] == {"fc0", "fc1", "total"}
    params = {"fc0", "fc0.norm", "fc1", "fc1.norm", "head", "total"}
    for name in ("weight_norm", "dist_to_init", "effective_lr", "grad_l1", "grad_l2", "grad_zero_frac"):
        assert labels[name] == params, name


def test_learner_network_layer_names():
    # The real network contract (learner.networks): the run report labels both families alike.
    from learner.networks import NetworkConfig, build_network

    net = build_network(NetworkConfig(hidden_sizes=(8, 8), norm="layer_norm", dueling=True, head_hidden_size=4),
                        obs_shape=(3,), num_actions=2, obs_dtype="float32")
    assert list(layer_names(net).values()) == [
        "encoder.fc0", "encoder.fc0.norm", "encoder.fc1", "encoder.fc1.norm",
        "head.value.hidden0", "head.value.hidden0.norm", "head.value.out",
        "head.advantage.hidden0", "head.advantage.hidden0.norm", "head.advantage.out",
    ]
    out = D.Diagnostics(net, names="dormant_ratio,weight_norm", probe_obs=torch.randn(4, 3)).compute()
    assert "weight_norm/encoder.fc0" in out and "dormant_ratio/encoder.fc0" in out
    assert not any("body" in key for key in out)


def test_layer_names_refuses_a_name_given_twice():
    class Clash(HandNet):
        def hidden_layers(self):  # names the first hidden layer like the output module
            return [HiddenLayer("head", self.encoder[0], self.encoder[1], [self.encoder[2]])]

    with pytest.raises(ValueError, match="layer name 'head' is given to both module 'encoder.0' and module 'head'"):
        layer_names(Clash())


def test_parametrized_activation_is_named_after_its_layer():
    net = nn.Sequential(nn.Linear(2, 3), make_activation("rational"), nn.Linear(3, 1))
    assert list(layer_names(net).values()) == ["layer0_1", "layer0_1.act", "2"]


# ------------------------------------------------------------------------------------- bad input
_FORWARD_KEYS = ("dormant_ratio", "dead_ratio", "active_units", "srank", "effective_rank", "feature_rank",
                 "feature_norm", "feature_var", "churn", "policy_entropy")


def _is_forward(key):
    return key.split("/")[0] in _FORWARD_KEYS


def test_nan_probe_gives_nan_forward_metrics_and_one_counted_warning():
    diag = D.Diagnostics(HandNet(), every=1, probe_obs=OBS)
    good = diag.compute()
    assert good["dormant_ratio/total"] == 3 / 7
    bad_obs = OBS.clone()
    bad_obs[1, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/inf in the probe batch") as caught:
        bad = diag.compute(probe_obs=bad_obs)
    assert len(caught) == 1 and diag.nonfinite_inputs == 1
    assert set(bad) == set(good) | {"churn"}  # same keys; churn because a previous measurement exists
    for key, value in bad.items():
        if _is_forward(key):
            assert math.isnan(value), key
        else:  # parameter diagnostics do not read the probe
            assert value == good[key], key
    # the NaN measurement is no churn reference: the next one starts a new window
    again = diag.compute()
    assert again == good and diag.nonfinite_inputs == 1


def test_nonfinite_activations_and_inf_probe_give_nan():
    net = HandNet()
    with torch.no_grad():
        net.encoder[0].weight[1, 1] = float("nan")  # finite probe, NaN activations
    diag = D.Diagnostics(net, names="dormant_ratio,srank,policy_entropy", probe_obs=OBS)
    with pytest.warns(RuntimeWarning, match="activations/outputs on the probe batch"):
        out = diag.compute()
    assert set(out) == {"dormant_ratio/encoder.0", "dormant_ratio/encoder.2", "dormant_ratio/total", "srank",
                        "policy_entropy"}
    assert all(math.isnan(v) for v in out.values())
    inf_obs = OBS.clone()
    inf_obs[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="probe batch"):
        out = D.Diagnostics(HandNet(), names="dormant_ratio,plasticity_probe", probe_obs=inf_obs,
                            probe_steps=2).compute()
    assert all(math.isnan(v) for v in out.values()) and "plasticity_probe/ratio" in out
    with pytest.warns(RuntimeWarning, match="probe batch"):
        out = D.Diagnostics(HandNet(), names="plasticity_probe", probe_obs=inf_obs, probe_steps=2).compute()
    assert set(out) == {"plasticity_probe/loss", "plasticity_probe/fresh_loss", "plasticity_probe/ratio"}
    assert all(math.isnan(v) for v in out.values())


def test_nan_loss_batch_or_losses_give_nan_loss_metrics():
    batch = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [1.0, 1.0]])
    diag = D.Diagnostics(linear_scorer(), names="grad_interference,grad_norm,hessian_max_eig",
                         loss_fn=lambda m, b: m(b).squeeze(1) ** 2, loss_batch=batch)
    with pytest.warns(RuntimeWarning, match="NaN/inf in the loss batch"):
        out = diag.compute()
    assert set(out) == {"grad_interference", "hessian_max_eig", "grad_l1/root", "grad_l2/root", "grad_zero_frac/root",
                        "grad_l1/total", "grad_l2/total", "grad_zero_frac/total"}
    assert all(math.isnan(v) for v in out.values()) and diag.nonfinite_inputs == 1
    # a finite batch whose per-sample losses are NaN (here: NaN targets inside the loss)
    diag.loss_fn = lambda m, b: (m(b).squeeze(1) - float("nan")) ** 2
    with pytest.warns(RuntimeWarning, match="per-sample losses"):
        out = diag.compute(loss_batch=batch.nan_to_num())
    assert all(math.isnan(v) for v in out.values()) and diag.nonfinite_inputs == 2


def test_empty_probe_or_loss_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"probe_obs has 0 rows \(shape \(0, 2\)\)"):
        D.Diagnostics(HandNet(), probe_obs=torch.zeros(0, 2)).compute()
    loss = lambda m, b: m(b["obs"]).squeeze(1)  # noqa: E731
    diag = D.Diagnostics(linear_scorer(), names="hessian_max_eig", loss_fn=loss)
    with pytest.raises(ValueError, match=r"loss_batch\['obs'\] has 0 rows \(shape \(0, 2\)\)"):
        diag.compute(loss_batch={"obs": torch.zeros(0, 2)})
