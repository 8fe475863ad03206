"""A real Prometheus scrapes a real TelemetryExporter and a real replay shard; every dashboard and alert
expression runs against it.

Prometheus gets a config generated from deploy/prometheus/prometheus.yml (scrape and evaluation
interval 1 s, file_sd pointed at a temp targets directory, the real alerts.yml) and a temp storage
dir, on a free loopback port; it is stopped by PID at the end. The exporter is fed records shaped like
``Trainer._record``. The values are chosen so that every alert condition holds (dormant ratio 0.6 and
rising, learner waiting 90%, policy lag 5000, no actors, a last record 1000 s old, a replay target and
a learner target on ports where nothing listens), so each alert expression is exercised on data that
makes it return series. Replay families come from a real ``replay.launch.ShardProcess``; nothing is
exempt. Families only a real training job produces with real values (the plasticity probe, Hessian)
are fed here as numbers in the record, exactly as the trainer would write them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from evergreen.agents import DQNBuilder
from evergreen.telemetry import TelemetryExporter, write_targets
from tests.e2e.conftest import api, dashboard_and_alert_exprs, free_port, query, wait_for

pytestmark = pytest.mark.e2e

RUN = "e2e-run"
DEAD_RUN = "e2e-dead"
LAYERS = ("encoder.0", "encoder.2", "head.0")


def record(i: int, *, now: float) -> dict:
    """Interval i of a run that is losing plasticity and starving (see the module docstring)."""
    rec = {
        "time": now - 1000.0, "elapsed_s": 5.0 * (i + 1), "env_steps": 1000 * (i + 1), "updates": 100 * (i + 1),
        "episodes": 2 * (i + 1), "env_steps_per_s": 200.0, "updates_per_s": 20.0,
        "return_mean_100": 10.0 + i, "return_recent": 11.0 + i, "replay_size": 1000 * (i + 1),
        "learner_wait_fraction": 0.9, "policy_lag_updates": 5000.0, "actor_restarts": i // 3,
        "num_actors": 0 if i >= 4 else 2,
        "loss": 0.5, "td_error": 0.25, "q": 1.0, "grad_norm": 3.0, "lr": 1e-4,
        "redo/units_reset": 4.0 if i in (3, 6) else 0.0, "redo/dormant_fraction": 0.3,
        "diag/srank": 40.0 - i, "diag/effective_rank": 30.0, "diag/feature_rank": 20.0, "diag/feature_norm": 5.0,
        "diag/feature_var": 0.5, "diag/churn": 0.1, "diag/policy_entropy": 1.0, "diag/hessian_max_eig": 12.0,
        "diag/plasticity_probe/loss": 0.4, "diag/plasticity_probe/fresh_loss": 0.2,
        "diag/plasticity_probe/ratio": 2.0,
    }
    for name in ("dormant_ratio", "dead_ratio", "active_units", "weight_norm", "dist_to_init", "effective_lr",
                 "grad_l1", "grad_l2", "grad_zero_frac"):
        for j, layer in enumerate(LAYERS):
            rec[f"diag/{name}/{layer}"] = 0.1 * (j + 1) + 0.01 * i
        rec[f"diag/{name}/total"] = 0.6 + 0.01 * i
    return rec


@pytest.fixture
def replay_shard(tmp_path):
    from replay.client import ReplayClient
    from replay.launch import ShardProcess
    from replay.schema import Field, Schema
    from replay.table import TableConfig

    table = TableConfig(name="replay", capacity=1000,
                        schema=Schema(fields=(Field(name="obs", dtype="float32", shape=(4,)),
                                              Field(name="reward", dtype="float32"))))
    shard = ShardProcess([table], metrics_port=0, shard_index=0)
    client = ReplayClient([shard.address], table="replay")
    yield shard, client
    client.close()
    shard.stop()


def test_prometheus_scrapes_the_exporter_and_every_expression_returns_series(tmp_path, prometheus, replay_shard):
    port, sd_dir = prometheus
    shard, client = replay_shard
    exporter = TelemetryExporter(run=RUN, task="CartPole-v1", batch_size=32, families=DQNBuilder.telemetry_families)
    exporter.start()
    try:
        run_dir = tmp_path / "runs" / RUN
        run_dir.mkdir()
        # Replay shard 1 and the dead run's learner are ports where nothing listens: up == 0.
        write_targets(run_dir, {"learner": exporter.port, "replay": [shard.metrics_port, free_port()]}, sd_dir=sd_dir)
        dead_dir = tmp_path / "runs" / DEAD_RUN
        dead_dir.mkdir()
        write_targets(dead_dir, {"learner": free_port()}, sd_dir=sd_dir)

        now = time.time()
        exporter.update(record(0, now=now), episodes_by_task={"CartPole-v1": {"returns": [9.0], "lengths": [9]}})
        wait_for(lambda: query(port, f'evergreen_learner_updates_total{{run="{RUN}"}}'), timeout=60,
                 what="the first scrape of the exporter")
        rows = np.ones((16, 4), dtype=np.float32)
        for i in range(1, 9):
            time.sleep(1.1)  # one scrape per interval, so counters grow between scrapes
            exporter.update(
                record(i, now=now),
                episodes_by_task={"CartPole-v1" if i < 5 else "Pong": {"returns": [10.0 + i, -21.0 + i],
                                                                       "lengths": [100 + i, 800]}},
                task_switch="Pong" if i == 5 else None)
            client.insert({"obs": rows * i, "reward": np.full(16, i, dtype=np.float32)}, writer_key="actor-0")
            client.sample(8, timeout=10)
        # An evaluation of both tasks, as a run's evaluation processes report it.
        exporter.update_evaluation({"CartPole-v1": {"mean": 120.0, "normalized": None},
                                    "Pong": {"mean": -15.0, "normalized": 0.161}})
        time.sleep(3.0)  # a few scrapes and rule evaluations of the final state

        # Families arrive with their labels.
        layers = {r["metric"]["layer"] for r in query(port, f'evergreen_plasticity_dormant_ratio{{run="{RUN}"}}')}
        assert layers == {*LAYERS, "total"}
        steps = {r["metric"]["task"]: float(r["value"][1])
                 for r in query(port, f'evergreen_actor_env_steps_total{{run="{RUN}"}}')}
        # Record 5 carries the switch: its growth still counts for the task before it.
        assert steps == {"CartPole-v1": 6000.0, "Pong": 3000.0}
        (info,) = query(port, f'evergreen_task_info{{run="{RUN}"}} == 1')
        assert info["metric"]["task"] == "Pong" and info["metric"]["job"] == "evergreen-learner"
        (events,) = query(port, f'evergreen_intervention_events_total{{run="{RUN}"}}')
        assert events["metric"]["intervention"] == "redo" and events["metric"]["event"] == "units_reset"
        assert float(events["value"][1]) == 2.0
        counts = {r["metric"]["task"]: float(r["value"][1])
                  for r in query(port, f'evergreen_actor_episode_return_count{{run="{RUN}"}}')}
        assert counts == {"CartPole-v1": 9.0, "Pong": 8.0}
        (size,) = query(port, f'evergreen_replay_size{{run="{RUN}",job="evergreen-replay"}}')
        assert size["metric"]["shard"] == "0" and float(size["value"][1]) == 128.0
        ups = {(r["metric"]["job"], r["metric"]["run"], r["metric"].get("shard")): float(r["value"][1])
               for r in query(port, "up")}
        assert ups == {("evergreen-learner", RUN, None): 1.0, ("evergreen-replay", RUN, "0"): 1.0,
                       ("evergreen-replay", RUN, "1"): 0.0, ("evergreen-learner", DEAD_RUN, None): 0.0}
        assert query(port, f'process_resident_memory_bytes{{run="{RUN}",job="evergreen-learner"}}')
        evaluation = {r["metric"]["task"]: float(r["value"][1])
                      for r in query(port, f'evergreen_eval_return{{run="{RUN}"}}')}
        assert evaluation == {"CartPole-v1": 120.0, "Pong": -15.0}

        # Every dashboard and alert expression parses and returns series.
        empty = [where for where, expr in dashboard_and_alert_exprs() if not query(port, expr)]
        assert empty == [], f"expressions without series: {empty}"

        # Every alert rule is pending (or firing) on this data.
        alerts = {a["labels"]["alertname"] for a in api(port, "/api/v1/alerts")["alerts"]}
        assert alerts == {"EvergreenDormantRatioHigh", "EvergreenLearnerStarved", "EvergreenNoActorProgress",
                          "EvergreenTrainerNoHeartbeat", "EvergreenReplayShardDown", "EvergreenLearnerDown",
                          "EvergreenPolicyLagHigh"}
    finally:
        exporter.stop()
