"""SAC's observation normalization: running statistics inside the networks, updated by the learner only,
shared by actor, critic and target, kept across resets and checkpoints, and sent to the actors."""

from __future__ import annotations

import numpy as np
import torch

from learner.sac import SAC, GaussianActor, ObservationNormalizer, SACConfig


def test_the_running_statistics_are_those_of_every_row_seen():
    rng = np.random.default_rng(0)
    norm = ObservationNormalizer(3)
    x = torch.from_numpy(np.zeros((2, 3), np.float32))
    assert torch.equal(norm(x), x)                          # identity before any data (mean 0, var 1)
    batches = [rng.normal([100.0, -5.0, 0.0], [10.0, 0.1, 1.0], (n, 3)) for n in (7, 64, 1)]
    for batch in batches:
        norm.update(torch.from_numpy(batch.astype(np.float32)))
    rows = np.concatenate(batches).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), rows.mean(0), rtol=1e-9)
    np.testing.assert_allclose(norm.var.numpy(), rows.var(0), rtol=1e-7)
    assert float(norm.count) == 72
    z = norm(torch.from_numpy(rows.astype(np.float32))).numpy()
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)
    far = norm(torch.tensor([[1e6, 0.0, 0.0]]))
    assert far[0, 0] == 10.0                                # clipped


def _batch(rng, n=64, scale=1000.0, offset=500.0):
    obs = (rng.uniform(-1, 1, (n, 3)) * scale + offset).astype(np.float32)
    action = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    return obs, action


def test_statistics_are_shared_kept_across_resets_checkpointed_and_reach_the_actors():
    rng = np.random.default_rng(1)
    config = SACConfig(hidden=(16,), normalize_observations=True, reset_every=3)
    sac = SAC(config, obs_shape=(3,), action_low=[-1.0, -1.0], action_high=[1.0, 1.0], seed=0)
    for _ in range(5):   # a reset at update 3
        obs, action = _batch(rng)
        sac.update({"obs": obs, "action": action, "reward": np.zeros(64, np.float32),
                    "discount": np.full(64, 0.99, np.float32), "next_obs": obs})
    stats = sac.actor.normalizer
    assert float(stats.count) == 5 * 64 and abs(float(stats.mean.mean()) - 500.0) < 50
    for net in (sac.critic, sac.critic_target):
        for name in ("mean", "var", "count"):
            assert torch.equal(getattr(net.normalizer, name), getattr(stats, name))
    # The actors get them with the weights: a freshly built actor acts exactly as the learner's.
    fresh = GaussianActor(3, (2,), (16,), action_low=[-1.0, -1.0], action_high=[1.0, 1.0], normalize_observations=True)
    fresh.load_state_dict(sac.acting_weights())
    probe = torch.from_numpy(_batch(rng, 8)[0])
    assert torch.equal(fresh.act(probe, deterministic=True), sac.actor.act(probe, deterministic=True))
    # A checkpoint carries them.
    other = SAC(config, obs_shape=(3,), action_low=[-1.0, -1.0], action_high=[1.0, 1.0], seed=7)
    other.load_state_dict(sac.state_dict())
    assert torch.equal(other.actor.normalizer.mean, stats.mean) and torch.equal(other.critic.normalizer.var, stats.var)
    # per_sample_loss reads them but never changes them.
    obs, action = _batch(rng)
    sac.per_sample_loss({"obs": obs, "action": action, "reward": np.zeros(64, np.float32),
                         "discount": np.zeros(64, np.float32), "next_obs": obs})
    assert float(stats.count) == 5 * 64


def test_with_normalization_sac_learns_a_bandit_whose_observations_are_a_thousand_times_too_large():
    mix = np.array([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]], np.float32)
    target = lambda obs: 0.6 * np.tanh(((obs - 500.0) / 1000.0) @ mix)  # noqa: E731
    sac = SAC(SACConfig(hidden=(32, 32), actor_lr=1e-3, critic_lr=1e-3, normalize_observations=True),
              obs_shape=(3,), action_low=[-1.0, -1.0], action_high=[1.0, 1.0], seed=0)
    rng = np.random.default_rng(0)
    probe = _batch(rng, 256)[0]

    def error() -> float:
        return float(np.abs(sac.actor.act(torch.from_numpy(probe), deterministic=True).numpy() - target(probe)).mean())

    for _ in range(1500):
        obs, action = _batch(rng)
        reward = -((action - target(obs)) ** 2).sum(1).astype(np.float32)
        sac.update({"obs": obs, "action": action, "reward": reward, "discount": np.zeros(64, np.float32),
                    "next_obs": obs})
    assert error() < 0.08, error()
