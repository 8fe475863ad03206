"""Epsilon schedules, Ape-X epsilons and batched epsilon-greedy."""

from __future__ import annotations

import numpy as np
import pytest

from actors.policy import ConstantEpsilon, LinearEpsilon, apex_epsilon, apex_epsilons, epsilon_greedy


def test_linear_epsilon_values():
    s = LinearEpsilon(start=1.0, end=0.1, steps=100)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.55, abs=1e-12)
    assert s(100) == pytest.approx(0.1, abs=1e-12)
    assert s(10_000) == pytest.approx(0.1, abs=1e-12)
    rising = LinearEpsilon(start=0.0, end=0.5, steps=4)
    assert [rising(i) for i in range(6)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]


def test_constant_epsilon():
    s = ConstantEpsilon(0.3)
    assert s(0) == 0.3 and s(123_456) == 0.3


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: LinearEpsilon(start=1.5, end=0.1, steps=10), "start"),
        (lambda: LinearEpsilon(start=1.0, end=-0.1, steps=10), "end"),
        (lambda: LinearEpsilon(start=1.0, end=0.1, steps=0), "steps"),
        (lambda: ConstantEpsilon(2.0), "value"),
        (lambda: LinearEpsilon()(-1), "step"),
    ],
)
def test_bad_schedules(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_apex_epsilons_exact():
    assert apex_epsilon(index=0, num_actors=1) == 0.4
    # N=8: eps_i = 0.4 ** (1 + 7 i / 7) = 0.4 ** (1 + i)
    expected = [0.4 ** (1 + i) for i in range(8)]
    np.testing.assert_allclose(apex_epsilons(num_actors=8), expected, rtol=1e-12)
    assert apex_epsilon(index=7, num_actors=8) == pytest.approx(0.00065536, rel=1e-12)
    # N=3: exponents 1, 4.5, 8
    np.testing.assert_allclose(apex_epsilons(num_actors=3), [0.4, 0.4**4.5, 0.4**8], rtol=1e-12)
    assert apex_epsilon(index=1, num_actors=2, base=0.5, alpha=1.0) == 0.25


def test_apex_bad_arguments():
    with pytest.raises(ValueError, match="index"):
        apex_epsilon(index=3, num_actors=3)
    with pytest.raises(ValueError, match="num_actors"):
        apex_epsilon(index=0, num_actors=0)
    with pytest.raises(ValueError, match="alpha"):
        apex_epsilon(index=0, num_actors=2, alpha=-1.0)


def test_epsilon_greedy_greedy_random_and_seeded():
    q = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, 0.0], [-1.0, -2.0, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(epsilon_greedy(q, epsilon=0.0, rng=np.random.default_rng(0)), [1, 0, 2])
    a = epsilon_greedy(q, epsilon=1.0, rng=np.random.default_rng(7))
    b = epsilon_greedy(q, epsilon=1.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    ref = np.random.default_rng(7)
    ref.random(3)
    np.testing.assert_array_equal(a, ref.integers(0, 3, size=3, dtype=np.int64))
    assert a.dtype == np.int64
    # Per-row epsilon: only row 1 explores.
    rng = np.random.default_rng(3)
    out = epsilon_greedy(q, epsilon=np.array([0.0, 1.0, 0.0]), rng=rng)
    ref = np.random.default_rng(3)
    ref.random(3)
    assert out[0] == 1 and out[2] == 2
    assert out[1] == ref.integers(0, 3, size=3, dtype=np.int64)[1]


def test_epsilon_greedy_explores_at_the_given_rate():
    q = np.tile(np.array([[0.0, 1.0, 0.0, 0.0]]), (20_000, 1))
    actions = epsilon_greedy(q, epsilon=0.2, rng=np.random.default_rng(1))
    # Non-greedy picks happen with probability 0.2 * 3/4 = 0.15; 20k draws: std ~0.0025.
    assert abs(np.mean(actions != 1) - 0.15) < 0.015


def test_epsilon_greedy_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="q_values"):
        epsilon_greedy(np.zeros(3), epsilon=0.1, rng=rng)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_greedy(np.zeros((2, 3)), epsilon=1.5, rng=rng)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_greedy(np.zeros((2, 3)), epsilon=np.array([0.1, 0.2, 0.3]), rng=rng)
    with pytest.raises(ValueError, match="rng"):
        epsilon_greedy(np.zeros((2, 3)), epsilon=0.1, rng=np.random.RandomState(0))


def test_gaussian_policy_warms_up_uniformly_then_samples_the_actor_inside_the_box():
    import torch

    from actors.policy import GaussianPolicy
    from learner.sac import GaussianActor

    low, high = [-2.0, 0.0], [2.0, 1.0]
    torch.manual_seed(0)
    actor = GaussianActor(3, (2,), (16,), action_low=low, action_high=high)
    obs = np.random.default_rng(0).standard_normal((4000, 3)).astype(np.float32)
    policy = GaussianPolicy(network=actor, low=low, high=high, random_steps=100, seed=[0, 1])
    warm = policy.act(obs, env_steps=99).actions
    assert warm.dtype == np.float32 and warm.shape == (4000, 2)
    # Uniform over the box: the mean of each dimension is its centre, the spread that of a uniform.
    np.testing.assert_allclose(warm.mean(0), [0.0, 0.5], atol=0.05)
    np.testing.assert_allclose(warm.std(0), [4 / 12 ** 0.5, 1 / 12 ** 0.5], rtol=0.05)
    assert policy.describe(env_steps=99) == {"random_actions": 1.0}
    sampled = policy.act(obs, env_steps=100).actions
    assert policy.describe(env_steps=100) == {"random_actions": 0.0}
    assert np.all(sampled >= low) and np.all(sampled <= high)
    with torch.no_grad():
        mean = actor.act(torch.from_numpy(obs), deterministic=True).numpy()
    assert not np.allclose(sampled, mean)                      # a sample, not the mean
    # Seeded: the same seed repeats the same actions; evaluation takes the mean, warm-up or not.
    again = GaussianPolicy(network=actor, low=low, high=high, random_steps=100, seed=[0, 1])
    np.testing.assert_array_equal(again.act(obs, env_steps=99).actions, warm)
    evaluation = GaussianPolicy(network=actor, low=low, high=high, random_steps=100, deterministic=True)
    np.testing.assert_allclose(evaluation.act(obs, env_steps=0).actions, mean, atol=1e-6)
    with pytest.raises(ValueError, match="action bounds"):
        GaussianPolicy(network=actor, low=[1.0, 0.0], high=[0.0, 1.0])
    with pytest.raises(ValueError, match="act\\(obs, deterministic, generator\\)"):
        GaussianPolicy(network=torch.nn.Linear(3, 2), low=low, high=high)
