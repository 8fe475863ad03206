"""Vector env wrapper: shapes/dtypes for CartPole and Pong, NEXT_STEP autoreset with the real envs,
raw-reward episode statistics and reward clipping."""

from __future__ import annotations

import numpy as np
import pytest

from actors.envs import (
    ENV_FAMILIES,
    BoxActions,
    DiscreteActions,
    EnvConfig,
    VectorEnv,
    atari_game_name,
    env_family,
    env_spec,
    is_atari_id,
    make_vector_env,
)


def test_cartpole_shapes_dtypes_actions():
    with make_vector_env(EnvConfig(id="CartPole-v1", num_envs=3, seed=1)) as env:
        assert env.num_envs == 3
        assert env.observation_shape == (4,)
        assert env.observation_dtype == np.float32
        assert env.num_actions == 2
        obs = env.reset()
        assert obs.shape == (3, 4) and obs.dtype == np.float32
        obs, reward, terminated, truncated, info = env.step(np.array([0, 1, 0]))
        assert obs.shape == (3, 4) and reward.dtype == np.float32 and reward.shape == (3,)
        assert terminated.dtype == bool and truncated.dtype == bool
        np.testing.assert_array_equal(reward, [1.0, 1.0, 1.0])
        np.testing.assert_array_equal(info["autoreset"], [False, False, False])
    cfg = EnvConfig(id="CartPole-v1")
    assert cfg.repeat_action_probability == 0.0 and cfg.clip_rewards is False


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "pong"])
def test_pong_shapes_dtypes_actions_with_sticky_actions(env_id):
    cfg = EnvConfig(id=env_id, num_envs=2, seed=0, sticky_actions=0.25)
    assert cfg.is_atari and cfg.repeat_action_probability == 0.25 and cfg.clip_rewards is True
    with make_vector_env(cfg) as env:
        assert env.observation_shape == (4, 84, 84)
        assert env.observation_dtype == np.uint8
        assert env.num_actions == 6
        obs = env.reset()
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8 and obs.flags["C_CONTIGUOUS"]
        obs, reward, *_ = env.step(np.array([1, 2]))
        assert obs.shape == (2, 4, 84, 84) and reward.dtype == np.float32
    assert EnvConfig(id="pong").repeat_action_probability == 0.25
    with make_vector_env(EnvConfig(id="pong", num_envs=1, full_action_space=True, frame_stack=2)) as env:
        assert env.num_actions == 18 and env.observation_shape == (2, 84, 84)


def test_atari_ids():
    assert is_atari_id("ALE/Pong-v5") and is_atari_id("pong") and is_atari_id("ms_pacman")
    assert not is_atari_id("CartPole-v1") and not is_atari_id("notagame")
    assert atari_game_name("ALE/MsPacman-v5") == "ms_pacman"
    assert atari_game_name("ALE/Pong-v5") == "pong"
    with pytest.raises(ValueError, match="NoSuchGame"):
        atari_game_name("ALE/NoSuchGame-v5")


def _run_until_end(env, rng, limit):
    for t in range(limit):
        obs, reward, terminated, truncated, info = env.step(rng.integers(0, env.num_actions, env.num_envs))
        if terminated[0] or truncated[0]:
            return t + 1, obs, terminated, truncated
    raise AssertionError(f"episode did not end within {limit} steps")


def test_cartpole_next_step_autoreset_ignores_action():
    # Two identically seeded envs; after the episode ends, the autoreset step gets different actions
    # and must still return the same reset observation with reward 0 and no flags.
    envs = [make_vector_env(EnvConfig(id="CartPole-v1", num_envs=1, seed=5)) for _ in range(2)]
    try:
        steps = []
        for env in envs:
            env.reset()
            steps.append(_run_until_end(env, np.random.default_rng(0), 600))
        assert steps[0][0] == steps[1][0]
        assert steps[0][2][0]  # CartPole ends by termination here (falls long before 500 steps)
        after = [env.step(np.array([a])) for env, a in zip(envs, (0, 1), strict=True)]
        np.testing.assert_array_equal(after[0][0], after[1][0])
        for obs, reward, terminated, truncated, info in after:
            assert reward[0] == 0.0 and not terminated[0] and not truncated[0] and info["autoreset"][0]
            assert np.all(np.abs(obs) <= 0.05)  # CartPole's reset state is uniform in [-0.05, 0.05]
        returns, lengths = envs[0].pop_episode_stats()
        np.testing.assert_array_equal(lengths, [steps[0][0]])
        np.testing.assert_array_equal(returns, [float(steps[0][0])])  # +1 per step, autoreset not counted
        # The step after the autoreset step is an ordinary step again.
        obs, reward, terminated, truncated, info = envs[0].step(np.array([0]))
        assert reward[0] == 1.0 and not info["autoreset"][0]
    finally:
        for env in envs:
            env.close()


def test_pong_termination_then_autoreset():
    with make_vector_env(EnvConfig(id="pong", num_envs=1, seed=3)) as env:
        env.reset()
        length, _, terminated, truncated = _run_until_end(env, np.random.default_rng(0), 5000)
        assert terminated[0] and not truncated[0]
        obs, reward, terminated, truncated, info = env.step(np.array([3]))
        assert reward[0] == 0.0 and not terminated[0] and not truncated[0] and info["autoreset"][0]
        assert info["episode_frame_number"][0] < 100  # a fresh episode
        returns, lengths = env.pop_episode_stats()
        np.testing.assert_array_equal(lengths, [length])
        # A random Pong agent loses 21 points to at most a few: the real score, not a clipped sum.
        assert returns.shape == (1,) and -21.0 <= returns[0] <= -15.0
        assert float(returns[0]).is_integer()


def test_pong_truncation_then_autoreset_ignores_action():
    # 400 emulator frames at frameskip 4: truncated after exactly 100 agent steps.
    cfg = EnvConfig(id="pong", num_envs=1, seed=11, max_episode_frames=400, sticky_actions=0.25)
    envs = [make_vector_env(cfg) for _ in range(2)]
    try:
        ends = []
        for env in envs:
            env.reset()
            ends.append(_run_until_end(env, np.random.default_rng(1), 200))
        for length, _, terminated, truncated in ends:
            assert length == 100 and truncated[0] and not terminated[0]
        after = [env.step(np.array([a])) for env, a in zip(envs, (0, 5), strict=True)]
        np.testing.assert_array_equal(after[0][0], after[1][0])
        for _, reward, terminated, truncated, info in after:
            assert reward[0] == 0.0 and not terminated[0] and not truncated[0] and info["autoreset"][0]
        _, lengths = envs[0].pop_episode_stats()
        np.testing.assert_array_equal(lengths, [100])
    finally:
        for env in envs:
            env.close()


class _ScriptedEnv:
    """A stand-in vector env (gymnasium NEXT_STEP semantics) replaying scripted rewards and flags."""

    def __init__(self, rewards, terminated, truncated):
        import gymnasium as gym

        self.single_observation_space = gym.spaces.Box(0, 1, shape=(2,), dtype=np.float32)
        self._script = list(zip(rewards, terminated, truncated, strict=True))
        self.closed = False

    def reset(self, *, seed=None):
        return np.zeros((2, 2), np.float32), {}

    def step(self, actions):
        r, te, tr = self._script.pop(0)
        return np.zeros((2, 2), np.float32), np.array(r), np.array(te), np.array(tr), {}

    def close(self):
        self.closed = True


def test_reward_clipping_and_raw_episode_returns():
    script = _ScriptedEnv(
        rewards=[[5.0, -3.0], [0.5, 0.0], [0.0, 2.0], [7.0, 1.0]],
        terminated=[[False, False], [True, False], [False, False], [False, True]],
        truncated=[[False, False], [False, False], [False, False], [False, False]],
    )
    cfg = EnvConfig(id="pong", num_envs=2, reward_clipping=True)
    env = VectorEnv(config=cfg, env=script, actions=DiscreteActions(3))
    env.reset()
    _, r, _, _, info = env.step(np.array([0, 0]))
    np.testing.assert_array_equal(r, [1.0, -1.0])
    np.testing.assert_array_equal(info["raw_reward"], [5.0, -3.0])
    _, r, _, _, _ = env.step(np.array([0, 0]))
    np.testing.assert_array_equal(r, [1.0, 0.0])
    _, r, _, _, info = env.step(np.array([0, 0]))  # env 0 autoreset step (its reward 0 is not counted)
    np.testing.assert_array_equal(info["autoreset"], [True, False])
    _, r, _, _, _ = env.step(np.array([0, 0]))
    returns, lengths = env.pop_episode_stats()
    np.testing.assert_array_equal(returns, [5.5, 0.0])  # env 0: 5 + 0.5; env 1: -3 + 0 + 2 + 1
    np.testing.assert_array_equal(lengths, [2, 4])
    assert env.pop_episode_stats()[0].shape == (0,)
    env.close()
    assert script.closed
    unclipped = VectorEnv(
        config=EnvConfig(id="pong", num_envs=2, reward_clipping=False),
        env=_ScriptedEnv([[5.0, -3.0]], [[False, False]], [[False, False]]), actions=DiscreteActions(3),
    )
    unclipped.reset()
    np.testing.assert_array_equal(unclipped.step(np.array([0, 0]))[1], [5.0, -3.0])


def test_bad_actions_are_refused():
    with make_vector_env(EnvConfig(id="CartPole-v1", num_envs=2)) as env:
        env.reset()
        with pytest.raises(ValueError, match="shape"):
            env.step(np.array([0, 0, 0]))
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            env.step(np.array([0, 2]))
        with pytest.raises(ValueError, match="integer"):
            env.step(np.array([0.0, 1.0]))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"id": "Nope-v0"}, "is not an id of any env family"),
        ({"id": ""}, "non-empty"),
        ({"num_envs": 0}, "num_envs"),
        ({"seed": -1}, "seed"),
        ({"sticky_actions": 1.0}, "sticky_actions"),
        ({"frameskip": 0}, "frameskip"),
        ({"frame_stack": 0}, "frame_stack"),
        ({"max_episode_frames": 0}, "max_episode_frames"),
        ({"noop_max": -1}, "noop_max"),
        ({"episodic_life": 1}, "episodic_life"),
        ({"reward_clipping": "yes"}, "reward_clipping"),
    ],
)
def test_bad_configs(changes, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**changes).validate()
    with pytest.raises(ValueError, match=match):
        make_vector_env(EnvConfig(**changes))


def test_lunar_lander_without_box2d_says_so():
    try:
        import Box2D  # noqa: F401

        pytest.skip("Box2D is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="needs a package that is not installed.*[Bb]ox2[Dd]"):
        make_vector_env(EnvConfig(id="LunarLander-v3", num_envs=1))


def test_control_sticky_actions_and_other_tasks():
    with make_vector_env(EnvConfig(id="Acrobot-v1", num_envs=2, sticky_actions=0.5)) as env:
        assert env.num_actions == 3 and env.observation_shape == (6,)
        env.reset()
        env.step(np.array([0, 2]))
    with make_vector_env(EnvConfig(id="MountainCar-v0", num_envs=1)) as env:
        assert env.num_actions == 3 and env.observation_shape == (2,)


def test_env_families_describe_any_registered_id_and_refuse_unknown_ones():
    assert [f.name for f in ENV_FAMILIES] == ["atari", "gymnasium"]
    assert env_family("ALE/Breakout-v5").name == "atari" and env_family("pong").name == "atari"
    assert env_family("Pendulum-v1").name == "gymnasium" and env_family("HalfCheetah-v5").name == "gymnasium"
    with pytest.raises(ValueError, match=r"EnvConfig.id='Nope-v0' is not an id of any env family \(atari: .*; gymnasium: "):
        env_family("Nope-v0")
    cartpole = env_spec(EnvConfig(id="CartPole-v1"))
    assert cartpole.discrete and cartpole.num_actions == 2 and cartpole.observation_shape == (4,)
    pendulum = env_spec(EnvConfig(id="Pendulum-v1"))
    assert pendulum.actions == BoxActions(shape=(1,), low=(-2.0,), high=(2.0,)) and not pendulum.discrete
    with pytest.raises(ValueError, match="has continuous actions"):
        _ = pendulum.num_actions


def test_continuous_actions_are_checked_against_the_box():
    with make_vector_env(EnvConfig(id="Pendulum-v1", num_envs=2, seed=0)) as env:
        env.reset()
        obs, reward, *_ = env.step(np.array([[0.5], [-2.0]], dtype=np.float32))
        assert obs.shape == (2, 3) and reward.dtype == np.float32
        with pytest.raises(ValueError, match=r"actions\[1\] = \[2.5\] is outside the action box \[\[-2.0\], \[2.0\]\]"):
            env.step(np.array([[0.0], [2.5]], dtype=np.float32))
        with pytest.raises(ValueError, match=r"actions must be a float array of shape \(2, 1\)"):
            env.step(np.array([0, 1]))
        with pytest.raises(ValueError, match="outside the action box"):
            env.step(np.array([[np.nan], [0.0]], dtype=np.float32))


def test_mujoco_envs_observe_in_float32_with_their_action_box():
    spec = env_spec(EnvConfig(id="Hopper-v5"))   # mujoco is a dependency: no skip
    assert spec.observation_shape == (11,) and spec.observation_dtype == np.float32
    assert spec.actions == BoxActions(shape=(3,), low=(-1.0,) * 3, high=(1.0,) * 3)
    env = make_vector_env(EnvConfig(id="HalfCheetah-v5", num_envs=2, seed=0))
    try:
        obs = env.reset()
        assert obs.dtype == np.float32 and obs.shape == (2, 17)
        next_obs, reward, *_ = env.step(np.zeros((2, 6), np.float32))
        assert next_obs.dtype == np.float32 and np.all(np.isfinite(next_obs)) and reward.shape == (2,)
    finally:
        env.close()


def test_the_friction_variation_makes_a_slippery_ant():
    """Dohare et al.'s slippery-Ant setting: the sliding friction of every geom, kept across resets, and
    the physics follows it (the same actions from the same state move a slippery Ant differently)."""
    from actors.tasks import TaskVariation

    def rollout(friction):
        variation = TaskVariation.from_dict({"params": {"friction": friction}})
        env = make_vector_env(EnvConfig(id="Ant-v5", num_envs=1, seed=3), variation=variation)
        try:
            model = env._env.envs[0].unwrapped.model
            env.reset()
            assert np.all(model.geom_friction[:, 0] == friction)   # every geom, still after a reset
            actions = np.random.default_rng(0).uniform(-1, 1, (40, 1, 8)).astype(np.float32)
            return np.stack([env.step(a)[0][0] for a in actions])
        finally:
            env.close()

    grippy, slippery = rollout(1.0), rollout(0.02)
    assert not np.allclose(grippy, slippery, atol=1e-3)
    np.testing.assert_array_equal(rollout(0.02), slippery)      # deterministic given the seed
