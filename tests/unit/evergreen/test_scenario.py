"""Scenarios: parsing and validation, the env-step schedule, and the task variations on real envs."""

from __future__ import annotations

import numpy as np
import pytest

from actors.envs import EnvConfig, make_vector_env
from actors.tasks import TaskVariation
from evergreen.config import load_config
from evergreen.scenario import Scenario


def _config(**scenario):
    return load_config(preset="cartpole", overrides={"scenario": scenario})


def test_no_tasks_is_one_task_of_the_run_env_without_switches():
    scenario = Scenario.from_config(load_config(preset="cartpole"))
    assert [t.name for t in scenario.tasks] == ["CartPole-v1"] and not scenario.switches
    assert scenario.visit_at(10**9).task == 0


def test_the_schedule_is_a_function_of_env_steps_over_cycles():
    scenario = Scenario.from_config(_config(steps_per_task=100, cycles=2, tasks=[
        {"name": "a"}, {"name": "b", "steps": 50, "variation": {"params": {"length": 1.0}}}, {"name": "c"}]))
    assert scenario.task_names() == ["a", "b", "c"] and scenario.total_steps == 2 * 250
    assert [(v.index, v.task, v.start, v.end) for v in scenario.visits] == [
        (0, 0, 0, 100), (1, 1, 100, 150), (2, 2, 150, 250), (3, 0, 250, 350), (4, 1, 350, 400), (5, 2, 400, 500)]
    assert [scenario.visit_at(s).index for s in (0, 99, 100, 149, 150, 250, 499)] == [0, 0, 1, 1, 2, 3, 5]
    assert scenario.visit_at(10**6).index == 5  # past the end: the last visit goes on
    assert scenario.tasks[1].variation.params == {"length": 1.0} and scenario.tasks[1].env_config.id == "CartPole-v1"


@pytest.mark.parametrize(("scenario", "message"), [
    ({"tasks": [{"name": "a"}]}, r"scenario.tasks\[0\].steps = 0 is invalid: expected an integer >= 1"),
    ({"steps_per_task": 10, "tasks": [{"name": "a"}, {"name": "a"}]}, "task names must differ"),
    ({"steps_per_task": 10, "tasks": [{"nmae": "a"}]}, r"scenario.tasks\[0\]: unknown key\(s\) \['nmae'\]"),
    ({"steps_per_task": 10, "tasks": ["CartPole-v1"]}, r"scenario.tasks\[0\]: cannot read 'CartPole-v1' as dict"),
    ({"steps_per_task": 10, "tasks": [{"env": "Nope-v0"}]}, r"scenario.tasks\[0\]: .*not an id of any env family"),
    ({"steps_per_task": 10, "tasks": [{"variation": {"params": {"length": "long"}}}]},
     "variation.params.length = 'long' is invalid: expected a finite number"),
    ({"steps_per_task": 10, "tasks": [{"variation": {"permute": True}}]}, r"unknown key\(s\) \['permute'\]"),
    ({"steps_per_task": 10, "tasks": [{"variation": {"seed": -2}}]}, "variation.seed = -2 is invalid"),
    ({"steps_per_task": 10, "cycles": 0, "tasks": [{}]}, "scenario.cycles = 0 is invalid"),
    ({"steps_per_task": 10, "replay_at_switch": "per-task", "tasks": [{}]}, "scenario.replay_at_switch = 'per-task'"),
])
def test_bad_scenarios_are_refused_when_the_config_is_validated(scenario, message):
    with pytest.raises(ValueError, match=message):
        _config(**scenario).validate()


def test_tasks_one_network_cannot_serve_are_refused_before_a_run_starts():
    scenario = Scenario.from_config(_config(steps_per_task=10, tasks=[{"name": "cartpole"},
                                                                      {"name": "acrobot", "env": "Acrobot-v1"}]))
    with pytest.raises(ValueError, match=r"tasks\[1\] \('acrobot'\): observations \(6,\).*task 0 \('cartpole'\) has \(4,\)"):
        scenario.check_compatible()
    unknown = Scenario.from_config(_config(steps_per_task=10, tasks=[{}, {"variation": {"params": {"lenght": 2.0}}}]))
    with pytest.raises(ValueError, match=r"tasks\[1\].*no numeric parameter 'lenght'.*'length'"):
        unknown.check_compatible()
    Scenario.from_config(_config(steps_per_task=10, tasks=[{}, {"variation": {"permute_observations": True}}])
                         ).check_compatible()


def test_cartpole_parameters_change_the_dynamics_and_their_derived_quantities():
    long_pole = TaskVariation.from_dict({"params": {"length": 2.0, "masspole": 0.4}})
    env = make_vector_env(EnvConfig(id="CartPole-v1", num_envs=2, seed=0), variation=long_pole, task_name="long")
    plain = make_vector_env(EnvConfig(id="CartPole-v1", num_envs=2, seed=0))
    try:
        base = env._env.envs[1].unwrapped
        assert (base.length, base.masspole, base.total_mass, base.polemass_length) == (2.0, 0.4, 1.4, 0.8)
        assert env.task_id == "long" and plain.task_id == "CartPole-v1"
        np.testing.assert_array_equal(env.reset(), plain.reset())  # same start, different physics
        push = np.ones(2, dtype=np.int64)
        for _ in range(5):
            moved, *_ = env.step(push)
            reference, *_ = plain.step(push)
        assert not np.allclose(moved, reference)
    finally:
        env.close()
        plain.close()


def test_permutations_are_fixed_per_seed_never_the_identity_and_keep_the_spec():
    shuffled = TaskVariation.from_dict({"permute_observations": True, "permute_actions": True}, default_seed=5)
    env = make_vector_env(EnvConfig(id="CartPole-v1", num_envs=1, seed=0), variation=shuffled)
    plain = make_vector_env(EnvConfig(id="CartPole-v1", num_envs=1, seed=0))
    try:
        assert env.spec == plain.spec
        perm = shuffled.observation_permutation((4,))
        assert sorted(perm.tolist()) == [0, 1, 2, 3] and perm.tolist() != [0, 1, 2, 3]
        np.testing.assert_array_equal(shuffled.observation_permutation((4,)), perm)  # fixed for the seed
        np.testing.assert_array_equal(env.reset(), plain.reset()[:, perm])
        assert shuffled.action_permutation(env.spec.actions).tolist() == [1, 0]  # 2 actions: the swap
        left = np.zeros(1, dtype=np.int64)
        obs, *_ = env.step(left)  # the agent's action 0 is the env's action 1
        ref, *_ = plain.step(1 - left)
        np.testing.assert_allclose(obs, ref[:, perm])
    finally:
        env.close()
        plain.close()
    images = TaskVariation(permute_observations=True, seed=1).observation_permutation((4, 84, 84))
    assert images.shape == (84 * 84,)  # pixel positions, the same for every stacked frame


def test_reward_noise_changes_the_learning_signal_only_and_is_seeded():
    noisy = TaskVariation.from_dict({"reward_noise": 2.0}, default_seed=4)
    assert noisy.describe() == "reward noise 2"
    config = EnvConfig(id="CartPole-v1", num_envs=4, seed=0)
    runs = []
    for _ in range(2):
        env = make_vector_env(config, variation=noisy)
        plain = make_vector_env(config)
        try:
            env.reset()
            plain.reset()
            rewards = []
            for _ in range(20):
                actions = np.zeros(4, dtype=np.int64)
                _, reward, _, _, info = env.step(actions)
                _, plain_reward, _, _, _ = plain.step(actions)
                np.testing.assert_array_equal(info["raw_reward"], plain_reward)  # the true reward is kept
                rewards.append(reward - plain_reward)
            noise = np.concatenate(rewards)
            assert 1.0 < noise.std() < 3.0 and abs(noise.mean()) < 1.0
            # Episode returns count the true reward: the statistics and evaluations are not noisy.
            returns, _ = env.pop_episode_stats()
            plain_returns, _ = plain.pop_episode_stats()
            np.testing.assert_array_equal(returns, plain_returns)
            runs.append(noise)
        finally:
            env.close()
            plain.close()
    np.testing.assert_array_equal(runs[0], runs[1])  # the same task and env seed: the same noise
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="reward_noise = .* is invalid: expected a finite number >= 0"):
            TaskVariation.from_dict({"reward_noise": bad})


def test_reward_scale_multiplies_the_learning_signal_only():
    scaled = TaskVariation.from_dict({"reward_scale": 100.0})
    assert scaled.describe() == "reward x100"
    config = EnvConfig(id="CartPole-v1", num_envs=2, seed=0)
    env, plain = make_vector_env(config, variation=scaled), make_vector_env(config)
    try:
        env.reset()
        plain.reset()
        for _ in range(30):
            actions = np.zeros(2, dtype=np.int64)
            _, reward, _, _, info = env.step(actions)
            _, plain_reward, _, _, _ = plain.step(actions)
            np.testing.assert_array_equal(reward, 100.0 * plain_reward)
            np.testing.assert_array_equal(info["raw_reward"], plain_reward)
        np.testing.assert_array_equal(env.pop_episode_stats()[0], plain.pop_episode_stats()[0])   # true returns
    finally:
        env.close()
        plain.close()
    for bad in (0.0, -2.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="reward_scale = .* is invalid: expected a finite number > 0"):
            TaskVariation.from_dict({"reward_scale": bad})


def test_variations_bad_for_an_env_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="friction = 0.0 is invalid: expected > 0"):
        TaskVariation.from_dict({"params": {"friction": 0.0}})
    with pytest.raises(ValueError, match="permute_actions = 1 is invalid: expected true or false"):
        TaskVariation.from_dict({"permute_actions": 1})
    with pytest.raises(ValueError, match="different bounds per dimension"):
        from actors.envs import BoxActions

        TaskVariation(permute_actions=True).action_permutation(BoxActions((2,), (-1.0, 0.0), (1.0, 1.0)))
    with pytest.raises(ValueError, match="screen_width = 1.5 is invalid: CartPole-v1's screen_width is an integer"):
        make_vector_env(EnvConfig(id="CartPole-v1", num_envs=1),
                        variation=TaskVariation.from_dict({"params": {"screen_width": 1.5}}))


def test_atari_modes_and_difficulties_build_the_same_observations_and_refuse_unknown_values():
    config = EnvConfig(id="breakout", num_envs=2, full_action_space=True, seed=0)
    env = make_vector_env(config, variation=TaskVariation.from_dict({"mode": 4, "difficulty": 1}), task_name="b4")
    plain = make_vector_env(config)
    try:
        assert env.spec == plain.spec and env.spec.observation_shape == (4, 84, 84) and env.spec.num_actions == 18
        assert env._env.envs[0].unwrapped._game_mode == 4  # what ale-py passes to setMode at each reset
        assert env._env.envs[0].unwrapped._game_difficulty == 1
        env.reset()
        obs, reward, *_ = env.step(np.zeros(2, dtype=np.int64))
        assert obs.dtype == np.uint8 and obs.shape == (2, 4, 84, 84)
    finally:
        env.close()
        plain.close()
    with pytest.raises(ValueError, match=r"variation.mode = 3 is invalid for breakout: its modes are \[0, 4, 8"):
        make_vector_env(config, variation=TaskVariation(mode=3))
    with pytest.raises(ValueError, match="CartPole-v1 is not an Atari game"):
        make_vector_env(EnvConfig(id="CartPole-v1", num_envs=1), variation=TaskVariation(mode=1))


@pytest.mark.parametrize("preset", ["cartpole-shifts", "sequential-atari", "atari-modes"])
def test_the_scenario_presets_are_served_by_one_network(preset):
    config = load_config(preset=preset, overrides={"env": {"num_envs": 1}}).validate()
    scenario = Scenario.from_config(config)
    assert scenario.switches and len(scenario.tasks) >= 4
    scenario.check_compatible()


def test_a_scenario_can_be_given_on_the_command_line_as_json():
    from evergreen.config import RunConfig
    from evergreen.configtools import apply_flags
    from evergreen.train import build_parser

    args = build_parser().parse_args([
        "--preset", "cartpole", "--scenario.steps_per_task", "500",
        "--scenario.tasks", '[{"name": "a"}, {"name": "b", "variation": {"params": {"gravity": 12.0}}}]'])
    config = apply_flags(load_config(preset="cartpole"), args, RunConfig).validate()
    scenario = Scenario.from_config(config)
    assert scenario.task_names() == ["a", "b"] and scenario.tasks[1].variation.params == {"gravity": 12.0}
    with pytest.raises(ValueError, match="scenario.tasks"):
        apply_flags(load_config(preset="cartpole"),
                    build_parser().parse_args(["--scenario.tasks", "[{broken"]), RunConfig)
