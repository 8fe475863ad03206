"""Placement: the same config on a two-node Ray cluster, and nothing left behind when the driver dies.

* A two-node cluster on this machine (``ray.cluster_utils.Cluster``: a head node offering the custom
  resource ``replay`` and a worker node offering ``actors``) runs a short CartPole job joined with
  ``ray.address``; the run's ``placement.json`` must show the shards on the replay node and the
  actors on the other, exactly as the placement config asked.
* ``evergreen train`` killed with SIGKILL (no chance to clean up) must leave no process behind:
  the watchdog ends the local Ray cluster, and the shards stop by themselves when their parent dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from evergreen.config import load_config
from evergreen.train import Trainer

pytestmark = pytest.mark.e2e


def _short_cartpole(**overrides):
    base = {
        "replay": {"capacity": 4000, "min_size_to_sample": 200, "samples_per_insert": 8.0},
        "actors": {"epsilon_decay_steps": 500},
        "learner": {"total_env_steps": 1500, "stop_at_return": None, "log_every_s": 1.0},
        "plasticity": {"diagnostics": ""},
        "dqn": {"compile": False},  # placement is under test here, not the compiled update
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(preset="cartpole", overrides=base).validate()


def test_two_node_cluster_places_shards_and_actors_where_the_config_says(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"replay": 2}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"actors": 2})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        replay_node = next(node for node, res in nodes.items() if "replay" in res)
        actor_node = next(node for node, res in nodes.items() if "actors" in res)
        assert replay_node != actor_node
        config = _short_cartpole(
            ray={"address": cluster.address},
            replay={"placement": {"num_cpus": 0.5, "resources": {"replay": 1}}},
            actors={"num_actors": 2, "placement": {"num_cpus": 0.5, "resources": {"actors": 1}}},
            learner={"placement": {"num_cpus": 0.5, "resources": {"replay": 0.5}}},
        )
        summary = Trainer(config, run_dir=tmp_path / "cluster").run()
        assert summary.env_steps >= 1500 and summary.updates > 0
        placement = json.loads((tmp_path / "cluster" / "placement.json").read_text())
        assert [shard["node_id"] for shard in placement["replay"]] == [replay_node]
        assert sorted(a["actor_index"] for a in placement["actors"]) == [0, 1]
        assert {a["node_id"] for a in placement["actors"]} == {actor_node}
        assert placement["learner"]["node_id"] == replay_node
        # A cluster run binds the node's address, so that other nodes reach the shard.
        assert not placement["replay"][0]["address"].startswith("127.0.0.1:") or ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killing_the_driver_leaves_no_process_behind(tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "evergreen", "train", "--preset", "cartpole", "--run-dir", str(run_dir),
           "--runs_dir", str(tmp_path / "runs"), "--learner.total_env_steps", "1000000",
           "--replay.min_size_to_sample", "200", "--learner.log_every_s", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    driver = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run exited before it started training"
            if (run_dir / "placement.json").exists():
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the run never recorded its placement")
        started = driver.children(recursive=True)
        names = {p.name() for p in started if p.is_running()}
        assert any("raylet" in n for n in names), names  # the local Ray cluster is the driver's
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The watchdog ends them within its 15 s grace period; without it Ray's own processes linger
        # for about a minute (measured: 63 s), so this bound tells the two apart.
        gone, alive = psutil.wait_procs(started, timeout=40)
        survivors = [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors == [], f"processes outlived the killed driver: {survivors}"
    finally:
        for p in [driver, *started]:
            with contextlib.suppress(psutil.Error):
                p.kill()
