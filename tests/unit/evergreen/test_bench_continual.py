"""The lockstep continual harness: real actor, replay table, learner loop and evaluation in one process."""

from __future__ import annotations

import pytest

from evergreen.bench.continual import run_lockstep
from evergreen.config import load_config


def _config(replay_at_switch: str, **plasticity):
    return load_config(preset="cartpole", overrides={
        "seed": 3,
        "dqn": {"compile": False},
        "replay": {"min_size_to_sample": 200, "samples_per_insert": 32.0},
        "learner": {"total_env_steps": 1600, "stop_at_return": None},
        "plasticity": {"diagnostics_every": 50, "diagnostics": "dormant_ratio,srank", **plasticity},
        "scenario": {"steps_per_task": 800, "replay_at_switch": replay_at_switch, "tasks": [
            {"name": "plain"}, {"name": "permuted", "variation": {"permute_observations": True}}]},
        "evaluation": {"episodes": 2},
    }).validate()


@pytest.fixture(scope="module")
def flushed():
    return run_lockstep(_config("flush", interventions="shrink_perturb"), eval_every=400, eval_episodes=2,
                        log_every=200, progress=None)


def test_one_switch_runs_the_hooks_once_and_flushes_replay(flushed):
    (switch,) = flushed["switch_metrics"]
    assert switch["task"] == 1 and 800 <= switch["env_steps"] < 900
    assert switch["shrink_perturb/applied"] == 1.0
    assert switch["flushed_rows"] > 600   # every row collected on the first task (n-step windows aside)
    # After the flush the learner trains on the new task's rows only; before it, on the first task's.
    after = [p for p in flushed["curve"] if p["visit"] == 1 and p["current_task_fraction"] is not None]
    before = [p for p in flushed["curve"] if p["visit"] == 0 and p["current_task_fraction"] is not None]
    assert after and before and all(p["current_task_fraction"] == 1.0 for p in after + before)
    # Updates follow env steps: samples_per_insert 32 at batch 128 is one update per 4 env steps.
    assert flushed["updates"] <= flushed["env_steps"] // 4


def test_evaluations_and_continual_metrics(flushed):
    reasons = [e["reason"] for e in flushed["evaluations"]]
    assert reasons.count("end of visit 0") == 1 and reasons[-1] == "end of run"
    end = [e for e in flushed["evaluations"] if e["reason"] != "periodic"]
    assert all(set(e["scores"]) == {"plain", "permuted"} for e in end)
    summary = flushed["continual"]
    assert summary["visits_reached"] == 2 and set(summary["forgetting"]) == {"plain", "permuted"}
    assert summary["forgetting"]["permuted"] == 0.0   # its own visit is the last
    assert any("diag/srank" in p for p in flushed["curve"])


def test_keep_trains_on_both_tasks_and_runs_are_reproducible(flushed):
    kept = run_lockstep(_config("keep", interventions="shrink_perturb"), eval_every=400, eval_episodes=2,
                        log_every=200, progress=None)
    assert kept["switch_metrics"][0]["flushed_rows"] == 0
    after = [p["current_task_fraction"] for p in kept["curve"] if p["visit"] == 1 and p["current_task_fraction"]]
    assert after and min(after) < 1.0
    # Everything before the switch is the same run as the flushed one: same seed, same steps and updates.
    first = [p for p in flushed["curve"] if p["visit"] == 0]
    assert first == [p for p in kept["curve"] if p["visit"] == 0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="log_every = 0 is invalid"):
        run_lockstep(_config("keep"), log_every=0, progress=None)
    with pytest.raises(ValueError, match="eval_every = -1 is invalid"):
        run_lockstep(_config("keep"), eval_every=-1, progress=None)
