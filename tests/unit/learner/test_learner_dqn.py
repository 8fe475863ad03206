"""learner.dqn: exact losses and gradients on hand-computed batches, targets, clipping, checkpoints, hooks."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from learner.dqn import DQN, DQNConfig
from learner.networks import NetworkConfig, build_network
from plasticity.base import Intervention
from plasticity.interventions import INTERVENTIONS, build_interventions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LINEAR = NetworkConfig(encoder="mlp", hidden_sizes=())  # Q(s) = W s + b: the head's output layer alone

# The hand-computed batch (see test_double_dqn_loss_gradients_and_priorities_by_hand for the arithmetic).
W_ONLINE, B_ONLINE = [[1.0, 2.0], [0.5, -1.0]], [0.0, 0.5]
W_TARGET, B_TARGET = [[0.5, 0.0], [1.0, 2.0]], [0.1, 0.0]
HAND_BATCH = {
    "obs": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32),
    "action": np.array([0, 1, 1]),
    "reward": np.array([1.0, 0.0, -1.0], dtype=np.float32),
    "discount": np.array([0.9, 0.81, 0.0], dtype=np.float32),
    "next_obs": np.array([[0.0, 1.0], [1.0, -1.0], [2.0, 0.0]], dtype=np.float32),
}
HAND_WEIGHTS = np.array([1.0, 0.5, 2.0], dtype=np.float32)


def _set_linear(net: nn.Module, weight, bias) -> None:
    layer = net.head.q.out
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def _linear_dqn(**config) -> DQN:
    dqn = DQN(DQNConfig(**{"max_grad_norm": None, **config}), LINEAR, obs_shape=(2,), num_actions=2, obs_dtype="float32")
    _set_linear(dqn.online, W_ONLINE, B_ONLINE)
    _set_linear(dqn.target, W_TARGET, B_TARGET)
    return dqn


def _params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_double_dqn_loss_gradients_and_priorities_by_hand():
    # Online Q(obs):  s1=[1,0] -> [1.0, 1.0], s2=[0,1] -> [2.0, -0.5], s3=[1,1] -> [3.0, 0.0]
    #   taken (actions 0, 1, 1): q = [1.0, -0.5, 0.0]
    # Online Q(next): n1=[0,1] -> [2.0, -0.5] (argmax 0), n2=[1,-1] -> [-1.0, 2.0] (argmax 1), n3 -> [2.0, 1.5] (0)
    # Target Q(next): n1 -> [0.1, 2.0], n2 -> [0.6, -1.0], n3 -> [1.1, 2.0]
    # Double targets y = r + d * Qt(n, argmax Qo): [1 + 0.9*0.1, 0 + 0.81*(-1.0), -1 + 0] = [1.09, -0.81, -1.0]
    # TD errors y - q = [0.09, -0.31, -1.0]
    # Huber(delta=0.5): [0.5*0.09^2, 0.5*0.31^2, 0.5*(1.0 - 0.25)] = [0.00405, 0.04805, 0.375]
    dqn = _linear_dqn(huber_delta=0.5, lr=1e-3, adam_eps=1e-8)
    result = dqn.update(HAND_BATCH, weights=HAND_WEIGHTS)
    expected_loss = (1.0 * 0.00405 + 0.5 * 0.04805 + 2.0 * 0.375) / 3
    assert result.metrics["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert result.metrics["td_loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert result.metrics["q"] == pytest.approx((1.0 - 0.5 + 0.0) / 3, abs=1e-6)
    assert result.metrics["td_error"] == pytest.approx((0.09 + 0.31 + 1.0) / 3, abs=1e-6)
    assert result.priorities.dtype == np.float32 and result.priorities.shape == (3,)
    np.testing.assert_allclose(result.priorities, [0.09, 0.31, 1.0], rtol=0, atol=1e-6)
    # dL/dq_i = -(w_i / B) * clip(td_i, -delta, delta); q_i reads row a_i of W with input s_i.
    g1, g2, g3 = -(1.0 / 3) * 0.09, -(0.5 / 3) * -0.31, -(2.0 / 3) * -0.5
    grad_w = torch.tensor([[g1, 0.0], [g3, g2 + g3]])
    grad_b = torch.tensor([g1, g2 + g3])
    layer = dqn.online.head.q.out
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad_b, rtol=0, atol=1e-6)
    norm = math.sqrt(g1**2 + g3**2 + (g2 + g3) ** 2 + g1**2 + (g2 + g3) ** 2)
    assert result.metrics["grad_norm"] == pytest.approx(norm, abs=1e-6)
    # Adam's first step moves each parameter by -lr * g / (|g| + eps).
    adam = lambda g: -1e-3 * g / (g.abs() + 1e-8)  # noqa: E731
    torch.testing.assert_close(layer.weight.detach(), torch.tensor(W_ONLINE) + adam(grad_w), rtol=0, atol=1e-7)
    torch.testing.assert_close(layer.bias.detach(), torch.tensor(B_ONLINE) + adam(grad_b), rtol=0, atol=1e-7)
    assert result.metrics["lr"] == 1e-3 and result.metrics["step"] == 1.0 and dqn.step == 1


def test_plain_dqn_target_and_unweighted_loss_by_hand():
    # max_a Qt(next) = [2.0, 0.6, 2.0] -> y = [1 + 0.9*2.0, 0.81*0.6, -1.0] = [2.8, 0.486, -1.0]
    # td = [1.8, 0.986, -1.0]; Huber(0.5) = [0.5*(1.8-0.25), 0.5*(0.986-0.25), 0.5*(1.0-0.25)]
    dqn = _linear_dqn(double=False, huber_delta=0.5)
    result = dqn.update(HAND_BATCH)
    assert result.metrics["td_loss"] == pytest.approx((0.775 + 0.368 + 0.375) / 3, abs=1e-6)
    np.testing.assert_allclose(result.priorities, [1.8, 0.986, 1.0], rtol=0, atol=1e-6)


def test_torch_and_numpy_batches_give_the_same_update():
    a, b = _linear_dqn(huber_delta=0.5), _linear_dqn(huber_delta=0.5)
    ra = a.update(HAND_BATCH, weights=HAND_WEIGHTS)
    rb = b.update({k: torch.from_numpy(v) for k, v in HAND_BATCH.items()}, weights=torch.from_numpy(HAND_WEIGHTS))
    assert ra.metrics == rb.metrics
    np.testing.assert_array_equal(ra.priorities, rb.priorities)


def _qr_dqn(double: bool) -> DQN:
    cfg = NetworkConfig(encoder="mlp", hidden_sizes=(), distributional="qr", num_quantiles=2)
    dqn = DQN(DQNConfig(double=double, max_grad_norm=None), cfg, obs_shape=(1,), num_actions=2, obs_dtype="float32")
    for net, column in ((dqn.online, [0.0, 1.0, 2.0, 3.0]), (dqn.target, [1.0, 2.0, -1.0, 0.5])):
        with torch.no_grad():  # quantiles [B, A, N]: action 0 -> column[0:2], action 1 -> column[2:4]
            net.head.q.out.weight.copy_(torch.tensor(column)[:, None])
            net.head.q.out.bias.zero_()
    return dqn


QR_BATCH = {
    "obs": np.array([[1.0]], dtype=np.float32),
    "action": np.array([0]),
    "reward": np.array([0.5], dtype=np.float32),
    "discount": np.array([0.5], dtype=np.float32),
    "next_obs": np.array([[1.0]], dtype=np.float32),
}


def test_qr_dqn_quantile_huber_loss_by_hand():
    # theta(obs, a=0) = [0, 1], tau_hat = [0.25, 0.75], kappa = 1.
    # Online next quantiles: a0 [0, 1] (mean 0.5), a1 [2, 3] (mean 2.5) -> a* = 1; target a1 = [-1, 0.5]
    # T = 0.5 + 0.5 * [-1, 0.5] = [0.0, 0.75];  u_ij = T_j - theta_i
    # i=0 (tau 0.25): u = [0, 0.75]  -> 0.25*0 and 0.25*0.5*0.75^2 = 0.0703125 -> mean 0.03515625
    # i=1 (tau 0.75): u = [-1, -0.25] -> |0.75-1|*0.5 = 0.125, 0.25*0.5*0.0625 = 0.0078125 -> mean 0.06640625
    result = _qr_dqn(double=True).update(QR_BATCH)
    assert result.metrics["td_loss"] == pytest.approx(0.1015625, abs=1e-7)
    np.testing.assert_allclose(result.priorities, [0.1015625 / 2], rtol=0, atol=1e-7)
    assert result.metrics["q"] == pytest.approx(0.5, abs=1e-7)
    assert result.metrics["td_error"] == pytest.approx(abs(0.375 - 0.5), abs=1e-7)


def test_qr_dqn_without_double_uses_the_target_means():
    # Target means: a0 [1, 2] -> 1.5, a1 [-1, 0.5] -> -0.25 -> a* = 0; T = 0.5 + 0.5 * [1, 2] = [1.0, 1.5]
    # i=0 (tau 0.25): u = [1.0, 1.5] -> 0.25*0.5 = 0.125, 0.25*(1.5-0.5) = 0.25 -> mean 0.1875
    # i=1 (tau 0.75): u = [0.0, 0.5] -> 0, 0.75*0.125 = 0.09375 -> mean 0.046875
    result = _qr_dqn(double=False).update(QR_BATCH)
    assert result.metrics["td_loss"] == pytest.approx(0.234375, abs=1e-7)
    np.testing.assert_allclose(result.priorities, [0.234375 / 2], rtol=0, atol=1e-7)


def test_hard_target_updates_copy_every_period():
    dqn = _linear_dqn(target_period=3)
    initial_target = _params(dqn.target)
    flags = []
    for expected_equal_initial in (True, True, False):
        flags.append(dqn.update(HAND_BATCH).metrics["target_updated"])
        same = all(torch.equal(a, b) for a, b in zip(_params(dqn.target), initial_target, strict=True))
        assert same is expected_equal_initial
    assert flags == [0.0, 0.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(_params(dqn.target), _params(dqn.online), strict=True))
    dqn.update(HAND_BATCH)
    assert not all(torch.equal(a, b) for a, b in zip(_params(dqn.target), _params(dqn.online), strict=True))


def test_polyak_target_update_exact_values():
    dqn = _linear_dqn(target_update="polyak", tau=0.25)
    before = _params(dqn.target)
    assert dqn.update(HAND_BATCH).metrics["target_updated"] == 1.0
    for old, online, new in zip(before, _params(dqn.online), _params(dqn.target), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in dqn.target.parameters())


def test_gradient_clipping_scales_the_gradient_to_max_norm():
    unclipped = _linear_dqn(huber_delta=0.5)
    unclipped.update(HAND_BATCH, weights=HAND_WEIGHTS)
    raw = [p.grad.clone() for p in unclipped.online.parameters()]
    raw_norm = math.sqrt(sum(float((g**2).sum()) for g in raw))
    assert raw_norm > 0.5
    clipped = _linear_dqn(huber_delta=0.5, max_grad_norm=0.1)
    result = clipped.update(HAND_BATCH, weights=HAND_WEIGHTS)
    assert result.metrics["grad_norm"] == pytest.approx(raw_norm, abs=1e-6)  # reported before clipping
    for g, p in zip(raw, clipped.online.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g * (0.1 / (raw_norm + 1e-6)), rtol=0, atol=1e-7)
    loose = _linear_dqn(huber_delta=0.5, max_grad_norm=10.0)  # above the norm: untouched
    loose.update(HAND_BATCH, weights=HAND_WEIGHTS)
    for g, p in zip(raw, loose.online.parameters(), strict=True):
        assert torch.equal(p.grad, g)


class Recorder(Intervention):
    """Records every hook call with the context it saw; draws from ctx.generator; has state."""

    name = "rec"

    def __init__(self, *, target_period_check: bool = False):
        self.events: list = []
        self.draws: list[float] = []
        self.counter = 0
        self.ctx = None
        self.features = None

    def network_overrides(self):
        self.events.append("overrides")
        return {"norm": "layer_norm"}

    def setup(self, ctx):
        self.events.append(("setup", ctx.step))
        self.ctx = ctx

    def loss(self, ctx, *, obs, features):
        self.events.append(("loss", ctx.step))
        self.features = features.detach().clone()
        return 0.5 * features.pow(2).mean()

    def after_step(self, ctx, *, probe_obs=None):
        target_is_online = all(
            torch.equal(a, b) for a, b in zip(ctx.network.parameters(), ctx.target_network.parameters(), strict=True)
        )
        self.events.append(("after_step", ctx.step, None if probe_obs is None else tuple(probe_obs.shape), target_is_online))
        self.draws.append(float(torch.rand((), generator=ctx.generator)))
        self.counter += 1
        return {"rec/counter": float(self.counter)}

    def on_task_switch(self, ctx):
        self.events.append(("task_switch", ctx.task))
        return {"rec/switched": 1.0}

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def _mlp_dqn(*, seed=0, interventions=(), **config) -> DQN:
    return DQN(DQNConfig(**config), NetworkConfig(hidden_sizes=(8, 8)), obs_shape=(3,), num_actions=2,
               obs_dtype="float32", seed=seed, interventions=interventions)


def _random_batch(rng: np.random.Generator, size: int = 6, obs_shape: tuple[int, ...] = (3,)) -> dict[str, np.ndarray]:
    return {
        "obs": rng.standard_normal((size, *obs_shape)).astype(np.float32),
        "action": rng.integers(0, 2, size),
        "reward": rng.standard_normal(size).astype(np.float32),
        "discount": rng.choice([0.0, 0.97], size).astype(np.float32),
        "next_obs": rng.standard_normal((size, *obs_shape)).astype(np.float32),
    }


def test_intervention_hooks_run_in_order_with_the_right_context():
    rec = Recorder()
    dqn = _mlp_dqn(interventions=[rec], target_period=1)
    assert dqn.network_config.norm == "layer_norm"
    assert any(isinstance(m, nn.LayerNorm) for m in dqn.online.modules())
    assert rec.ctx.network is dqn.online and rec.ctx.target_network is dqn.target and rec.ctx.network_name == "q"
    assert rec.ctx.networks == dqn.networks() and dqn.networks()["q"].optimizer is dqn.optimizer
    assert rec.ctx.optimizer is dqn.optimizer
    rng = np.random.default_rng(0)
    first = _random_batch(rng)
    expected_features = dqn.online.features(torch.from_numpy(first["obs"])).detach()
    r1 = dqn.update(first)
    torch.testing.assert_close(rec.features, expected_features, rtol=0, atol=0)
    expected_term = 0.5 * float(expected_features.pow(2).mean())
    assert r1.metrics["rec/loss"] == pytest.approx(expected_term, abs=1e-6)
    assert r1.metrics["loss"] == pytest.approx(r1.metrics["td_loss"] + expected_term, abs=1e-6)
    assert r1.metrics["rec/counter"] == 1.0
    dqn.set_probe(np.zeros((5, 3), dtype=np.float32))
    r2 = dqn.update(_random_batch(rng))
    assert r2.metrics["rec/counter"] == 2.0
    assert dqn.task_switch() == {"rec/switched": 1.0}
    assert dqn.task_switch(task=7) == {"rec/switched": 1.0}
    # after_step sees the stepped counter and runs before the target copy (target not yet synced).
    assert rec.events == [
        "overrides",
        ("setup", 0),
        ("loss", 0),
        ("after_step", 1, None, False),
        ("loss", 1),
        ("after_step", 2, (5, 3), False),
        ("task_switch", 1),
        ("task_switch", 7),
    ]
    assert all(torch.equal(a, b) for a, b in zip(_params(dqn.online), _params(dqn.target), strict=True))


def test_state_dict_round_trip_gives_identical_updates():
    rng = np.random.default_rng(3)
    batches = [_random_batch(rng) for _ in range(6)]
    weights = [rng.uniform(0.1, 1.0, 6).astype(np.float32) for _ in range(6)]
    a = _mlp_dqn(seed=1, interventions=[Recorder()], target_period=2)
    for batch, w in zip(batches[:3], weights[:3], strict=True):
        a.update(batch, weights=w)
    a.task_switch()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    results_a = [a.update(b, weights=w) for b, w in zip(batches[3:], weights[3:], strict=True)]

    b = _mlp_dqn(seed=9, interventions=[Recorder()], target_period=2)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.step == 3 and b.ctx.task == 1 and b.interventions[0].counter == 3
    results_b = [b.update(b_, weights=w) for b_, w in zip(batches[3:], weights[3:], strict=True)]
    for ra, rb in zip(results_a, results_b, strict=True):
        assert ra.metrics == rb.metrics
        np.testing.assert_array_equal(ra.priorities, rb.priorities)
    assert a.interventions[0].draws[3:] == b.interventions[0].draws  # generator state restored
    for pa, pb in zip(_params(a.online) + _params(a.target), _params(b.online) + _params(b.target), strict=True):
        assert torch.equal(pa, pb)


def test_a_bad_state_is_refused_and_the_previous_state_kept():
    dqn = _mlp_dqn()
    before = _params(dqn.online)
    with pytest.raises(ValueError, match=r"DQN state must have keys .* got \['online'\]"):
        dqn.load_state_dict({"online": {}})
    other = _mlp_dqn(seed=5)
    state = copy.deepcopy(other.state_dict())
    state["target"] = {"bogus": torch.zeros(1)}  # online loads, then target fails
    with pytest.raises(ValueError, match=r"(?s)could not load DQN state .*the previous state was kept"):
        dqn.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_params(dqn.online), before, strict=True))
    with pytest.raises(ValueError, match=r"checkpoint interventions \[\] differ from this learner's \[\('q', 'rec'\)\]"):
        _mlp_dqn(interventions=[Recorder()]).load_state_dict(other.state_dict())


def test_construction_is_seeded_and_leaves_the_global_rng_alone():
    rng_state = torch.get_rng_state()
    a, b, c = _mlp_dqn(seed=4), _mlp_dqn(seed=4), _mlp_dqn(seed=5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(x, y) for x, y in zip(_params(a.online), _params(b.online), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(_params(a.online), _params(c.online), strict=True))
    assert all(torch.equal(x, y) for x, y in zip(_params(a.online), _params(a.target), strict=True))


def test_weights_are_a_cpu_copy_loadable_by_actors():
    dqn = _mlp_dqn(interventions=[Recorder()])
    weights = dqn.acting_weights()
    actor_net = build_network(dqn.network_config, obs_shape=(3,), num_actions=2, obs_dtype="float32")
    actor_net.load_state_dict(weights)
    obs = torch.randn(4, 3)
    torch.testing.assert_close(actor_net(obs), dqn.online(obs), rtol=0, atol=0)
    assert all(t.device.type == "cpu" for t in weights.values())
    next(iter(weights.values())).add_(1.0)
    torch.testing.assert_close(actor_net(obs), dqn.online(obs), rtol=0, atol=0)


def test_learning_rate_decays_linearly_by_optimizer_step_and_resumes_on_schedule():
    config = DQNConfig(lr=1e-3, lr_end=1e-4, lr_decay_steps=4)
    assert [config.learning_rate(s) for s in (0, 1, 2, 4, 9)] == pytest.approx([1e-3, 7.75e-4, 5.5e-4, 1e-4, 1e-4])
    assert DQNConfig(lr=1e-3).learning_rate(10**6) == 1e-3
    dqn = _mlp_dqn(lr=1e-3, lr_end=1e-4, lr_decay_steps=4)
    rng = np.random.default_rng(0)
    lrs = [dqn.update(_random_batch(rng)).metrics["lr"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 7.75e-4, 5.5e-4])
    resumed = _mlp_dqn(lr=1e-3, lr_end=1e-4, lr_decay_steps=4)
    resumed.load_state_dict(copy.deepcopy(dqn.state_dict()))
    assert resumed.update(_random_batch(rng)).metrics["lr"] == pytest.approx(3.25e-4)
    with pytest.raises(ValueError, match=r"dqn.lr_decay_steps must be an integer >= 1, got 0"):
        DQNConfig(lr_end=1e-4, lr_decay_steps=0).validate()
    with pytest.raises(ValueError, match=r"dqn.lr_end must be a finite number > 0 \(or null for a constant lr\)"):
        DQNConfig(lr_end=-1.0).validate()


def test_per_sample_loss_is_the_trained_loss_and_refuses_unknown_networks():
    dqn = _linear_dqn(huber_delta=0.5)
    losses = dqn.per_sample_loss(HAND_BATCH)
    assert losses.shape == (3,) and losses.requires_grad
    # The unweighted update's td_loss is the mean of exactly these per-sample losses.
    expected = float(losses.detach().mean())
    assert dqn.update(HAND_BATCH).metrics["td_loss"] == pytest.approx(expected, abs=1e-7)
    with pytest.raises(ValueError, match=r"DQN has one network, 'q'; got network='critic'"):
        dqn.per_sample_loss(HAND_BATCH, network="critic")


def _bad(field, value):
    batch = dict(HAND_BATCH)
    if value is None:
        del batch[field]
    else:
        batch[field] = value
    return batch


@pytest.mark.parametrize(
    "batch, weights, message",
    [
        (_bad("next_obs", None), None, r"batch lacks fields \['next_obs'\]"),
        (_bad("obs", np.zeros((3, 3), np.float32)), None, r"batch\['obs'\] has shape \(3, 3\); expected \(3, 2\)"),
        (_bad("obs", np.zeros((3, 2), np.uint8)), None, r"batch\['obs'\] has dtype torch.uint8; expected float32"),
        (_bad("action", np.array([0.0, 1.0, 1.0])), None, r"batch\['action'\] must hold integers"),
        (_bad("action", np.array([0, 2, 1])), None, r"batch\['action'\] holds values outside \[0, 2\): min 0, max 2"),
        (_bad("action", np.array([0, 1])), None, r"batch\['obs'\] has shape \(3, 2\); expected \(2, 2\)"),
        (_bad("reward", np.zeros(4, np.float32)), None, r"batch\['reward'\] has shape \(4,\); expected \(3,\)"),
        (_bad("discount", np.zeros(3, np.int64)), None, r"batch\['discount'\] must be floating point"),
        (_bad("reward", [1.0, 0.0, 0.0]), None, r"batch\['reward'\] must be a torch.Tensor or numpy array, got list"),
        (HAND_BATCH, np.ones(2, np.float32), r"weights must be a float array of shape \(3,\)"),
        (HAND_BATCH, np.array([1.0, -1.0, 1.0], np.float32), r"weights must be finite and >= 0, got min -1.0"),
        (HAND_BATCH, np.array([1.0, np.nan, 1.0], np.float32), r"weights must be finite and >= 0"),
    ],
)
def test_bad_batches_are_refused_without_changing_state(batch, weights, message):
    dqn = _linear_dqn()
    before = _params(dqn.online)
    with pytest.raises(ValueError, match=message):
        dqn.update(batch, weights=weights)
    assert dqn.step == 0
    assert all(torch.equal(a, b) for a, b in zip(_params(dqn.online), before, strict=True))
    assert not dqn.optimizer.state


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("double", 1, r"dqn.double must be true or false, got 1"),
        ("huber_delta", 0.0, r"dqn.huber_delta must be a finite number > 0, got 0.0"),
        ("lr", -1e-4, r"dqn.lr must be a finite number > 0, got -0.0001"),
        ("lr", float("nan"), r"dqn.lr must be a finite number > 0, got nan"),
        ("adam_eps", 0, r"dqn.adam_eps must be a finite number > 0, got 0"),
        ("max_grad_norm", 0.0, r"dqn.max_grad_norm must be a finite number > 0 \(or null to disable clipping\), got 0.0"),
        ("target_update", "soft", r"dqn.target_update must be 'hard' or 'polyak', got 'soft'"),
        ("target_period", 0, r"dqn.target_period must be an integer >= 1, got 0"),
        ("tau", 1.5, r"dqn.tau must be in \(0, 1\], got 1.5"),
        ("tau", 0.0, r"dqn.tau must be in \(0, 1\], got 0.0"),
        ("qr_kappa", -1.0, r"dqn.qr_kappa must be a finite number > 0, got -1.0"),
    ],
)
def test_bad_config_values_are_refused(field, value, message):
    cfg = dataclasses.replace(DQNConfig(), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        DQN(cfg, LINEAR, obs_shape=(2,), num_actions=2, obs_dtype="float32")


def test_bad_constructor_arguments_are_refused():
    class Unknown(Intervention):
        name = "unknown"

        def network_overrides(self):
            return {"bogus": 1}

    with pytest.raises(ValueError, match=r"interventions override unknown network fields \['bogus'\]"):
        DQN(DQNConfig(), LINEAR, obs_shape=(2,), num_actions=2, obs_dtype="float32", interventions=[Unknown()])
    with pytest.raises(ValueError, match=r"must be plasticity.base.Intervention instances, got 'redo'"):
        DQN(DQNConfig(), LINEAR, obs_shape=(2,), num_actions=2, obs_dtype="float32", interventions=["redo"])
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        DQN(DQNConfig(), LINEAR, obs_shape=(2,), num_actions=2, obs_dtype="float32", seed=-1)
    dqn = _linear_dqn()
    with pytest.raises(ValueError, match=r"probe obs has shape \(4, 3\); expected \(P, 2\)"):
        dqn.set_probe(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"task must be an integer >= 0, got -2"):
        dqn.task_switch(task=-2)


# A deterministic two-state MDP: s0 -a0-> s0 (r 0), s0 -a1-> s1 (r 1), s1 -a0-> s0 (r 0), s1 -a1-> s1 (r 0.5).
# gamma 0.9; optimal: always a1, V(s1) = 0.5 / 0.1 = 5, V(s0) = 1 + 0.9 * 5 = 5.5, Q(., a0) = 0.9 * 5.5 = 4.95.
STATES = np.eye(2, dtype=np.float32)
MDP_BATCH = {
    "obs": STATES[[0, 0, 1, 1]],
    "action": np.array([0, 1, 0, 1]),
    "reward": np.array([0.0, 1.0, 0.0, 0.5], dtype=np.float32),
    "discount": np.full(4, 0.9, dtype=np.float32),
    "next_obs": STATES[[0, 1, 0, 1]],
}
Q_STAR = np.array([[4.95, 5.5], [4.95, 5.0]])


@pytest.mark.parametrize("distributional", ["none", "qr"])
def test_dqn_learns_the_q_values_of_a_two_state_mdp(distributional):
    net = NetworkConfig(hidden_sizes=(32,), distributional=distributional, num_quantiles=8)
    dqn = DQN(DQNConfig(lr=1e-2, target_period=10, max_grad_norm=None), net, obs_shape=(2,), num_actions=2,
              obs_dtype="float32", seed=0)
    def q_values() -> np.ndarray:
        with torch.no_grad():
            out = dqn.online(torch.from_numpy(STATES))
        return (out.mean(dim=2) if dqn.distributional else out).numpy()

    start_error = np.abs(q_values() - Q_STAR).max()
    for _ in range(1000):
        dqn.update(MDP_BATCH)
    error = np.abs(q_values() - Q_STAR).max()
    assert start_error > 4.0
    assert error < 0.01, f"max |Q - Q*| = {error}"
    np.testing.assert_array_equal(q_values().argmax(axis=1), [1, 1])


def _intervention_spec(name: str) -> str:
    # elr_increase acts on normalized layers and leaves choosing the norm to the run config.
    return "layer_norm,elr_increase" if name == "elr_increase" else name


def _intervention_network(name: str) -> tuple[NetworkConfig, tuple[int, ...]]:
    """The network each intervention is tried on: a small MLP, or a small CNN where it needs one."""
    if name == "soft_moe":  # it replaces a conv encoder's dense layer
        return NetworkConfig(encoder="impala", impala_channels=(4,), impala_blocks=1, dueling=True,
                             head_hidden_size=8), (2, 8, 8)
    return NetworkConfig(hidden_sizes=(16, 16), dueling=True, head_hidden_size=8), (3,)


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_every_registered_intervention_runs_and_resumes_identically(name):
    """Contract: each intervention (published defaults) updates, switches task and resumes bit-identically."""
    network, obs_shape = _intervention_network(name)

    def make() -> DQN:
        dqn = DQN(DQNConfig(target_period=2), network, obs_shape=obs_shape, num_actions=2, obs_dtype="float32",
                  seed=0, interventions=build_interventions(_intervention_spec(name), {}))
        dqn.set_probe(np.random.default_rng(1).standard_normal((16, *obs_shape)).astype(np.float32))
        return dqn

    rng = np.random.default_rng(2)
    batches = [_random_batch(rng, 8, obs_shape) for _ in range(6)]
    a = make()
    for batch in batches[:3]:
        a.update(batch)
    a.task_switch()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    results_a = [a.update(batch) for batch in batches[3:]]
    b = make()
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    results_b = [b.update(batch) for batch in batches[3:]]
    for ra, rb in zip(results_a, results_b, strict=True):
        assert ra.metrics == rb.metrics
        np.testing.assert_array_equal(ra.priorities, rb.priorities)
        assert all(np.isfinite(v) for v in ra.metrics.values())
    for pa, pb in zip(_params(a.online) + _params(a.target), _params(b.online) + _params(b.target), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.gpu
@pytest.mark.parametrize("distributional", ["none", "qr"])
def test_cuda_updates_match_cpu_and_resume(distributional):
    net = NetworkConfig(hidden_sizes=(16,), distributional=distributional, num_quantiles=4)
    make = lambda device: DQN(DQNConfig(), net, obs_shape=(3,), num_actions=2,  # noqa: E731
                              obs_dtype="float32", device=device, seed=0, interventions=[Recorder()])
    cpu, gpu = make("cpu"), make("cuda")
    rng = np.random.default_rng(4)
    batches = [_random_batch(rng) for _ in range(4)]
    for batch in batches[:2]:
        r_cpu, r_gpu = cpu.update(batch), gpu.update(batch)
        np.testing.assert_allclose(r_gpu.priorities, r_cpu.priorities, rtol=1e-4, atol=1e-5)
        assert r_gpu.metrics["loss"] == pytest.approx(r_cpu.metrics["loss"], rel=1e-4, abs=1e-5)
    assert all(p.is_cuda for p in gpu.online.parameters()) and gpu.ctx.generator.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in gpu.acting_weights().values())
    buffer = io.BytesIO()
    torch.save(gpu.state_dict(), buffer)
    results = [gpu.update(batch) for batch in batches[2:]]
    resumed = make("cuda")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False))
    for expected, batch in zip(results, batches[2:], strict=True):
        again = resumed.update({k: torch.from_numpy(v).cuda() for k, v in batch.items()})
        np.testing.assert_allclose(again.priorities, expected.priorities, rtol=1e-6, atol=1e-6)
    assert resumed.interventions[0].draws == gpu.interventions[0].draws[2:]


@pytest.mark.gpu
def test_cuda_updates_with_defer_return_the_same_results_without_waiting():
    from learner.core import DeferredResult

    net = NetworkConfig(hidden_sizes=(16,))
    now, later = (DQN(DQNConfig(), net, obs_shape=(3,), num_actions=2, obs_dtype="float32", device="cuda", seed=0)
                  for _ in range(2))
    rng = np.random.default_rng(5)
    batches = [_random_batch(rng) for _ in range(3)]
    pending = [later.update(batch, defer=True) for batch in batches]   # queued back to back
    assert all(isinstance(p, DeferredResult) for p in pending)
    for batch, deferred in zip(batches, pending, strict=True):
        expected, got = now.update(batch), deferred.result()
        assert got.metrics == expected.metrics
        np.testing.assert_array_equal(got.priorities, expected.priorities)


def test_grad_sync_sees_every_gradient_before_clipping_and_all_reduce_reaches_the_context():
    from learner.parallel import SingleProcess

    seen = []

    class Halving(SingleProcess):  # stands in for a group's all-reduce: in place, before clipping
        def grad_sync(self, grads):
            seen.append(len(grads))
            for g in grads:
                g.mul_(0.5)

        def all_reduce_mean(self, tensor):
            return tensor * 1.0

    reference = _linear_dqn(huber_delta=0.5)
    reference.update(HAND_BATCH, weights=HAND_WEIGHTS)
    group = Halving()
    synced = DQN(DQNConfig(max_grad_norm=None, huber_delta=0.5), LINEAR, obs_shape=(2,), num_actions=2,
                 obs_dtype="float32", parallel=group)
    _set_linear(synced.online, W_ONLINE, B_ONLINE)
    _set_linear(synced.target, W_TARGET, B_TARGET)
    result = synced.update(HAND_BATCH, weights=HAND_WEIGHTS)
    assert seen == [2] and synced.ctx.all_reduce_mean == group.all_reduce_mean
    for ref, p in zip(reference.online.parameters(), synced.online.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 0.5 * ref.grad, rtol=0, atol=1e-7)
    ref_norm = math.sqrt(sum(float((p.grad**2).sum()) for p in reference.online.parameters()))
    assert result.metrics["grad_norm"] == pytest.approx(0.5 * ref_norm, abs=1e-6)


@pytest.mark.parametrize("distributional", [False, True])
def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_the_state_float32(distributional):
    net = NetworkConfig(encoder="mlp", hidden_sizes=(32, 32), distributional="qr" if distributional else "none",
                        num_quantiles=8)
    full = DQN(DQNConfig(), net, obs_shape=(3,), num_actions=2, obs_dtype="float32")
    half = DQN(DQNConfig(bf16=True), net, obs_shape=(3,), num_actions=2, obs_dtype="float32")
    seen = []
    layer = next(m for m in half.online.modules() if isinstance(m, nn.Linear))
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = _random_batch(rng)
        a, b = full.update(batch), half.update(batch)
        assert np.isfinite(b.metrics["loss"]) and b.priorities.dtype == np.float32
        assert b.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=0.05, abs=1e-3)
    assert torch.bfloat16 in seen   # the update's forward ran under autocast
    assert all(p.dtype == torch.float32 for p in half.online.parameters())
    assert all(v.dtype == torch.float32 for s in half.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
    # bf16 rounding: close to the float32 run, and not the same
    diffs = [float((p - q).abs().max()) for p, q in zip(full.online.parameters(), half.online.parameters(), strict=True)]
    assert 0 < max(diffs) < 1e-2


def test_bf16_must_be_a_bool():
    with pytest.raises(ValueError, match="dqn.bf16 must be true or false, got 'yes'"):
        DQNConfig(bf16="yes").validate()
