"""Diagnostics against hand-computed values on hand-built weights and activations."""

from __future__ import annotations

import math

import pytest
import torch
from diag_nets import OBS, HandNet, linear_scorer, tanh_net
from torch import nn

from plasticity import diagnostics as D

SQRT221 = math.sqrt(221.0)
# Singular values of [[1, 2], [3, 4]]: sqrt(15 +- sqrt(221)).
SIG = (math.sqrt(15 + SQRT221), math.sqrt(15 - SQRT221))


# --------------------------------------------------------------------------------- unit scores
def test_unit_scores_linear_exact():
    h = torch.tensor([[1.0, 2.0, 0.0, 0.01], [3.0, 4.0, 0.0, 0.03]])
    scores = D.unit_scores(h, num_units=4)
    mean = (2 + 3 + 0 + 0.02) / 4
    torch.testing.assert_close(scores, torch.tensor([2 / mean, 3 / mean, 0.0, 0.02 / mean], dtype=torch.float64))
    assert D.dormant_counts(h, num_units=4) == 2
    assert D.dormant_counts(h, num_units=4, tau=0.0) == 1
    assert D.dormant_counts(h, num_units=4, tau=0.01) == 1  # 0.02/1.255 = 0.0159 > 0.01


def test_unit_scores_conv_mean_over_space_and_multiplier():
    # [B=1, m*units=4 (m=2, units=2), H=1, W=2]; unit i reads channels i and 2+i.
    h = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]], [[2.0, -2.0]], [[0.0, 0.4]]]])
    scores = D.unit_scores(h, num_units=2, multiplier=2)
    e0, e1 = (1 + 3 + 2 + 2) / 4, 0.4 / 4
    mean = (e0 + e1) / 2
    torch.testing.assert_close(scores, torch.tensor([e0 / mean, e1 / mean], dtype=torch.float64))


def test_unit_scores_all_zero_layer_is_all_dormant_and_bad_shape_raises():
    assert D.unit_scores(torch.zeros(3, 5), num_units=5).tolist() == [0.0] * 5
    assert D.dormant_counts(torch.zeros(3, 5), num_units=5, tau=0.0) == 5
    with pytest.raises(ValueError, match="multiplier 2 x 5 units"):
        D.unit_scores(torch.zeros(3, 5), num_units=5, multiplier=2)
    with pytest.raises(ValueError, match="tau"):
        D.dormant_counts(torch.zeros(3, 5), num_units=5, tau=-0.1)


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


# ---------------------------------------------------------------------------------- loss-based
def test_hessian_max_eig_quadratic():
    # Loss 0.5 x^T A x with A = R diag(3, -1, 0.5) R^T: Hessian A, top eigenvalue 3.
    rot, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [1.5, 0.2, 1.0]], dtype=torch.float64))
    a = rot @ torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)) @ rot.T
    x = torch.nn.Parameter(torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
    eig = D.hessian_max_eig(lambda: 0.5 * x @ a @ x, [x], generator=torch.Generator().manual_seed(1))
    assert eig == pytest.approx(3.0, rel=1e-3)
    b = torch.diag(torch.tensor([-4.0, 1.0], dtype=torch.float64))
    y = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    assert D.hessian_max_eig(lambda: 0.5 * y @ b @ y, [y], generator=torch.Generator().manual_seed(2)) == pytest.approx(
        -4.0, rel=1e-3
    )
    with pytest.raises(ValueError, match="scalar"):
        D.hessian_max_eig(lambda: x * 1.0, [x])


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
