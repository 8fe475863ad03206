"""learner.sac: exact updates against an independent computation, log-probs, bounds, checkpoints, resets, hooks."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from learner.core import Algorithm, InvalidBatch
from learner.sac import SAC, GaussianActor, SACConfig, TwinHead, TwinQCritic, _derived_seed
from plasticity.base import Intervention, InterventionSet
from plasticity.interventions import INTERVENTIONS, bind_interventions
from plasticity.layers import ActivationRecorder, hidden_layers, layer_names, unit_activity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOW, HIGH = [-2.0, 0.0], [2.0, 1.0]  # asymmetric: scale [2, 0.5], bias [0, 0.5]
SCALE, BIAS = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 0.5])
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def _sac(*, seed: int = 0, interventions: InterventionSet | None = None, obs_dim: int = 3, **config) -> SAC:
    cfg = SACConfig(**{"hidden": (8, 8), **config})
    return SAC(cfg, obs_shape=(obs_dim,), action_low=LOW, action_high=HIGH, seed=seed, interventions=interventions)


def _random_batch(rng: np.random.Generator, size: int = 6, obs_dim: int = 3) -> dict[str, np.ndarray]:
    action = np.stack([rng.uniform(-2.0, 2.0, size), rng.uniform(0.0, 1.0, size)], axis=1).astype(np.float32)
    return {
        "obs": rng.standard_normal((size, obs_dim)).astype(np.float32),
        "action": action,
        "reward": rng.standard_normal(size).astype(np.float32),
        "discount": rng.choice([0.0, 0.5, 0.99], size).astype(np.float32),
        "next_obs": rng.standard_normal((size, obs_dim)).astype(np.float32),
    }


def _params(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _assert_same_state(a, b, path: str = "state") -> None:
    """Recursive exact equality of two state dicts (tensors bit-identical, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _snapshot(sac: SAC) -> dict:
    return copy.deepcopy(sac.state_dict())


# --------------------------------------------------------------------------- the exact update


def _mlp1(x, w0, b0, w1, b1):
    """One hidden ReLU layer: relu(x W0^T + b0) W1^T + b1."""
    return torch.relu(x @ w0.T + b0) @ w1.T + b1


def _ref_policy(a: dict, obs: torch.Tensor, eps: torch.Tensor):
    out = _mlp1(obs, a["encoder.0.weight"], a["encoder.0.bias"], a["head.weight"], a["head.bias"])
    mean, raw = out[:, :2], out[:, 2:]
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1.0)
    std = log_std.exp()
    u = mean + std * eps
    action = torch.tanh(u) * SCALE + BIAS
    log_prob = (Normal(mean, std).log_prob(u) - torch.log(SCALE * (1.0 - torch.tanh(u) ** 2) + 1e-6)).sum(1)
    return action, log_prob


def _ref_q(c: dict, obs: torch.Tensor, action: torch.Tensor):
    x = torch.cat([obs, action], 1)
    q1 = _mlp1(x, c["encoder.q1.0.weight"], c["encoder.q1.0.bias"], c["head.out1.weight"], c["head.out1.bias"])
    q2 = _mlp1(x, c["encoder.q2.0.weight"], c["encoder.q2.0.bias"], c["head.out2.weight"], c["head.out2.bias"])
    return q1[:, 0], q2[:, 0]


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-7, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_three_updates_match_an_independent_computation(max_grad_norm):
    """Target with the entropy term and the min of the twin targets, critic loss and gradients, Adam steps of
    the critic, the actor (through the just-stepped critic) and log_alpha, Polyak target, priorities, metrics."""
    cfg = dict(actor_lr=1e-2, critic_lr=2e-2, alpha_lr=3e-2, tau=0.1, init_alpha=0.5, hidden=(4,),
               max_grad_norm=max_grad_norm)
    sac = _sac(seed=3, **cfg)
    assert {n for n, _ in sac.actor.named_parameters()} == {"encoder.0.weight", "encoder.0.bias", "head.weight",
                                                            "head.bias"}
    assert {n for n, _ in sac.critic.named_parameters()} == {
        f"{m}.{p}" for m in ("encoder.q1.0", "encoder.q2.0", "head.out1", "head.out2") for p in ("weight", "bias")}
    a = {n: p.detach().clone().requires_grad_(True) for n, p in sac.actor.named_parameters()}
    c = {n: p.detach().clone().requires_grad_(True) for n, p in sac.critic.named_parameters()}
    t = {n: p.detach().clone() for n, p in sac.critic_target.named_parameters()}
    for name in c:
        assert torch.equal(c[name], t[name])  # the target starts as a copy
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    adam_a = torch.optim.Adam(a.values(), lr=1e-2, eps=1e-8)
    adam_c = torch.optim.Adam(c.values(), lr=2e-2, eps=1e-8)
    adam_alpha = torch.optim.Adam([log_alpha], lr=3e-2, eps=1e-8)
    target_entropy = -2.0
    rng = np.random.default_rng(11)
    w = np.array([1.0, 0.5, 2.0, 1.5, 0.25], np.float32)
    for update in range(3):
        batch = _random_batch(rng, size=5)
        obs, action, reward, discount, next_obs = (torch.from_numpy(batch[k]) for k in
                                                   ("obs", "action", "reward", "discount", "next_obs"))
        noise = torch.Generator()
        noise.set_state(sac.generator.get_state())
        eps_next, eps_pi = torch.randn((5, 2), generator=noise), torch.randn((5, 2), generator=noise)
        result = sac.update(batch, weights=w)

        # Critic: y = r + d * (min_j Q'_j(s', a') - alpha * logp'), loss mean_i w_i [(Q1 - y)^2 + (Q2 - y)^2].
        alpha = log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_logp = _ref_policy(a, next_obs, eps_next)
            t1, t2 = _ref_q(t, next_obs, next_action)
            y = reward + discount * (torch.minimum(t1, t2) - alpha * next_logp)
        q1, q2 = _ref_q(c, obs, action)
        critic_loss = (torch.from_numpy(w) * ((q1 - y) ** 2 + (q2 - y) ** 2)).mean()
        adam_c.zero_grad()
        critic_loss.backward()
        critic_norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in c.values()])))
        if max_grad_norm is not None:
            assert critic_norm > max_grad_norm  # the clipping really acts
            torch.nn.utils.clip_grad_norm_(list(c.values()), max_grad_norm)
        for name, p in sac.critic.named_parameters():  # the (clipped) critic gradient: the actor step added nothing
            _close(p.grad, c[name].grad, f"update {update}: critic grad {name}")
        adam_c.step()

        # Actor through the stepped critic; temperature with the same sample's logp.
        pi, logp = _ref_policy(a, obs, eps_pi)
        p1, p2 = _ref_q(c, obs, pi)
        actor_loss = (alpha * logp - torch.minimum(p1, p2)).mean()
        grads = torch.autograd.grad(actor_loss, list(a.values()))
        for p, g in zip(a.values(), grads, strict=True):
            p.grad = g
        actor_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(a.values()), max_grad_norm)
        for name, p in sac.actor.named_parameters():
            _close(p.grad, a[name].grad, f"update {update}: actor grad {name}")
        adam_a.step()
        alpha_loss = -(log_alpha * (logp.detach() + target_entropy)).mean()
        adam_alpha.zero_grad()
        alpha_loss.backward()
        adam_alpha.step()
        with torch.no_grad():
            for name in t:
                t[name] = 0.9 * t[name] + 0.1 * c[name]

        for name, p in sac.critic.named_parameters():
            _close(p.detach(), c[name].detach(), f"update {update}: critic {name}")
        for name, p in sac.actor.named_parameters():
            _close(p.detach(), a[name].detach(), f"update {update}: actor {name}")
        for name, p in sac.critic_target.named_parameters():
            _close(p, t[name], f"update {update}: target {name}")
        _close(sac.log_alpha.detach(), log_alpha.detach(), f"update {update}: log_alpha")
        priorities = 0.5 * ((q1 - y).abs() + (q2 - y).abs()).detach()
        assert result.priorities.dtype == np.float32 and result.priorities.shape == (5,)
        _close(torch.from_numpy(result.priorities), priorities, "priorities")
        m = result.metrics
        expected = {
            "critic_loss": float(critic_loss.detach()), "actor_loss": float(actor_loss.detach()),
            "alpha_loss": float(alpha_loss.detach()),
            "alpha": float(log_alpha.detach().exp()), "q": float(q1.detach().mean()), "entropy": float(-next_logp.mean()),
            "td_error": float(priorities.mean()), "grad_norm_critic": critic_norm, "grad_norm_actor": actor_norm,
        }
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert m["step"] == update + 1 and m["actor_updated"] == 1.0 and "sac/reset" not in m
        assert all(isinstance(v, float) for v in m.values())
    assert not any(p.requires_grad for p in sac.critic_target.parameters())


def test_policy_frequency_two_steps_actor_and_alpha_every_second_update_only():
    rng = np.random.default_rng(5)
    batches = [_random_batch(rng) for _ in range(2)]
    every, second = _sac(seed=1), _sac(seed=1, policy_frequency=2)
    actor0, alpha0 = _params(second.actor), second.log_alpha.detach().clone()
    r_every, r_second = every.update(batches[0]), second.update(batches[0])
    assert r_second.metrics["actor_updated"] == 0.0 and r_every.metrics["actor_updated"] == 1.0
    assert _same(_params(second.actor), actor0) and torch.equal(second.log_alpha.detach(), alpha0)
    assert not second.actor_optimizer.state and not second.alpha_optimizer.state
    assert math.isnan(r_second.metrics["actor_loss"]) and math.isnan(r_second.metrics["alpha_loss"])
    # The actor step of `every` left the critic (and its target) exactly as the critic step made them.
    assert not _same(_params(second.critic), _params(_sac(seed=1).critic))
    assert _same(_params(every.critic), _params(second.critic))
    assert _same(_params(every.critic_target), _params(second.critic_target))
    assert r_every.metrics["critic_loss"] == r_second.metrics["critic_loss"]
    r2 = second.update(batches[1])
    assert r2.metrics["actor_updated"] == 1.0 and math.isfinite(r2.metrics["actor_loss"])
    assert not _same(_params(second.actor), actor0)
    assert not torch.equal(second.log_alpha.detach(), alpha0)


def test_fixed_temperature_without_autotune():
    sac = _sac(autotune=False, init_alpha=0.2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        result = sac.update(_random_batch(rng))
    assert sac.alpha == pytest.approx(0.2, rel=1e-6) and result.metrics["alpha_loss"] == 0.0
    assert not sac.alpha_optimizer.state
    assert _sac(target_entropy=-0.5).target_entropy == -0.5 and _sac().target_entropy == -2.0


def test_importance_weights_scale_the_critic_loss():
    rng = np.random.default_rng(8)
    batch = _random_batch(rng)
    plain, weighted = _sac(), _sac()
    unweighted = plain.per_sample_loss(batch).detach()
    w = np.linspace(0.0, 2.0, 6).astype(np.float32)
    result = weighted.update(batch, weights=w)
    assert result.metrics["critic_loss"] == pytest.approx(float((unweighted * torch.from_numpy(w)).mean()), rel=1e-6)


# --------------------------------------------------------------------------- the policy


def test_log_prob_matches_the_tanh_affine_transformed_gaussian():
    actor = GaussianActor(3, (2,), (8,), action_low=LOW, action_high=HIGH)
    mean = torch.tensor([[0.3, -1.2], [0.0, 0.5], [-0.7, 2.0], [1.5, 0.1]])
    log_std = torch.tensor([[-0.5, 0.2], [-2.0, -1.0], [0.3, -0.1], [-4.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    action, log_prob = actor.rsample(mean, log_std, generator)
    transforms = [TanhTransform(cache_size=1), AffineTransform(BIAS, SCALE, cache_size=1)]
    dist = TransformedDistribution(Normal(mean, log_std.exp()), transforms)
    u = mean + log_std.exp() * eps
    expected_action = transforms[1](transforms[0](u))  # through the transforms: their caches invert exactly
    torch.testing.assert_close(action, expected_action, rtol=0, atol=1e-6)
    closed_form = dist.log_prob(expected_action).sum(-1)
    # The +1e-6 inside the Jacobian's log moves it by at most 1e-6 / min(scale * (1 - tanh^2)) per dimension.
    torch.testing.assert_close(log_prob, closed_form, rtol=0, atol=1e-4)
    exact = (Normal(mean, log_std.exp()).log_prob(u) - torch.log(SCALE * (1 - torch.tanh(u) ** 2) + 1e-6)).sum(-1)
    torch.testing.assert_close(log_prob, exact, rtol=0, atol=2e-6)
    # sample(obs) is rsample of distribution_params(obs), and differentiable.
    obs = torch.randn(4, 3)
    a1, lp1 = actor.sample(obs, torch.Generator().manual_seed(4))
    a2, lp2 = actor.rsample(*actor.distribution_params(obs), torch.Generator().manual_seed(4))
    assert torch.equal(a1, a2) and torch.equal(lp1, lp2) and lp1.requires_grad and lp1.shape == (4,)


def test_log_std_is_squashed_into_range_and_forward_is_head_of_features():
    actor = GaussianActor(3, (2,), (8, 8), True, -3.0, 1.0)
    obs = 100.0 * torch.randn(16, 3)
    with torch.no_grad():
        actor.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0, -50.0]))
    mean, log_std = actor.distribution_params(obs)
    assert mean.shape == log_std.shape == (16, 2)
    assert bool((log_std >= -3.0).all() and (log_std <= 1.0).all())
    torch.testing.assert_close(log_std[:, 0], torch.full((16,), 1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(log_std[:, 1], torch.full((16,), -3.0), rtol=0, atol=1e-5)
    assert torch.equal(actor(obs), actor.head(actor.features(obs)))
    critic = TwinQCritic(3, 2, (8, 8), True)
    x = torch.randn(5, 5)
    assert torch.equal(critic(x), critic.head(critic.features(x))) and critic(x).shape == (5, 2)
    assert critic.features(x).shape == (5, 16)
    torch.testing.assert_close(critic.q(x[:, :3], x[:, 3:]), critic(x), rtol=0, atol=0)
    # Each Q-network is independent: Q1 reads only the first half of the features.
    q1_only = critic.head.out1(critic.encoder.q1(x))
    torch.testing.assert_close(critic(x)[:, :1], q1_only, rtol=0, atol=0)


def test_actions_stay_inside_asymmetric_bounds():
    actor = GaussianActor(3, (2,), (8,), action_low=LOW, action_high=HIGH)
    with torch.no_grad():
        actor.head.weight.mul_(50.0)  # saturate the tanh
    obs = 10.0 * torch.randn(512, 3)
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    generator = torch.Generator().manual_seed(1)
    for action in (actor.act(obs, deterministic=True), actor.act(obs, generator=generator),
                   actor.sample(obs, generator)[0].detach()):
        assert action.shape == (512, 2)
        assert bool((action >= low).all() and (action <= high).all())
    # Saturated pre-tanh values of either sign reach both ends, and never beyond.
    mean = torch.linspace(-30.0, 30.0, 101)[:, None].expand(101, 2).contiguous()
    for action in (actor.deterministic_action(mean), actor.rsample(mean, torch.full_like(mean, 2.0), generator)[0]):
        assert bool((action >= low).all() and (action <= high).all())
        torch.testing.assert_close(action[0], low, rtol=0, atol=1e-6)
        torch.testing.assert_close(action[-1], high, rtol=0, atol=1e-6)
    # The deterministic action is tanh(mean) * scale + bias.
    greedy = actor.act(obs, deterministic=True)
    mean, _ = actor.distribution_params(obs)
    torch.testing.assert_close(greedy, torch.tanh(mean.detach()) * SCALE + BIAS, rtol=0, atol=0)
    assert torch.equal(actor.action_scale, SCALE) and torch.equal(actor.action_bias, BIAS)


# --------------------------------------------------------------------------- batches


def _bad(field, value):
    batch = _random_batch(np.random.default_rng(0))
    if value is None:
        del batch[field]
    else:
        batch[field] = value
    return batch


def _with(field, index, value):
    batch = _random_batch(np.random.default_rng(0))
    batch[field] = batch[field].copy()
    batch[field][index] = value
    return batch


GOOD = _random_batch(np.random.default_rng(0))


@pytest.mark.parametrize(
    "batch, weights, message",
    [
        (_bad("next_obs", None), None, r"batch lacks fields \['next_obs'\]"),
        (_bad("obs", np.zeros((6, 4), np.float32)), None, r"batch\['obs'\] has shape \(6, 4\); expected \(6, 3\)"),
        (_bad("action", np.zeros((6, 3), np.float32)), None, r"batch\['action'\] has shape \(6, 3\); expected \(6, 2\)"),
        (_bad("action", np.zeros(6, np.float32)), None, r"batch\['action'\] has shape \(6,\); expected \(6, 2\)"),
        (_bad("action", np.zeros((6, 2), np.int64)), None, r"batch\['action'\] must be floating point"),
        (_bad("obs", np.zeros((6, 3), np.uint8)), None, r"batch\['obs'\] must be floating point"),
        (_bad("reward", np.zeros(5, np.float32)), None, r"batch\['reward'\] has shape \(5,\); expected \(6,\)"),
        (_bad("reward", [0.0] * 6), None, r"batch\['reward'\] must be a torch.Tensor or numpy array, got list"),
        (_with("reward", 2, np.nan), None, r"batch\['reward'\] holds non-finite values"),
        (_with("next_obs", (1, 1), np.inf), None, r"batch\['next_obs'\] holds non-finite values"),
        (_with("obs", (0, 2), np.nan), None, r"batch\['obs'\] holds non-finite values"),
        (_with("discount", 0, 1.5), None, r"batch\['discount'\] must be finite and in \[0, 1\].*max 1.5"),
        (_with("discount", 0, np.nan), None, r"batch\['discount'\] must be finite and in \[0, 1\].*NaN True"),
        (_with("action", (3, 1), 1.01), None,
         r"batch\['action'\] holds values outside the action bounds low \[-2.0, 0.0\], high \[2.0, 1.0\]"),
        (_with("action", (3, 0), -2.001), None, r"batch\['action'\] holds values outside the action bounds"),
        (_with("action", (0, 0), np.nan), None, r"batch\['action'\] holds values outside .*NaN True"),
        (GOOD, np.ones(5, np.float32), r"weights must be a float array of shape \(6,\)"),
        (GOOD, np.array([1, -1, 1, 1, 1, 1], np.float32), r"weights must be finite and >= 0, got min -1.0"),
        (GOOD, np.array([1, np.nan, 1, 1, 1, 1], np.float32), r"weights must be finite and >= 0"),
    ],
)
def test_bad_batches_are_refused_without_changing_state(batch, weights, message):
    sac = _sac()
    sac.update(_random_batch(np.random.default_rng(1)))  # optimizer state exists
    before = _snapshot(sac)
    with pytest.raises(InvalidBatch, match=message):
        sac.update(batch, weights=weights)
    _assert_same_state(sac.state_dict(), before)
    with pytest.raises(InvalidBatch, match=message):
        sac.per_sample_loss(batch) if weights is None else sac.update(batch, weights=weights)
    _assert_same_state(sac.state_dict(), before)


def test_actions_within_the_tolerance_and_float64_and_torch_batches_are_accepted():
    batch = _with("action", (0, 1), 1.0 + 5e-6)
    as64 = {k: v.astype(np.float64) for k, v in batch.items()}
    a, b, c = _sac(), _sac(), _sac()
    ra, rb = a.update(batch), b.update(as64)
    rc = c.update({k: torch.from_numpy(v) for k, v in batch.items()})
    assert ra.metrics == rc.metrics
    np.testing.assert_array_equal(ra.priorities, rc.priorities)
    assert rb.metrics["critic_loss"] == pytest.approx(ra.metrics["critic_loss"], rel=1e-6)


# --------------------------------------------------------------------------- checkpoints


class Recorder(Intervention):
    """Records hook calls and the context they saw; adds a loss term; draws from ctx.generator; has state."""

    name = "rec"

    def __init__(self):
        self.events: list = []
        self.draws: list[float] = []
        self.counter = 0
        self.seen: dict = {}

    def setup(self, ctx):
        self.events.append(("setup", ctx.network_name))
        self.seen["setup"] = (ctx.network, ctx.optimizer, ctx.target_network)

    def loss(self, ctx, *, obs, features):
        self.events.append(("loss", ctx.network_name, ctx.step))
        self.seen["loss"] = (obs.detach().clone(), features.detach().clone())
        return 0.01 * features.pow(2).mean()

    def after_step(self, ctx, *, probe_obs=None):
        self.events.append(("after_step", ctx.network_name, ctx.step))
        self.seen["probe"] = probe_obs
        self.draws.append(float(torch.rand((), generator=ctx.generator)))
        self.counter += 1
        return {"rec/counter": float(self.counter)}

    def on_task_switch(self, ctx):
        self.events.append(("task_switch", ctx.network_name, ctx.task))
        return {"rec/switched": 1.0}

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def _recorders() -> InterventionSet:
    return InterventionSet([("actor", Recorder()), ("critic", Recorder())], networks=SAC.NETWORKS)


def test_state_dict_round_trip_gives_bit_identical_updates():
    rng = np.random.default_rng(3)
    batches = [_random_batch(rng) for _ in range(6)]
    weights = [rng.uniform(0.1, 1.0, 6).astype(np.float32) for _ in range(6)]
    config = dict(policy_frequency=2, layer_norm=True, max_grad_norm=1.0)
    a = _sac(seed=1, interventions=_recorders(), **config)
    for batch, w in zip(batches[:3], weights[:3], strict=True):
        a.update(batch, weights=w)
    a.task_switch()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    results_a = [a.update(b, weights=w) for b, w in zip(batches[3:], weights[3:], strict=True)]

    b = _sac(seed=9, interventions=_recorders(), **config)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.step == 3 and b.ctx.task == 1 and b.interventions[0].counter == 3
    results_b = [b.update(b_, weights=w) for b_, w in zip(batches[3:], weights[3:], strict=True)]
    for ra, rb in zip(results_a, results_b, strict=True):
        assert ra.metrics == rb.metrics  # update 4 is not an actor step: its actor_loss is update 2's, restored
        np.testing.assert_array_equal(ra.priorities, rb.priorities)
    assert a.interventions[1].draws[3:] == b.interventions[1].draws  # ctx.generator restored
    _assert_same_state(a.state_dict(), b.state_dict())


def test_a_bad_state_is_refused_and_the_previous_state_kept():
    sac = _sac()
    sac.update(_random_batch(np.random.default_rng(0)))
    before = _snapshot(sac)
    with pytest.raises(ValueError, match=r"SAC state must have keys .* got \['actor'\]"):
        sac.load_state_dict({"actor": {}})
    other = _sac(seed=5)
    other.update(_random_batch(np.random.default_rng(1)))
    for key, value in (("critic_target", {"bogus": torch.zeros(1)}),       # actor, critic load; then this fails
                       ("log_alpha", torch.zeros(2)),                       # after every network and optimizer
                       ("alpha_optimizer", {"state": {}, "param_groups": []}),
                       ("step", -1)):
        state = copy.deepcopy(other.state_dict())
        state[key] = value
        with pytest.raises(ValueError, match=r"(?s)could not load SAC state .*the previous state was kept"):
            sac.load_state_dict(state)
        _assert_same_state(sac.state_dict(), before)
    state = copy.deepcopy(other.state_dict())
    state["format"] = 99
    with pytest.raises(ValueError, match=r"SAC state format 99 is not supported"):
        sac.load_state_dict(state)
    with pytest.raises(ValueError, match=r"checkpoint interventions \[\] differ from this learner's \[\('actor', 'rec'\)"):
        _sac(interventions=_recorders()).load_state_dict(other.state_dict())
    _assert_same_state(sac.state_dict(), before)
    sac.load_state_dict(copy.deepcopy(other.state_dict()))  # a good state still loads
    _assert_same_state(sac.state_dict(), other.state_dict())


def test_construction_is_seeded_and_leaves_the_global_rng_alone():
    rng_state = torch.get_rng_state()
    a, b, c = _sac(seed=4), _sac(seed=4), _sac(seed=5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert _same(_params(a.actor) + _params(a.critic), _params(b.actor) + _params(b.critic))
    assert not _same(_params(a.actor), _params(c.actor)) and not _same(_params(a.critic), _params(c.critic))
    assert _same(_params(a.critic), _params(a.critic_target))
    batch = _random_batch(np.random.default_rng(0))
    assert a.update(batch).metrics == b.update(batch).metrics
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_acting_weights_are_a_cpu_copy_with_the_bounds_loadable_by_actors():
    sac = _sac()
    sac.update(_random_batch(np.random.default_rng(0)))
    weights = sac.acting_weights()
    assert {"action_scale", "action_bias"} <= set(weights) and all(t.device.type == "cpu" for t in weights.values())
    actor = GaussianActor(3, (2,), (8, 8))  # default bounds [-1, 1]: the weights bring the real ones
    actor.load_state_dict(weights)
    obs = torch.randn(7, 3)
    assert torch.equal(actor.act(obs, deterministic=True), sac.acting_network().act(obs, deterministic=True))
    assert sac.acting_network() is sac.actor
    weights["head.weight"].add_(1.0)
    assert not torch.equal(weights["head.weight"], sac.actor.head.weight)


# --------------------------------------------------------------------------- primacy-bias resets


def test_reset_every_reinitializes_networks_optimizers_and_temperature():
    rng = np.random.default_rng(2)
    sac = _sac(seed=7, reset_every=3, init_alpha=0.3)
    initial = _params(sac.actor) + _params(sac.critic)
    flags = []
    for _ in range(2):
        flags.append(sac.update(_random_batch(rng)).metrics["sac/reset"])
    trained = _params(sac.actor) + _params(sac.critic)
    assert sac.actor_optimizer.state and sac.critic_optimizer.state and sac.alpha_optimizer.state
    result = sac.update(_random_batch(rng))
    flags.append(result.metrics["sac/reset"])
    assert flags == [0.0, 0.0, 1.0]
    # Exactly a fresh initialization from the seed derived for step 3 (not the initial weights again).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(7, 2, 3))
        fresh_actor = GaussianActor(3, (2,), (8, 8), action_low=LOW, action_high=HIGH)
        fresh_critic = TwinQCritic(3, 2, (8, 8))
    assert _same(_params(sac.actor), _params(fresh_actor)) and _same(_params(sac.critic), _params(fresh_critic))
    assert _same(_params(sac.critic_target), _params(fresh_critic))
    assert not _same(_params(sac.actor) + _params(sac.critic), trained)
    assert not _same(_params(sac.actor) + _params(sac.critic), initial)
    assert not sac.actor_optimizer.state and not sac.critic_optimizer.state and not sac.alpha_optimizer.state
    assert sac.actor_optimizer.param_groups[0]["lr"] == 3e-4 and sac.critic_optimizer.param_groups[0]["lr"] == 1e-3
    assert sac.alpha == pytest.approx(0.3, rel=1e-6) and result.metrics["alpha"] == pytest.approx(0.3, rel=1e-6)
    # Training goes on from the fresh state (Adam restarts at step 1).
    sac.update(_random_batch(rng))
    assert all(float(s["step"]) == 1.0 for s in sac.critic_optimizer.state.values())


# --------------------------------------------------------------------------- per-sample losses


def test_per_sample_loss_is_the_trained_loss_and_leaves_training_alone():
    rng = np.random.default_rng(4)
    batch = _random_batch(rng)
    sac, untouched = _sac(), _sac()
    losses = sac.per_sample_loss(batch)
    assert losses.shape == (6,) and losses.requires_grad
    assert torch.equal(losses, sac.per_sample_loss(batch, network="critic"))
    actor_losses = sac.per_sample_loss(batch, network="actor")
    assert actor_losses.shape == (6,) and actor_losses.requires_grad
    grads = torch.autograd.grad(actor_losses.mean(), list(sac.actor.parameters()), allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    result = sac.update(batch)
    assert result.metrics["critic_loss"] == pytest.approx(float(losses.detach().mean()), rel=1e-6)
    assert result.metrics == untouched.update(batch).metrics
    with pytest.raises(ValueError, match=r"SAC's networks are 'actor' and 'critic'; got network='q'"):
        sac.per_sample_loss(batch, network="q")


# --------------------------------------------------------------------------- learning


def test_sac_learns_the_optimal_actions_of_a_continuous_bandit():
    """One-step bandit: reward -(a - target(obs))^2, discount 0; the greedy action approaches target(obs)."""
    mix = np.array([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]], np.float32)
    target = lambda obs: 0.6 * np.tanh(obs @ mix)  # noqa: E731
    sac = SAC(SACConfig(hidden=(32, 32), actor_lr=1e-3, critic_lr=1e-3), obs_shape=(3,), action_low=[-1.0, -1.0],
              action_high=[1.0, 1.0], seed=0)
    rng = np.random.default_rng(0)
    probe = rng.uniform(-1, 1, (256, 3)).astype(np.float32)

    def error() -> np.ndarray:
        return np.abs(sac.actor.act(torch.from_numpy(probe), deterministic=True).numpy() - target(probe))

    start = error()
    for _ in range(1500):
        obs = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
        action = rng.uniform(-1, 1, (64, 2)).astype(np.float32)
        reward = -((action - target(obs)) ** 2).sum(1).astype(np.float32)
        sac.update({"obs": obs, "action": action, "reward": reward, "discount": np.zeros(64, np.float32),
                    "next_obs": obs})
    end = error()
    assert start.mean() > 0.25
    assert end.mean() < 0.06 and end.max() < 0.25, f"mean |a - a*| = {end.mean()}, max {end.max()}"
    assert sac.alpha < 0.5  # the temperature fell toward the entropy target


# --------------------------------------------------------------------------- interventions and the network contract


def test_intervention_hooks_see_each_network_with_its_optimizer_target_and_inputs():
    ivs = _recorders()
    sac = _sac(interventions=ivs)
    rec_actor, rec_critic = ivs[0], ivs[1]
    assert rec_actor.seen["setup"] == (sac.actor, sac.actor_optimizer, None)
    assert rec_critic.seen["setup"] == (sac.critic, sac.critic_optimizer, sac.critic_target)
    assert sac.ctx.networks == sac.networks() and list(sac.networks()) == ["actor", "critic"]
    batch = _random_batch(np.random.default_rng(0))
    obs, action = torch.from_numpy(batch["obs"]), torch.from_numpy(batch["action"])
    x = torch.cat([obs, action], 1)
    expected_critic_features = sac.critic.features(x).detach()
    expected_actor_features = sac.actor.features(obs).detach()
    result = sac.update(batch)
    torch.testing.assert_close(rec_critic.seen["loss"][0], x, rtol=0, atol=0)  # the critic's input
    torch.testing.assert_close(rec_critic.seen["loss"][1], expected_critic_features, rtol=0, atol=0)
    torch.testing.assert_close(rec_actor.seen["loss"][0], obs, rtol=0, atol=0)
    torch.testing.assert_close(rec_actor.seen["loss"][1], expected_actor_features, rtol=0, atol=0)
    assert result.metrics["rec/critic/loss"] == pytest.approx(0.01 * float(expected_critic_features.pow(2).mean()),
                                                             rel=1e-6)
    assert "rec/actor/loss" in result.metrics and result.metrics["rec/critic/counter"] == 1.0
    assert rec_actor.seen["probe"] is None
    probe = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    sac.set_probe(probe)
    sac.update(batch)
    # Each network's own probe: the actor's observations, the critic's observations and mean actions.
    torch.testing.assert_close(rec_actor.seen["probe"], torch.from_numpy(probe), rtol=0, atol=0)
    critic_probe = torch.cat([torch.from_numpy(probe), sac.actor.act(torch.from_numpy(probe), deterministic=True)], 1)
    torch.testing.assert_close(rec_critic.seen["probe"], critic_probe, rtol=0, atol=0)
    assert sac.task_switch() == {"rec/actor/switched": 1.0, "rec/critic/switched": 1.0}
    assert sac.task_switch(task=7) and sac.ctx.task == 7
    assert rec_critic.events == [("setup", "critic"), ("loss", "critic", 0), ("after_step", "critic", 1),
                                 ("loss", "critic", 1), ("after_step", "critic", 2), ("task_switch", "critic", 1),
                                 ("task_switch", "critic", 7)]
    with pytest.raises(ValueError, match=r"probe obs has shape \(4, 2\); expected \(P, 3\)"):
        sac.set_probe(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"task must be an integer >= 0, got -2"):
        sac.task_switch(task=-2)


def test_each_network_gets_its_own_probe():
    sac = _sac()
    probe = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32))
    sac.set_probe(probe)
    probes = sac._probes
    assert set(probes) == {"actor", "critic"} and len(probes) == 2
    torch.testing.assert_close(probes["actor"], probe, rtol=0, atol=0)
    expected = torch.cat([probe, sac.actor.act(probe, deterministic=True)], 1)
    torch.testing.assert_close(probes["critic"], expected, rtol=0, atol=0)
    sac.update(_random_batch(np.random.default_rng(0)))  # the actor moved: the critic's probe follows it
    torch.testing.assert_close(probes["critic"][:, 3:], sac.actor.act(probe, deterministic=True), rtol=0, atol=0)
    assert not torch.equal(probes["critic"], expected)
    sac.set_probe(None)
    assert sac._probes is None


def test_the_network_contract_holds_for_actor_and_critic():
    sac = _sac(layer_norm=True)
    obs = torch.randn(9, 3)
    x = torch.cat([obs, sac.actor.act(obs, deterministic=True)], 1)
    for net, inputs, names in ((sac.actor, obs, ["encoder.fc0", "encoder.fc1"]),
                               (sac.critic, x, ["encoder.q1.fc0", "encoder.q1.fc1", "encoder.q2.fc0",
                                                "encoder.q2.fc1"])):
        layers = hidden_layers(net)
        assert [layer.name for layer in layers] == names
        assert all(isinstance(layer.norm, nn.LayerNorm) and layer.num_units == 8 for layer in layers)
        assert torch.equal(net(inputs), net.head(net.features(inputs)))
        with ActivationRecorder(layers) as recorder:
            net(inputs)
        assert all(unit_activity(layer, recorder.outputs[layer.name]).shape == (8,) for layer in layers)
        names_by_module = layer_names(net)
        assert {names_by_module[layer.producer] for layer in layers} == set(names)
    assert hidden_layers(sac.actor)[0].consumers == [hidden_layers(sac.actor)[1].producer]
    assert hidden_layers(sac.actor)[1].consumers == [sac.actor.head] == sac.actor.output_layers()
    head = sac.critic.head
    assert isinstance(head, TwinHead) and sac.critic.output_layers() == [head.out1, head.out2]
    q1_last, q2_last = hidden_layers(sac.critic)[1], hidden_layers(sac.critic)[3]
    assert q1_last.consumers == [head.out1] and q2_last.consumers == [head.out2]
    assert hidden_layers(sac.critic)[0].consumers == [q1_last.producer]


def test_interventions_override_the_networks_they_are_bound_to():
    ivs = bind_interventions("layer_norm,crelu", {"crelu": {"networks": ["critic"]}}, networks=SAC.NETWORKS)
    sac = _sac(interventions=ivs)
    assert all(isinstance(layer.norm, nn.LayerNorm) for net in (sac.actor, sac.critic) for layer in hidden_layers(net))
    assert [type(layer.activation).__name__ for layer in hidden_layers(sac.critic)] == ["CReLU"] * 4
    assert [type(layer.activation).__name__ for layer in hidden_layers(sac.actor)] == ["ReLU"] * 2
    assert sac.critic.features(torch.randn(2, 5)).shape == (2, 32)  # 2 Q-networks x 8 units x 2 (CReLU)
    sac.update(_random_batch(np.random.default_rng(0)))


def test_shrink_perturb_and_reset_on_the_critic_edit_its_adam_state():
    options = {"shrink_perturb": {"networks": ["critic"], "period": 2, "reset_optimizer": True, "on_task_switch": False},
               "reset": {"networks": ["critic"], "period": 3, "layers": "output", "on_task_switch": False}}
    sac = _sac(interventions=bind_interventions("shrink_perturb,reset", options, networks=SAC.NETWORKS))
    rng = np.random.default_rng(6)
    sac.update(_random_batch(rng))
    before = _params(sac.critic)
    r2 = sac.update(_random_batch(rng))
    assert r2.metrics["shrink_perturb/critic/applied"] == 1.0
    critic_state = sac.critic_optimizer.state
    assert len(critic_state) == len(before)
    for p in sac.critic.parameters():  # moments zeroed, step count kept
        assert float(critic_state[p]["exp_avg"].abs().sum()) == 0.0 and float(critic_state[p]["exp_avg_sq"].abs().sum()) == 0.0
        assert float(critic_state[p]["step"]) == 2.0
    assert all(float(s["exp_avg"].abs().sum()) > 0 for s in sac.actor_optimizer.state.values())  # the actor's untouched
    r3 = sac.update(_random_batch(rng))
    assert r3.metrics["reset/critic/layers_reset"] == 2.0  # Q1's and Q2's output layers
    outputs = sac.critic.output_layers()
    for layer in outputs:
        for p in layer.parameters():
            assert float(critic_state[p]["exp_avg"].abs().sum()) == 0.0 and float(critic_state[p]["step"]) == 0.0
    hidden = hidden_layers(sac.critic)[0].producer.weight
    assert float(critic_state[hidden]["exp_avg"].abs().sum()) > 0 and float(critic_state[hidden]["step"]) == 3.0
    # target=True: the target's output layers got the same fresh values (and the Polyak step keeps them equal).
    for online, target in zip(outputs, sac.critic_target.output_layers(), strict=True):
        assert torch.equal(online.weight, target.weight) and torch.equal(online.bias, target.bias)


def test_redo_runs_on_both_networks_with_their_own_probes():
    ivs = bind_interventions("redo", {"redo": {"period": 2, "tau": 0.5}}, networks=SAC.NETWORKS)
    sac = _sac(interventions=ivs)
    sac.set_probe(np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32))
    rng = np.random.default_rng(0)
    sac.update(_random_batch(rng))
    metrics = sac.update(_random_batch(rng)).metrics
    assert {"redo/actor/units_reset", "redo/critic/units_reset"} <= set(metrics)
    assert metrics["redo/critic/dormant_fraction"] >= 0.0


def _intervention_spec(name: str) -> str:
    # elr_increase acts on normalized layers and leaves choosing the norm to the run config.
    return "layer_norm,elr_increase" if name == "elr_increase" else name


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_every_registered_intervention_runs_on_actor_and_critic_and_resumes_identically(name):
    """Contract: each intervention (published defaults) bound to both networks updates, switches task, resumes."""
    if name == "soft_moe":  # replaces a conv encoder's dense layer: SAC's MLPs have none
        with pytest.raises(ValueError, match=r"interventions override network fields \['moe_expert_hidden'"):
            _sac(interventions=bind_interventions(name, {}, networks=SAC.NETWORKS))
        return

    def make() -> SAC:
        sac = _sac(hidden=(16, 16), interventions=bind_interventions(_intervention_spec(name), {},
                                                                     networks=SAC.NETWORKS))
        sac.set_probe(np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32))
        return sac

    rng = np.random.default_rng(2)
    batches = [_random_batch(rng, 8) for _ in range(6)]
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
    _assert_same_state(a.state_dict(), b.state_dict())


# --------------------------------------------------------------------------- configuration


def test_sac_is_an_algorithm():
    sac = _sac()
    assert isinstance(sac, Algorithm) and sac.device == torch.device("cpu") and sac.step == 0
    assert SACConfig(hidden=[4, 4]).hidden == (4, 4)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("actor_lr", 0.0, r"sac.actor_lr must be a finite number > 0, got 0.0"),
        ("critic_lr", float("nan"), r"sac.critic_lr must be a finite number > 0, got nan"),
        ("alpha_lr", -1.0, r"sac.alpha_lr must be a finite number > 0, got -1.0"),
        ("init_alpha", 0, r"sac.init_alpha must be a finite number > 0, got 0"),
        ("adam_eps", 0.0, r"sac.adam_eps must be a finite number > 0, got 0.0"),
        ("tau", 0.0, r"sac.tau must be in \(0, 1\], got 0.0"),
        ("tau", 1.5, r"sac.tau must be in \(0, 1\], got 1.5"),
        ("autotune", 1, r"sac.autotune must be true or false, got 1"),
        ("layer_norm", "yes", r"sac.layer_norm must be true or false, got 'yes'"),
        ("target_entropy", float("inf"), r"sac.target_entropy must be a finite number \(or null for -action_dim\)"),
        ("policy_frequency", 0, r"sac.policy_frequency must be an integer >= 1, got 0"),
        ("hidden", (), r"sac.hidden must be a non-empty list of integers >= 1, got \(\)"),
        ("hidden", (4, 0), r"sac.hidden must be a non-empty list of integers >= 1, got \(4, 0\)"),
        ("max_grad_norm", 0.0, r"sac.max_grad_norm must be a finite number > 0 \(or null to disable clipping\)"),
        ("log_std_min", 3.0, r"sac.log_std_min must be < sac.log_std_max, got 3.0 >= 2.0"),
        ("log_std_max", float("nan"), r"sac.log_std_max must be a finite number, got nan"),
        ("reset_every", 0, r"sac.reset_every must be an integer >= 1 \(or null for no resets\), got 0"),
        ("reset_every", True, r"sac.reset_every must be an integer >= 1"),
    ],
)
def test_bad_config_values_are_refused(field, value, message):
    cfg = dataclasses.replace(SACConfig(), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        SAC(cfg, obs_shape=(3,), action_low=LOW, action_high=HIGH)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"obs_shape": (2, 3)}, r"obs_shape must be \(obs_dim,\) with obs_dim >= 1 .* got \(2, 3\)"),
        ({"obs_shape": (0,)}, r"obs_shape must be \(obs_dim,\)"),
        ({"action_low": [3.0, 0.0]}, r"action_low must be < action_high in every dimension, got low \[3.0, 0.0\]"),
        ({"action_low": [-1.0]}, r"action_low and action_high must be non-empty lists of the same length"),
        ({"action_high": [np.inf, 1.0]}, r"action bounds must be finite"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"interventions": ["redo"]}, r"interventions must be a plasticity.base.InterventionSet"),
        ({"interventions": InterventionSet([("q", Recorder())])}, r"interventions target networks \['q'\]; SAC has"),
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs, message):
    args = {"obs_shape": (3,), "action_low": LOW, "action_high": HIGH, **kwargs}
    with pytest.raises(ValueError, match=message):
        SAC(SACConfig(hidden=(4,)), **args)


def test_reset_every_with_plasticity_injection_is_refused():
    ivs = bind_interventions("plasticity_injection", {}, networks=SAC.NETWORKS)
    with pytest.raises(ValueError, match=r"sac.reset_every .* cannot be combined with plasticity_injection"):
        _sac(reset_every=10, interventions=ivs)


@pytest.mark.gpu
def test_cuda_updates_validate_on_the_device_and_resume_identically():
    make = lambda: SAC(SACConfig(hidden=(16, 16)), obs_shape=(3,), action_low=LOW, action_high=HIGH,  # noqa: E731
                       device="cuda", seed=0, interventions=_recorders())
    gpu = make()
    rng = np.random.default_rng(4)
    batches = [{k: torch.from_numpy(v).cuda() for k, v in _random_batch(rng).items()} for _ in range(4)]
    for batch in batches[:2]:
        result = gpu.update(batch)
        assert all(np.isfinite(v) for v in result.metrics.values()) and result.priorities.shape == (6,)
    assert all(p.is_cuda for p in gpu.actor.parameters()) and gpu.generator.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in gpu.acting_weights().values())
    bad = dict(batches[0], action=batches[0]["action"] + 5.0)
    before = _snapshot(gpu)
    with pytest.raises(InvalidBatch, match=r"batch\['action'\] holds values outside the action bounds"):
        gpu.update(bad)
    _assert_same_state(gpu.state_dict(), before)
    buffer = io.BytesIO()
    torch.save(gpu.state_dict(), buffer)
    results = [gpu.update(batch) for batch in batches[2:]]
    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False))
    for expected, batch in zip(results, batches[2:], strict=True):
        again = resumed.update(batch)
        assert again.metrics == expected.metrics
        np.testing.assert_array_equal(again.priorities, expected.priorities)


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_the_state_float32():
    full, half = _sac(hidden=(32, 32)), _sac(hidden=(32, 32), bf16=True)
    seen = []
    for net in (half.actor, half.critic):
        layer = next(m for m in net.modules() if isinstance(m, nn.Linear))
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = _random_batch(rng)
        a, b = full.update(batch), half.update(batch)
        assert np.isfinite(b.metrics["critic_loss"]) and np.isfinite(b.metrics["q"])
        assert b.metrics["critic_loss"] == pytest.approx(a.metrics["critic_loss"], rel=0.05, abs=1e-2)
        assert b.priorities.dtype == np.float32
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in [*half.actor.parameters(), *half.critic.parameters()])
    diffs = [float((p - q).abs().max()) for p, q in zip(full.critic.parameters(), half.critic.parameters(), strict=True)]
    assert 0 < max(diffs) < 1e-2
    with pytest.raises(ValueError, match="bf16"):
        SACConfig(bf16=1).validate()
