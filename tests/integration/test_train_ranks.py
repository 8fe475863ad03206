"""`evergreen train --learner.num_ranks 2`: a data-parallel learner of two gloo ranks, end to end.

Real Ray actors, a real gRPC replay shard and two learner processes in one torch.distributed group:
the run learns, every checkpoint finds the replicas identical, it resumes on one rank; a killed rank
stops the run with the rank's failure named, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from learner.checkpoint import load_latest_checkpoint, state_digest
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e


def _train(run_dir, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evergreen", "train", "--run-dir", str(run_dir), "--runs_dir",
         str(run_dir.parent / "runs"), "--learner.log_every_s", "1", "--dqn.compile", "false", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




def _learner_ranks(run_dir):
    path = run_dir / "placement.json"
    placement = json.loads(path.read_text()) if path.exists() else None
    return placement and placement.get("learner_ranks")


def test_two_ranks_learn_cartpole_checkpoint_identical_replicas_and_resume_on_one_rank(tmp_path):
    run_dir = tmp_path / "ranks"
    first = _train(run_dir, "--preset", "cartpole", "--learner.num_ranks", "2", "--learner.total_env_steps", "16000",
                   "--learner.stop_at_return", "100000", "--plasticity.interventions", "layer_norm,weight_decay,redo",
                   "--plasticity.options", '{"redo": {"period": 200}}', "--learner.checkpoint_every_s", "5")
    output, _ = first.communicate(timeout=400)
    assert first.returncode == 0, output[-3000:]
    ranks = _learner_ranks(run_dir)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"], ranks
    records = _records(run_dir)
    returns = [r["return_mean_100"] for r in records if r.get("return_mean_100") is not None]
    # Random play averages ~22; a learner whose ranks disagreed or trained on nothing stays there.
    assert returns and returns[-1] >= 60 and returns[-1] >= 2 * returns[0], returns
    keys = set().union(*records)
    assert any(k.startswith("redo/") for k in keys) and any(k.startswith("diag/") for k in keys), sorted(keys)
    state = load_latest_checkpoint(run_dir / "checkpoints")
    updates = state["counters"]["updates"]
    assert updates == records[-1]["updates"] > 0

    # Resume on one rank: the same state goes on (the checkpoint is rank-agnostic).
    resumed = _train(run_dir, "--resume", str(run_dir), "--learner.num_ranks", "1",
                     "--learner.total_env_steps", str(state["counters"]["env_steps"] + 2000))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    resumed_from = json.loads((run_dir / "resumed.json").read_text())
    assert resumed_from["updates"] == updates and resumed_from["state_digest"] == state_digest(state["algorithm"])
    assert load_latest_checkpoint(run_dir / "checkpoints")["counters"]["updates"] > updates
    assert [r["rank"] for r in _learner_ranks(run_dir)] == [0]


def _learners_in_status(run_dir, capsys) -> list[dict]:
    from evergreen.control.commands import main as control_main

    if control_main("status", [str(run_dir), "--json"]) != 0:
        capsys.readouterr()
        return []
    return [c for c in json.loads(capsys.readouterr().out)["components"] if c["kind"] == "learner"]


def test_a_killed_rank_stops_the_run_and_it_resumes_from_the_last_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "killed"
    train = _train(run_dir, "--preset", "cartpole", "--learner.num_ranks", "2", "--learner.total_env_steps",
                   "1000000", "--replay.min_size_to_sample", "200", "--learner.checkpoint_every_s", "2")
    try:
        ranks = wait_for(lambda: _learner_ranks(run_dir), "placement.json with the learner ranks", timeout_s=120)
        wait_for(lambda: list((run_dir / "checkpoints").glob("*.pt")) and _records(run_dir)[-1]["updates"] > 0,
              "a checkpoint after some updates", timeout_s=120)
        # `evergreen status` lists both ranks, each with its own process.
        learners = wait_for(lambda: [c for c in _learners_in_status(run_dir, capsys) if c.get("pid")],
                            "both learner ranks in evergreen status", timeout_s=60)
        assert sorted(c["pid"] for c in learners) == sorted(r["pid"] for r in ranks), learners
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        output, _ = train.communicate(timeout=240)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    assert train.returncode != 0, output[-3000:]
    assert "the learner failed" in output, output[-3000:]
    saved = load_latest_checkpoint(run_dir / "checkpoints")
    target = saved["counters"]["env_steps"] + 1500
    resumed = _train(run_dir, "--resume", str(run_dir), "--learner.total_env_steps", str(target))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert json.loads((run_dir / "resumed.json").read_text())["updates"] == saved["counters"]["updates"]
    assert load_latest_checkpoint(run_dir / "checkpoints")["counters"]["env_steps"] >= target
