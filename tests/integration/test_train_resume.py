"""`evergreen train` end to end on one host: real Ray actors, real gRPC replay shards, the real learner.

Each run is short (a few hundred to a few thousand env steps); the point is the wiring: experience
reaches replay, the learner updates and publishes, checkpoints are written, and a resumed run
continues its counters, its learner state and its replay contents.
"""

from __future__ import annotations

import json

import pytest

from evergreen.config import load_config, read_config
from evergreen.train import Trainer, main
from learner.checkpoint import load_latest_checkpoint, state_digest

pytestmark = pytest.mark.e2e


def read_config_json(preset: str) -> dict:
    import dataclasses

    return dataclasses.asdict(load_config(preset=preset))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cartpole(total: int, **learner):
    return load_config(preset="cartpole", overrides={
        "replay": {"capacity": 4000, "min_size_to_sample": 200, "samples_per_insert": 8.0},
        "actors": {"num_actors": 1, "epsilon_decay_steps": 500},
        "learner": {"total_env_steps": total, "stop_at_return": None, "log_every_s": 1.0, **learner},
        "plasticity": {"diagnostics_every": 20, "interventions": "layer_norm,weight_decay,redo",
                       "options": {"redo": {"period": 50}}},
        "dqn": {"compile": False},  # minutes of compilation on a loaded 2-core box; the injection test compiles
    }).validate()


def test_cartpole_runs_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = Trainer(_cartpole(1500), run_dir=run_dir).run()
    assert first.env_steps >= 1500 and first.updates > 0 and first.episodes > 0
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["updates"] == first.updates
    assert state["counters"]["env_steps"] == first.env_steps
    assert list((run_dir / "replay" / "shard-0").iterdir()), "replay shard wrote no checkpoint"
    records = _records(run_dir)
    assert records and all(r["replay_size"] > 0 for r in records[-1:])
    # diagnostics and intervention metrics reached the log
    keys = set().union(*records)
    assert any(k.startswith("diag/dormant_ratio") for k in keys), sorted(keys)
    assert any(k.startswith("redo/") for k in keys), sorted(keys)

    # Resume with a larger budget: counters, learner and replay continue.
    target = first.env_steps + 1500  # the first run may overshoot its budget by up to one actor chunk
    assert main(["--resume", str(run_dir), "--learner.total_env_steps", str(target)]) == 0
    # The resumed learner held exactly the checkpoint's state: weights, Adam moments and step
    # counts, intervention state and the RNG (the digest covers every tensor and number in it).
    resumed_from = json.loads((run_dir / "resumed.json").read_text())
    assert resumed_from["updates"] == first.updates and resumed_from["env_steps"] == first.env_steps
    assert resumed_from["state_digest"] == state_digest(state["algorithm"])
    assert state["algorithm"]["step"] == first.updates
    state2 = load_latest_checkpoint(run_dir / "checkpoints")
    assert state2["counters"]["env_steps"] >= target
    assert state2["counters"]["updates"] > first.updates
    resumed = _records(run_dir)[len(records):]
    assert resumed, "the resumed run logged nothing"
    assert resumed[0]["env_steps"] >= first.env_steps and resumed[-1]["env_steps"] > first.env_steps
    # the replay shard restored its contents: its size never starts from zero again
    assert resumed[0]["replay_size"] >= records[-1]["replay_size"]
    assert read_config(run_dir / "config.json").learner.total_env_steps == 1500  # stored config unchanged


def test_pong_runs_checkpoints_and_resumes(tmp_path):
    config = load_config(preset="pong", overrides={
        "env": {"num_envs": 4},
        "replay": {"capacity": 3000, "min_size_to_sample": 100, "samples_per_insert": 4.0},
        "actors": {"epsilon_decay_steps": 100},
        "learner": {"total_env_steps": 600, "batch_size": 16, "log_every_s": 1.0},
        "plasticity": {"diagnostics_every": 10},
    }).validate()
    run_dir = tmp_path / "pong"
    summary = Trainer(config, run_dir=run_dir).run()
    assert summary.env_steps >= 600 and summary.updates > 0
    records = _records(run_dir)
    assert records[-1]["replay_size"] > 0
    assert list((run_dir / "replay" / "shard-0").iterdir()), "the Atari replay shard wrote no checkpoint"
    # resume: the frame-deduplicating Atari storage restores, the counters continue
    assert main(["--resume", str(run_dir), "--learner.total_env_steps", str(summary.env_steps + 400)]) == 0
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["env_steps"] >= summary.env_steps + 400
    assert state["counters"]["updates"] > summary.updates
    resumed = _records(run_dir)[len(records):]
    assert resumed[0]["replay_size"] >= records[-1]["replay_size"]


def test_bad_flags_and_resume_dirs_are_refused(tmp_path, capsys):
    assert main(["--learner.batch_size", "0"]) == 2
    assert "learner.batch_size = 0 is invalid: expected >= 1" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--plasticity", "layer_norm,not_a_thing"]) == 2
    assert "not_a_thing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(read_config_json("cartpole-shifts")))
    assert main(["--resume", str(tmp_path), "--scenario.replay_at_switch", "per_task"]) == 2
    assert "'keep' -> 'per_task' changes the replay tables" in capsys.readouterr().err
    assert main(["--resume-if-exists"]) == 2
    assert "--resume-if-exists needs --run-dir" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_stops_cleanly_and_leaves_a_resumable_checkpoint(tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the trainer
    (docker stop, Kubernetes); then resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "evergreen", "train", "--preset", "cartpole", "--run-dir", str(run_dir),
           "--runs_dir", str(tmp_path / "runs"),
           "--learner.total_env_steps", "1000000", "--replay.min_size_to_sample", "200",
           "--learner.log_every_s", "1", "--dqn.compile", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = run_dir / "metrics.jsonl"
            if log.exists() and any(json.loads(line)["updates"] > 0 for line in log.read_text().splitlines()):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            raise AssertionError("training never started updating")
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert f"interrupted ({'Ctrl-C' if how == 'ctrl-c' else 'SIGTERM'}); checkpoint written" in out
    # the run's Prometheus target file was written at start and removed at shutdown
    assert (tmp_path / "runs" / "prometheus_targets").is_dir()
    assert not list((tmp_path / "runs" / "prometheus_targets").glob("*.json"))
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state is not None and state["counters"]["updates"] > 0
    # and it resumes from there (after SIGTERM as a restarted container entrypoint would: the same command)
    again = ["--run-dir", str(run_dir), "--resume-if-exists"] if how == "sigterm" else ["--resume", str(run_dir)]
    assert main([*again, "--learner.total_env_steps", str(state["counters"]["env_steps"] + 500)]) == 0
    assert load_latest_checkpoint(run_dir / "checkpoints")["counters"]["updates"] >= state["counters"]["updates"]


def test_plasticity_injection_mid_run_reaches_the_actors(tmp_path):
    """Injection changes the head's architecture; actors must keep acting with the new network.

    With the preset's ``dqn.compile``: the learner recompiles its update for the new module tree."""
    config = load_config(preset="cartpole", overrides={
        "replay": {"capacity": 4000, "min_size_to_sample": 200, "samples_per_insert": 8.0},
        "learner": {"total_env_steps": 2500, "stop_at_return": None, "log_every_s": 1.0, "publish_every": 10},
        "plasticity": {"interventions": "plasticity_injection", "options": {"plasticity_injection": {"step": 30}},
                       "diagnostics": ""},
    }).validate()
    summary = Trainer(config, run_dir=tmp_path / "inject").run()
    records = _records(tmp_path / "inject")
    assert summary.updates > 30 and summary.env_steps >= 2500
    assert records[-1]["actor_restarts"] == 0, "actors crashed loading the injected network"
    assert any((r.get("plasticity_injection/injected") or 0) > 0 for r in records), records
    # after the injection the actors acted with versions published after it
    assert records[-1]["actor_policy_lag_updates"] is not None
    assert records[-1]["actor_policy_lag_updates"] < summary.updates - 30


def test_a_poisoning_client_is_refused_and_the_run_trains_and_resumes(tmp_path):
    """A process on the host that finds a shard's port cannot write: without the run's token it is
    unauthenticated; with it (an insider, or a buggy writer) rows outside the agent's bounds
    (action 7 in a 2-action env) are refused, naming the field. The run trains on and resumes."""
    import threading
    import time

    import numpy as np

    from replay import errors
    from replay.client import ReplayClient

    run_dir = tmp_path / "poisoned"
    trainer = Trainer(_cartpole(3000), run_dir=run_dir)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", trainer.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (run_dir / "placement.json").exists():  # written once every component runs
        assert time.monotonic() < deadline and thread.is_alive(), "the run did not start"
        time.sleep(0.2)
    address = json.loads((run_dir / "placement.json").read_text())["replay"][0]["address"]
    rows = 64
    poison = {"obs": np.zeros((rows, 4), np.float32), "action": np.full(rows, 7, np.int64),
              "reward": np.ones(rows, np.float32), "discount": np.full(rows, 0.99, np.float32),
              "next_obs": np.zeros((rows, 4), np.float32), "policy_version": np.zeros(rows, np.int64),
              "task": np.zeros(rows, np.int64)}
    outsider = ReplayClient([address], table="replay", timeout=5.0)
    with pytest.raises(errors.Unauthenticated):
        outsider.insert(poison, writer_key="attacker")
    assert (run_dir / "replay.token").stat().st_mode & 0o077 == 0  # the token file is private
    insider = ReplayClient([address], table="replay", timeout=5.0,
                           token=(run_dir / "replay.token").read_text().strip())
    with pytest.raises(errors.InvalidArgument, match=r"action.*7"):
        insider.insert(poison, writer_key="attacker")
    # a task id outside the run's scenario (one task here: only 0) is refused too
    with pytest.raises(errors.InvalidArgument, match=r"task.*5"):
        insider.insert(dict(poison, action=np.zeros(rows, np.int64), task=np.full(rows, 5, np.int64)),
                       writer_key="attacker")
    outsider.close()
    insider.close()
    thread.join(timeout=300)
    summary = result["summary"]
    assert summary.env_steps >= 3000 and summary.updates > 0
    assert _records(run_dir)[-1]["dropped_batches"] == 0  # nothing bad ever reached the learner
    assert main(["--resume", str(run_dir), "--learner.total_env_steps", str(summary.env_steps + 1000)]) == 0
    assert load_latest_checkpoint(run_dir / "checkpoints")["counters"]["env_steps"] >= summary.env_steps + 1000


def test_a_scenario_switches_tasks_at_their_env_steps_exactly_once_across_resume(tmp_path):
    # The actors wait at the weight store's env-step gate from the switch's env step until the driver has
    # switched: the switch lands within one weight poll (5 vector steps x 8 envs) of it, however fast or
    # loaded the machine is, and the run ends within one poll of its total.
    scenario = {"steps_per_task": 2000, "tasks": [
        {"name": "pole-0.5"},
        {"name": "pole-2.0", "variation": {"params": {"length": 2.0}}},
        {"name": "permuted", "variation": {"permute_observations": True}}]}
    config = load_config(preset="cartpole", overrides={
        "replay": {"capacity": 4000, "min_size_to_sample": 200, "samples_per_insert": 32.0},
        "actors": {"num_actors": 1, "epsilon_decay_steps": 500, "weight_poll_steps": 5},
        "learner": {"total_env_steps": 3000, "stop_at_return": None, "log_every_s": 1.0},
        "plasticity": {"interventions": "shrink_perturb", "diagnostics": ""},
        "dqn": {"compile": False}, "scenario": scenario, "evaluation": {"episodes": 3},
    }).validate()
    run_dir = tmp_path / "continual"
    first = Trainer(config, run_dir=run_dir).run()
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["visit"] == 1 and state["algorithm"]["task"] == 1
    records = _records(run_dir)
    switches = [r for r in records if "task_switch" in r]
    assert [(r["task_switch"], r["visit"]) for r in switches] == [("pole-2.0", 1)]
    assert 2000 <= switches[0]["switch_env_steps"] <= 2000 + 5 * 8
    assert 3000 <= first.env_steps <= 3000 + 5 * 8
    # the intervention's task-switch hook ran, once
    assert switches[0]["task_switch_metrics"] == {"shrink_perturb/applied": 1.0}
    before = [r for r in records if r["env_steps"] < 2000]
    assert before and all(r["task"] == "pole-0.5" and r["replay_current_task_fraction"] in (1.0, None)
                          for r in before)
    assert any(r["replay_current_task_fraction"] == 1.0 for r in before)
    after = [r for r in records if r.get("visit") == 1 and r.get("replay_current_task_fraction") is not None]
    # the learner trains on both tasks' rows once the new task's transitions arrive (replay keeps the old)
    assert after and after[-1]["task"] == "pole-2.0" and 0.0 < after[-1]["replay_current_task_fraction"] < 1.0

    # Resume past the next boundary: visit 1 is not switched to again, visit 2 is, once; this segment
    # flushes replay at its switch, and the held actor inserted its old-task rows before the flush, so
    # the learner then trains on the new task's rows only.
    assert main(["--resume", str(run_dir), "--learner.total_env_steps", "5000",
                 "--scenario.replay_at_switch", "flush"]) == 0
    resumed = _records(run_dir)[len(records):]
    assert resumed[0]["task"] == "pole-2.0" and resumed[0]["visit"] == 1
    assert [(r["task_switch"], r["visit"]) for r in resumed if "task_switch" in r] == [("permuted", 2)]
    (flush,) = [r for r in resumed if "task_switch" in r]
    assert set(flush["task_switch_metrics"]) == {"shrink_perturb/applied", "replay_flushed_rows",
                                                 "learner_discarded_batches"}
    assert flush["task_switch_metrics"]["replay_flushed_rows"] >= 2000  # the capacity is 4000 rows
    # Kept, the new task's ~1000 rows would be a quarter of the 4000 the table holds.
    assert 4000 <= flush["switch_env_steps"] <= 4000 + 5 * 8
    # (the switch's own record covers the updates just before it, on the old task's rows)
    trained = [r for r in resumed if r.get("visit") == 2 and "task_switch" not in r
               and r.get("replay_current_task_fraction") is not None]
    assert trained and all(r["replay_current_task_fraction"] == 1.0 for r in trained), trained
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["visit"] == 2 and state["algorithm"]["task"] == 2
    # Every task was evaluated at the end of each visit and of each run segment, never writing to replay.
    evaluations = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in evaluations] == ["end of visit 0", "end of run", "end of visit 1", "end of run"]
    assert all(set(e["scores"]) == {"pole-0.5", "pole-2.0", "permuted"} and
               all(s["episodes"] == 3 for s in e["scores"].values()) for e in evaluations)
    summary = json.loads((run_dir / "continual.json").read_text())
    assert summary["visits_reached"] == 3 and set(summary["forgetting"]) == {"pole-0.5", "pole-2.0", "permuted"}


def test_per_task_tables_train_on_the_current_task_only_and_keep_each_task_for_its_next_visit(tmp_path):
    """replay_at_switch: per_task in a live run: after each switch the learner trains on the new task's rows
    only (the old task's insert batches on their way land in its own table, and its actors are not held
    back by a table nobody samples), and a resumed run restores every task's table for its next visit."""
    scenario = {"steps_per_task": 2000, "cycles": 2, "replay_at_switch": "per_task", "tasks": [
        {"name": "pole-0.5"}, {"name": "pole-2.0", "variation": {"params": {"length": 2.0}}}]}
    config = load_config(preset="cartpole", overrides={
        "replay": {"capacity": 4000, "min_size_to_sample": 200, "samples_per_insert": 32.0, "sampler": "prioritized"},
        "actors": {"num_actors": 1, "epsilon_decay_steps": 500, "weight_poll_steps": 5},
        "learner": {"total_env_steps": 3000, "stop_at_return": None, "log_every_s": 0.5},
        "plasticity": {"interventions": "", "diagnostics": ""},
        "dqn": {"compile": False}, "scenario": scenario, "evaluation": {"at_switch": False},
    }).validate()
    run_dir = tmp_path / "per-task"
    Trainer(config, run_dir=run_dir).run()
    records = _records(run_dir)
    switches = [r for r in records if "task_switch" in r]
    assert [r["task_switch"] for r in switches] == ["pole-2.0"]
    assert 2000 <= switches[0]["switch_env_steps"] <= 2000 + 5 * 8   # the actors waited at the gate
    # Each table holds 4000 / 2 tasks rows; task 0's is full, task 1's filling.
    assert max(r["replay_size"] for r in records) <= 4000
    switch = next(i for i, r in enumerate(records) if "task_switch" in r)
    trained = [r["replay_current_task_fraction"] for r in records[switch + 1:]
               if r.get("replay_current_task_fraction") is not None]
    assert trained and all(f == 1.0 for f in trained), trained   # with "keep" it would be well below 1

    assert main(["--resume", str(run_dir), "--learner.total_env_steps", "5000"]) == 0
    resumed = _records(run_dir)[len(records):]
    assert [(r["task_switch"], r["visit"]) for r in resumed if "task_switch" in r] == [("pole-0.5", 2)]
    back = next(i for i, r in enumerate(resumed) if "task_switch" in r)
    # Task 0's table came back from the shard's checkpoint: the learner trains on its rows at once.
    assert resumed[back]["replay_size"] >= 2000
    trained = [r["replay_current_task_fraction"] for r in resumed[back + 1:]
               if r.get("replay_current_task_fraction") is not None]
    assert trained and all(f == 1.0 for f in trained), trained
    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["visit"] == 2
