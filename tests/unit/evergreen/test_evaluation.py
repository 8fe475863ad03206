"""The evaluation protocol on real envs and a real checkpoint; human-normalized scores; `evergreen eval`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.envs import EnvConfig, env_spec
from actors.policy import PolicyStep
from actors.tasks import EnvTask
from evergreen.agents import make_builder
from evergreen.config import load_config, save_config
from evergreen.evaluation import (
    ATARI_REFERENCE_SCORES,
    evaluate_policy,
    evaluate_run,
    evaluation_env_config,
    human_normalized,
    main,
)
from learner.checkpoint import save_checkpoint


class _Always:
    """A Policy that always takes one action."""

    def __init__(self, action):
        self.action = action

    def act(self, obs, *, env_steps):
        return PolicyStep(actions=np.full(obs.shape[0], self.action, dtype=np.int64), extras={})


def test_human_normalized_scores_use_the_reference_table():
    assert ATARI_REFERENCE_SCORES["pong"] == (-20.7, 14.6)
    assert human_normalized("ALE/Pong-v5", 14.6) == pytest.approx(1.0)
    assert human_normalized("pong", -20.7) == pytest.approx(0.0)
    assert human_normalized("breakout", 30.5 / 2 + 1.7 / 2) == pytest.approx(0.5)
    assert human_normalized("CartPole-v1", 500.0) is None


def test_the_protocol_settings_apply_to_atari_only():
    atari = evaluation_env_config(EnvConfig(id="pong", sticky_actions=0.0, episodic_life=True,
                                            max_episode_frames=1000), episodes=5, seed=7)
    assert (atari.num_envs, atari.seed, atari.repeat_action_probability, atari.episodic_life,
            atari.max_episode_frames) == (5, 7, 0.25, False, 108_000)
    control = evaluation_env_config(EnvConfig(id="CartPole-v1"), episodes=3, seed=1)
    assert control.num_envs == 3 and control.repeat_action_probability == 0.0


def test_each_env_contributes_its_first_episode():
    task = EnvTask(name="cartpole", env_config=EnvConfig(id="CartPole-v1"))
    score = evaluate_policy(_Always(0), task, episodes=6, seed=3)
    # pushing left ends CartPole within a few steps; every episode's return is its length (8-11 here)
    assert score.episodes == 6 and 7 <= score.mean <= 12 and score.std >= 0 and score.normalized is None
    again = evaluate_policy(_Always(0), task, episodes=6, seed=3)
    assert again == score  # seeded
    with pytest.raises(ValueError, match="episodes must be an integer >= 1, got 0"):
        evaluate_policy(_Always(0), task, episodes=0)
    with pytest.raises(RuntimeError, match="did not end within 5 steps"):
        evaluate_policy(_Always(0), task, episodes=2, max_steps=5)


def _run_dir(tmp_path, **overrides):
    config = load_config(preset="cartpole", overrides={"dqn": {"compile": False}, **overrides}).validate()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.json")
    builder = make_builder(config, env_spec(config.env))
    algorithm = builder.make_algorithm(torch.device("cpu"))
    save_checkpoint(run_dir / "checkpoints", {"algorithm": algorithm.state_dict()}, step=10)
    return run_dir, algorithm


def test_a_runs_checkpoint_is_evaluated_on_every_task_or_the_chosen_ones(tmp_path, capsys):
    scenario = {"steps_per_task": 100, "tasks": [{"name": "nominal"},
                                                 {"name": "long", "variation": {"params": {"length": 1.0}}}]}
    run_dir, _ = _run_dir(tmp_path, scenario=scenario)
    scores = evaluate_run(run_dir, episodes=3)
    assert [s.task for s in scores] == ["nominal", "long"] and all(s.episodes == 3 for s in scores)
    assert [s.task for s in evaluate_run(run_dir, tasks=["long"], episodes=2, checkpoint=10)] == ["long"]
    assert main([str(run_dir), "--episodes", "2", "--tasks", "nominal"]) == 0
    out = capsys.readouterr().out
    assert "| task | env | episodes | mean return |" in out and "| nominal | CartPole-v1 | 2 |" in out


def test_bad_eval_requests_are_refused_naming_the_value(tmp_path, capsys):
    run_dir, _ = _run_dir(tmp_path)
    with pytest.raises(ValueError, match=r"--checkpoint 5: no such checkpoint .* there are \[10\]"):
        evaluate_run(run_dir, checkpoint=5)
    with pytest.raises(ValueError, match=r"--tasks: unknown task\(s\) \['nope'\]; this run's tasks are \['CartPole-v1'\]"):
        evaluate_run(run_dir, tasks=["nope"])
    with pytest.raises(ValueError, match="not a run directory"):
        evaluate_run(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(run_dir), "--epsilon", "2"]) == 2
    assert "--epsilon 2.0: expected a value in [0, 1]" in capsys.readouterr().err
