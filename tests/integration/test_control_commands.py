"""`evergreen status / scale / stop / runs` against a live `evergreen train` process, from outside it, as a
user in another shell would: the run's own Redis, real Ray actors, real replay shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from evergreen.control.commands import main as control_main
from evergreen.train import main as train_main
from learner.checkpoint import load_latest_checkpoint
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e


def _status(run_dir, capsys) -> dict:
    assert control_main("status", [str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)




def _actor_states(status: dict) -> list[str]:
    return [c["state"] for c in status["components"] if c["kind"] == "actor"]


def test_status_scale_and_stop_a_live_run_from_another_process(tmp_path, capsys):
    run_dir = tmp_path / "live"
    train = subprocess.Popen(
        [sys.executable, "-m", "evergreen", "train", "--preset", "cartpole", "--run-dir", str(run_dir),
         "--runs_dir", str(tmp_path / "runs"), "--learner.total_env_steps", "10000000", "--dqn.compile", "false",
         "--replay.min_size_to_sample", "200", "--learner.log_every_s", "1", "--control.heartbeat_s", "0.5",
         "--control.max_actors", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert control_main("status", ["no-such-run", "--runs-dir", str(tmp_path)]) == 2
        assert "no run 'no-such-run'" in capsys.readouterr().err
        wait_for(lambda: (run_dir / "control.json").exists(), "control.json")
        status = wait_for(lambda: (s := _status(run_dir, capsys))["run"]["state"] == "running" and
                       _actor_states(s) == ["running"] and s, "the run to be running")
        kinds = {c["kind"] for c in status["components"]}
        assert kinds == {"driver", "learner", "replay", "actor"}
        (shard,) = [c for c in status["components"] if c["kind"] == "replay"]
        assert shard["generation"] == 0 and shard["address"].startswith("127.0.0.1:") and shard["pid"] > 0
        driver = next(c for c in status["components"] if c["kind"] == "driver")
        assert driver["pid"] == train.pid and time.time() - driver["last_heartbeat"] < 5

        # Out of bounds: refused, nothing changes.
        for bad in ("4", "-1"):
            assert control_main("scale", [str(run_dir), "--actors", bad]) == 2
            assert "expected an integer in [0, 3]" in capsys.readouterr().err
        assert control_main("scale", [str(run_dir), "--actors", "3"]) == 0
        capsys.readouterr()
        wait_for(lambda: _actor_states(_status(run_dir, capsys)) == ["running"] * 3, "3 running actors")
        steps = _status(run_dir, capsys)["components"][0]["env_steps"]
        assert control_main("scale", [str(run_dir), "--actors", "2"]) == 0
        capsys.readouterr()
        # The leaving actor finishes its chunk, flushes its inserts, and is forgotten at once.
        wait_for(lambda: _actor_states(_status(run_dir, capsys)) == ["running"] * 2, "down to 2 actors", timeout_s=30)
        wait_for(lambda: _status(run_dir, capsys)["components"][0]["env_steps"] > steps, "env steps going on")

        assert control_main("runs", ["--runs-dir", str(tmp_path), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["name"] == "live" and row["state"] == "running"

        assert control_main("stop", [str(run_dir), "--reason", "the test is done"]) == 0
        capsys.readouterr()
        output, _ = train.communicate(timeout=120)
        assert train.returncode == 0, output[-3000:]
        assert "stopped by `evergreen stop` (the test is done)" in output
        assert "actors 1 -> 3" in output and "actors 3 -> 2" in output
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    state = load_latest_checkpoint(run_dir / "checkpoints")   # the graceful stop wrote a final checkpoint
    assert state["counters"]["env_steps"] > 0
    final = _status(run_dir, capsys)                         # its Redis is gone; control.json says how it ended
    assert final["run"]["state"] == "stopped" and final["run"]["summary"]["env_steps"] == state["counters"]["env_steps"]
    assert "password" not in json.loads((run_dir / "control.json").read_text())
    assert control_main("scale", [str(run_dir), "--actors", "2"]) == 1   # nobody to scale
    assert "unreachable" in capsys.readouterr().err
    # Resumed, the run goes on with the actor count it was scaled to (kept in the checkpoint).
    assert train_main(["--resume", str(run_dir), "--learner.total_env_steps",
                       str(state["counters"]["env_steps"] + 300)]) == 0
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["num_actors"] == 2
