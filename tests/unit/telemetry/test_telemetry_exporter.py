"""TelemetryExporter: families, labels, counters, histograms and refusals, scraped over real HTTP."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from evergreen.agents import DQNBuilder
from evergreen.telemetry import TelemetryExporter, clear_targets, sanitize, write_targets


def record(**overrides):
    """A metrics.jsonl record shaped like ``Trainer._record`` writes it."""
    base = {
        "time": 1_800_000_000.0, "elapsed_s": 12.5, "env_steps": 1000, "updates": 100, "episodes": 4,
        "env_steps_per_s": 80.0, "updates_per_s": 8.0, "return_mean_100": 22.5, "return_recent": 30.0,
        "replay_size": 1000, "learner_wait_fraction": 0.25, "policy_lag_updates": 3.5,
        "actor_restarts": 1, "num_actors": 2,
        "loss": 0.5, "td_error": 0.75, "q": 1.5, "grad_norm": 2.0, "lr": 0.001,
        "redo/units_reset": 0.0, "redo/dormant_fraction": 0.125,
        "weight_clipping/clipped_fraction": 0.0625,
        "diag/dormant_ratio/total": 0.1, "diag/dormant_ratio/encoder.0": 0.2, "diag/dormant_ratio/head.0": 0.0,
        "diag/srank": 31.0, "diag/effective_lr/head.2": 0.003, "diag/grad_l2/encoder.2": 4.0,
        "diag/plasticity_probe/ratio": 1.25, "diag/plasticity_probe/loss": 0.5,
    }
    base.update(overrides)
    return base


@pytest.fixture
def exporter():
    exp = TelemetryExporter(run="run-a", task="CartPole-v1", batch_size=32, families=DQNBuilder.telemetry_families)
    exp.start()
    yield exp
    exp.stop()


def scrape(exp: TelemetryExporter) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from the real /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(exp: TelemetryExporter) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def one(samples, name, **labels):
    return samples[name][tuple(sorted(labels.items()))]


def test_record_fields_map_to_families(exporter):
    exporter.update(record())
    s = scrape(exporter)
    run = {"run": "run-a"}
    assert one(s, "evergreen_learner_updates_total", **run) == 100
    assert one(s, "evergreen_learner_samples_total", **run) == 3200
    assert one(s, "evergreen_learner_samples_per_second", **run) == 256
    assert one(s, "evergreen_learner_loss", **run) == 0.5
    assert one(s, "evergreen_learner_td_error", **run) == 0.75
    assert one(s, "evergreen_learner_q_value_mean", **run) == 1.5
    assert one(s, "evergreen_learner_grad_norm", **run) == 2.0
    assert one(s, "evergreen_learner_learning_rate", **run) == 0.001
    assert one(s, "evergreen_learner_updates_per_second", **run) == 8.0
    assert one(s, "evergreen_learner_data_wait_ratio", **run) == 0.25
    assert one(s, "evergreen_learner_policy_lag_updates", **run) == 3.5
    assert one(s, "evergreen_learner_replay_size", **run) == 1000
    assert one(s, "evergreen_actor_env_steps_per_second", **run) == 80.0
    assert one(s, "evergreen_actor_return_mean_100", **run) == 22.5
    assert one(s, "evergreen_actor_return_recent", **run) == 30.0
    assert one(s, "evergreen_actor_restarts_total", **run) == 1
    assert one(s, "evergreen_actors", **run) == 2
    assert one(s, "evergreen_run_elapsed_seconds", **run) == 12.5
    assert one(s, "evergreen_run_last_record_timestamp_seconds", **run) == 1_800_000_000.0
    # Without per-task dicts the record's cumulative counts go to the current task.
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1") == 1000
    assert one(s, "evergreen_actor_episodes_total", run="run-a", task="CartPole-v1") == 4
    assert one(s, "evergreen_task_info", run="run-a", task="CartPole-v1") == 1
    assert one(s, "evergreen_task_switches_total", **run) == 0
    assert one(s, "evergreen_task_start_timestamp_seconds", run="run-a", task="CartPole-v1") == 1_800_000_000.0
    # Process metrics live on the exporter's own registry.
    assert "process_cpu_seconds_total" in s or "process_cpu_seconds" in families(exporter)


def test_family_types(exporter):
    exporter.update(record(), episodes_by_task={"CartPole-v1": {"returns": [10.0], "lengths": [10]}})
    types = families(exporter)
    assert types["evergreen_learner_updates"] == "counter"
    assert types["evergreen_actor_env_steps"] == "counter"
    assert types["evergreen_actor_restarts"] == "counter"
    assert types["evergreen_intervention_events"] == "counter"
    assert types["evergreen_actor_episode_return"] == "histogram"
    assert types["evergreen_actor_episode_length_steps"] == "histogram"
    assert types["evergreen_plasticity_dormant_ratio"] == "gauge"
    assert types["evergreen_actors"] == "gauge"
    assert all(name.startswith(("evergreen_", "process_", "python_")) for name in types)


def test_plasticity_layer_rule(exporter):
    exporter.update(record())
    s = scrape(exporter)
    assert one(s, "evergreen_plasticity_dormant_ratio", run="run-a", layer="total") == 0.1
    assert one(s, "evergreen_plasticity_dormant_ratio", run="run-a", layer="encoder.0") == 0.2
    assert one(s, "evergreen_plasticity_dormant_ratio", run="run-a", layer="head.0") == 0.0
    assert one(s, "evergreen_plasticity_srank", run="run-a", layer="total") == 31.0
    assert one(s, "evergreen_plasticity_effective_learning_rate", run="run-a", layer="head.2") == 0.003
    assert one(s, "evergreen_plasticity_grad_l2_norm", run="run-a", layer="encoder.2") == 4.0
    assert one(s, "evergreen_plasticity_probe_loss_ratio", run="run-a", layer="total") == 1.25
    assert one(s, "evergreen_plasticity_probe_loss", run="run-a", layer="total") == 0.5
    assert "evergreen_plasticity_plasticity_probe" not in s


def test_intervention_gauges_and_events(exporter):
    exporter.update(record())
    s = scrape(exporter)
    assert one(s, "evergreen_intervention_dormant_ratio", run="run-a", intervention="redo") == 0.125
    assert one(s, "evergreen_intervention_clipped_ratio", run="run-a", intervention="weight_clipping") == 0.0625
    assert one(s, "evergreen_intervention_units_reset", run="run-a", intervention="redo") == 0.0
    # Seen at 0 first: the event series exists at 0, so that increase() sees the first event.
    events = {"run": "run-a", "intervention": "redo", "event": "units_reset"}
    assert one(s, "evergreen_intervention_events_total", **events) == 0
    # clipped_fraction is not an event word.
    assert all(dict(k).get("intervention") != "weight_clipping" for k in s["evergreen_intervention_events_total"])
    exporter.update(record(env_steps=2000, updates=200, episodes=8, **{"redo/units_reset": 12.5,
                                                                        "plasticity_injection/injections": 1.0}))
    exporter.update(record(env_steps=3000, updates=300, episodes=9, **{"redo/units_reset": 3.0}))
    exporter.update(record(env_steps=4000, updates=400, episodes=9, **{"redo/units_reset": 0.0}))
    s = scrape(exporter)
    assert one(s, "evergreen_intervention_events_total", **events) == 2
    assert one(s, "evergreen_intervention_events_total", run="run-a", intervention="plasticity_injection",
               event="injections") == 1
    assert one(s, "evergreen_intervention_units_reset", run="run-a", intervention="redo") == 0.0


def test_counters_are_monotonic_and_follow_cumulative_values(exporter):
    seen = []
    for i, (steps, updates, restarts) in enumerate([(1000, 100, 0), (2500, 180, 0), (2500, 180, 2), (9000, 900, 2)]):
        exporter.update(record(env_steps=steps, updates=updates, actor_restarts=restarts, episodes=i))
        s = scrape(exporter)
        seen.append((one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1"),
                     one(s, "evergreen_learner_updates_total", run="run-a"),
                     one(s, "evergreen_actor_restarts_total", run="run-a")))
    assert seen == [(1000, 100, 0), (2500, 180, 0), (2500, 180, 2), (9000, 900, 2)]


def test_decreasing_counter_is_refused_and_state_unchanged(exporter):
    exporter.update(record())
    before = scrape(exporter)
    with pytest.raises(ValueError, match=r"'updates'=50.0.*previous 100"):
        exporter.update(record(updates=50, loss=9.0, env_steps=5000))
    with pytest.raises(ValueError, match=r"env_steps=10.0"):
        exporter.update(record(env_steps=10, loss=9.0))
    after = scrape(exporter)
    for name in ("evergreen_learner_loss", "evergreen_actor_env_steps_total", "evergreen_learner_updates_total"):
        assert after[name] == before[name]


def test_bad_values_are_refused(exporter):
    with pytest.raises(ValueError, match=r"'loss' has value 'high'"):
        exporter.update(record(loss="high"))
    with pytest.raises(ValueError, match=r"both map to evergreen_learner_aux_loss"):
        exporter.update(record(**{"aux-loss": 1.0, "aux loss": 2.0}))
    with pytest.raises(ValueError, match=r"expected a dict"):
        exporter.update([("loss", 1.0)])
    with pytest.raises(ValueError, match=r"episodes_by_task\['CartPole-v1'\]"):
        exporter.update(record(), episodes_by_task={"CartPole-v1": {"returns": [1.0, 2.0], "lengths": [5]}})
    with pytest.raises(ValueError, match=r"episodes_by_task\['CartPole-v1'\]"):
        exporter.update(record(), episodes_by_task={"CartPole-v1": {"returns": [float("nan")], "lengths": [5]}})
    with pytest.raises(ValueError, match=r"task switch 7"):
        exporter.update(record(), task_switch=7)
    # Nothing was applied by the refused updates.
    assert "evergreen_learner_loss" not in scrape(exporter)


def test_constructor_refusals():
    with pytest.raises(ValueError, match=r"run=''"):
        TelemetryExporter(run="")
    with pytest.raises(ValueError, match=r"port=70000"):
        TelemetryExporter(run="r", port=70000)
    with pytest.raises(ValueError, match=r"batch_size=0"):
        TelemetryExporter(run="r", batch_size=0)
    with pytest.raises(ValueError, match=r"return_buckets=\[1.0, 0.0\]"):
        TelemetryExporter(run="r", return_buckets=[1.0, 0.0])


def test_none_removes_a_gauge_series_and_leaves_counters(exporter):
    exporter.update(record())
    exporter.update(record(env_steps=1500, loss=None, return_mean_100=None, updates=None))
    s = scrape(exporter)
    assert "evergreen_learner_loss" not in s
    assert "evergreen_actor_return_mean_100" not in s
    assert one(s, "evergreen_learner_updates_total", run="run-a") == 100
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1") == 1500


def test_unknown_keys_get_sanitized_gauges(exporter):
    exporter.update(record(**{"Aux-Loss/x": 1.0, "target_update_period": 500, "diag/new_thing/encoder.1": 0.5,
                              "is_ok": True}))
    s = scrape(exporter)
    # A slash outside diag/ reads as <intervention>/<metric>.
    assert one(s, "evergreen_intervention_x", run="run-a", intervention="Aux-Loss") == 1.0
    assert one(s, "evergreen_learner_target_update_period", run="run-a") == 500
    assert one(s, "evergreen_learner_is_ok", run="run-a") == 1.0
    assert one(s, "evergreen_plasticity_new_thing", run="run-a", layer="encoder.1") == 0.5
    assert sanitize("Loss/Aux-1") == "loss_aux_1"
    with pytest.raises(ValueError, match=r"'\?\?' has no usable"):
        sanitize("??")


def test_histograms_per_task_with_buckets(exporter):
    exporter.update(record(), episodes_by_task={
        "CartPole-v1": {"returns": [9.0, 195.0, 500.0], "lengths": [9, 195, 500]},
    })
    exporter.update(record(env_steps=2000), episodes_by_task={
        "CartPole-v1": {"returns": [475.0], "lengths": [475]},
        "Pong": {"returns": [-21.0, 21.0], "lengths": [800, 3000]},
    })
    s = scrape(exporter)
    b = "evergreen_actor_episode_return_bucket"
    cp = {"run": "run-a", "task": "CartPole-v1"}
    # le is inclusive: 195 falls in le=195, 475 in le=475, 500 in le=500.
    assert one(s, b, le="5.0", **cp) == 0
    assert one(s, b, le="10.0", **cp) == 1
    assert one(s, b, le="100.0", **cp) == 1
    assert one(s, b, le="195.0", **cp) == 2
    assert one(s, b, le="400.0", **cp) == 2
    assert one(s, b, le="475.0", **cp) == 3
    assert one(s, b, le="500.0", **cp) == 4
    assert one(s, b, le="+Inf", **cp) == 4
    assert one(s, "evergreen_actor_episode_return_count", **cp) == 4
    assert one(s, "evergreen_actor_episode_return_sum", **cp) == 9 + 195 + 500 + 475
    pong = {"run": "run-a", "task": "Pong"}
    assert one(s, b, le="-100.0", **pong) == 0
    assert one(s, b, le="-21.0", **pong) == 1
    assert one(s, b, le="20.0", **pong) == 1
    assert one(s, b, le="21.0", **pong) == 2
    assert one(s, "evergreen_actor_episode_return_sum", **pong) == 0
    lb = "evergreen_actor_episode_length_steps_bucket"
    assert one(s, lb, le="1000.0", **pong) == 1
    assert one(s, lb, le="5000.0", **pong) == 2
    assert one(s, "evergreen_actor_episode_length_steps_sum", **pong) == 3800
    # episodes_by_task is authoritative for the episode counters.
    assert one(s, "evergreen_actor_episodes_total", **cp) == 4
    assert one(s, "evergreen_actor_episodes_total", **pong) == 2


def test_task_switch_and_per_task_steps(exporter):
    exporter.update(record(env_steps=1000, episodes=3))
    exporter.update(record(time=1_800_000_100.0, env_steps=1600, episodes=5), task_switch="Pong")
    exporter.update(record(time=1_800_000_200.0, env_steps=2000, episodes=6))
    s = scrape(exporter)
    # The interval's growth goes to the task that was current before the switch.
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1") == 1600
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="Pong") == 400
    assert one(s, "evergreen_actor_episodes_total", run="run-a", task="CartPole-v1") == 5
    assert one(s, "evergreen_actor_episodes_total", run="run-a", task="Pong") == 1
    assert one(s, "evergreen_task_info", run="run-a", task="CartPole-v1") == 0
    assert one(s, "evergreen_task_info", run="run-a", task="Pong") == 1
    assert one(s, "evergreen_task_switches_total", run="run-a") == 1
    assert one(s, "evergreen_task_start_timestamp_seconds", run="run-a", task="Pong") == 1_800_000_100.0
    assert exporter.task == "Pong"
    # A record task field that differs is a switch too; the same task again is not.
    exporter.update(record(time=1_800_000_300.0, env_steps=2100, episodes=6, task="CartPole-v1"))
    exporter.update(record(time=1_800_000_400.0, env_steps=2200, episodes=6, task="CartPole-v1"))
    s = scrape(exporter)
    assert one(s, "evergreen_task_switches_total", run="run-a") == 2
    assert one(s, "evergreen_task_info", run="run-a", task="CartPole-v1") == 1
    assert one(s, "evergreen_task_info", run="run-a", task="Pong") == 0
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="Pong") == 500
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1") == 1700
    # A task_switch field in the record (as metrics.jsonl may carry it) switches too.
    exporter.update(record(time=1_800_000_500.0, env_steps=2300, episodes=6, task_switch="Breakout"))
    s = scrape(exporter)
    assert one(s, "evergreen_task_switches_total", run="run-a") == 3
    assert exporter.task == "Breakout"
    assert one(s, "evergreen_task_start_timestamp_seconds", run="run-a", task="Breakout") == 1_800_000_500.0


def test_env_steps_by_task_is_authoritative(exporter):
    exporter.update(record(env_steps=1000), env_steps_by_task={"CartPole-v1": 700, "Pong": 300})
    exporter.update(record(env_steps=1500), env_steps_by_task={"CartPole-v1": 700, "Pong": 800})
    s = scrape(exporter)
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="CartPole-v1") == 700
    assert one(s, "evergreen_actor_env_steps_total", run="run-a", task="Pong") == 800
    with pytest.raises(ValueError, match=r"env_steps_by_task\['Pong'\]=100"):
        exporter.update(record(env_steps=1600), env_steps_by_task={"Pong": 100})


def test_start_twice_and_stop_idempotent():
    exp = TelemetryExporter(run="r")
    port = exp.start()
    assert port > 0 and exp.port == port
    with pytest.raises(RuntimeError, match=f"already serving on port {port}"):
        exp.start()
    exp.stop()
    exp.stop()


def test_write_targets(tmp_path):
    run_dir = tmp_path / "cartpole-1"
    run_dir.mkdir()
    path = write_targets(run_dir, {"learner": 9400, "replay": [9401, 9402]})
    assert path == run_dir / "prometheus_targets.json"
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9400"], "labels": {"job": "evergreen-learner", "run": "cartpole-1"}},
        {"targets": ["127.0.0.1:9401"], "labels": {"job": "evergreen-replay", "run": "cartpole-1", "shard": "0"}},
        {"targets": ["127.0.0.1:9402"], "labels": {"job": "evergreen-replay", "run": "cartpole-1", "shard": "1"}},
    ]
    assert json.loads((run_dir / "ports.json").read_text()) == {"learner": 9400, "replay": [9401, 9402]}
    assert sorted(p.name for p in run_dir.iterdir()) == ["ports.json", "prometheus_targets.json"]
    with pytest.raises(ValueError, match=r"ports\['replay'\] contains 0"):
        write_targets(run_dir, {"learner": 9500, "replay": [0]})
    with pytest.raises(ValueError, match=r"no such directory"):
        write_targets(tmp_path / "missing", {"learner": 1})
    with pytest.raises(ValueError, match=r"component 'Learner!'"):
        write_targets(run_dir, {"Learner!": 1})
    with pytest.raises(ValueError, match=r"hosts\['replay'\] = \['a'\]: expected one host name or one per port \(2\)"):
        write_targets(run_dir, {"learner": 9500, "replay": [9501, 9502]}, hosts={"replay": ["a"]})
    # The refused calls left the earlier files as they were.
    assert json.loads((run_dir / "ports.json").read_text()) == {"learner": 9400, "replay": [9401, 9402]}


def test_write_targets_per_component_and_per_shard_hosts(tmp_path):
    run_dir = tmp_path / "cluster-1"
    run_dir.mkdir()
    path = write_targets(run_dir, {"learner": 9400, "replay": [9401, 9401]},
                         hosts={"learner": "10.0.0.5", "replay": ["10.0.1.7", "10.0.1.8"]})
    assert [g["targets"] for g in json.loads(path.read_text())] == [["10.0.0.5:9400"], ["10.0.1.7:9401"],
                                                                   ["10.0.1.8:9401"]]


def test_write_targets_sd_dir_and_clear(tmp_path):
    run_dir, sd_dir = tmp_path / "pong-7", tmp_path / "prometheus_targets"
    run_dir.mkdir()
    write_targets(run_dir, {"learner": 9000, "replay": [9001]}, host="learner.local", sd_dir=sd_dir)
    expected = [
        {"targets": ["learner.local:9000"], "labels": {"job": "evergreen-learner", "run": "pong-7"}},
        {"targets": ["learner.local:9001"], "labels": {"job": "evergreen-replay", "run": "pong-7", "shard": "0"}},
    ]
    assert json.loads((sd_dir / "pong-7.json").read_text()) == expected
    assert json.loads((run_dir / "prometheus_targets.json").read_text()) == expected
    assert clear_targets(run_dir, sd_dir=sd_dir) is True
    assert not (sd_dir / "pong-7.json").exists()
    assert (run_dir / "prometheus_targets.json").exists()
    assert clear_targets(run_dir, sd_dir=sd_dir) is False


def test_evaluations_are_exported_per_task_and_bad_ones_change_nothing(exporter):
    exporter.update_evaluation({"pong": {"mean": -3.0, "normalized": 0.5014}, "breakout": {"mean": 12.0,
                                                                                          "normalized": None}})
    got = scrape(exporter)
    assert got["evergreen_eval_return"] == {(("run", "run-a"), ("task", "pong")): -3.0,
                                            (("run", "run-a"), ("task", "breakout")): 12.0}
    assert got["evergreen_eval_human_normalized"] == {(("run", "run-a"), ("task", "pong")): 0.5014}
    exporter.update_evaluation({"pong": {"mean": 1.0}})  # the newest evaluation replaces the value
    assert scrape(exporter)["evergreen_eval_return"][(("run", "run-a"), ("task", "pong"))] == 1.0
    with pytest.raises(ValueError, match="eval mean"):
        exporter.update_evaluation({"pong": {"mean": 7.0}, "breakout": {"mean": "high"}})
    assert scrape(exporter)["evergreen_eval_return"][(("run", "run-a"), ("task", "pong"))] == 1.0  # all or nothing


def test_an_algorithm_with_several_networks_gets_a_network_label():
    exp = TelemetryExporter(run="sac-a", task="Pendulum-v1", networks=("actor", "critic"))
    exp.start()
    try:
        exp.update({"time": 1_800_000_000.0, "env_steps": 100, "updates": 10, "episodes": 0,
                    "diag/actor/dormant_ratio/total": 0.25, "diag/critic/dormant_ratio/total": 0.5,
                    "diag/critic/dormant_ratio/q1.fc0": 0.75, "diag/critic/srank": 12.0,
                    "diag/actor/plasticity_probe/ratio": 1.5,
                    "redo/critic/units_reset": 0.0, "redo/actor/dormant_fraction": 0.125})
        exp.update({"time": 1_800_000_010.0, "env_steps": 200, "updates": 20, "episodes": 0,
                    "redo/critic/units_reset": 4.0})
        s = scrape(exp)
        assert one(s, "evergreen_plasticity_dormant_ratio", run="sac-a", network="actor", layer="total") == 0.25
        assert one(s, "evergreen_plasticity_dormant_ratio", run="sac-a", network="critic", layer="total") == 0.5
        assert one(s, "evergreen_plasticity_dormant_ratio", run="sac-a", network="critic", layer="q1.fc0") == 0.75
        assert one(s, "evergreen_plasticity_srank", run="sac-a", network="critic", layer="total") == 12.0
        assert one(s, "evergreen_plasticity_probe_loss_ratio", run="sac-a", network="actor", layer="total") == 1.5
        assert one(s, "evergreen_intervention_units_reset", run="sac-a", intervention="redo", network="critic") == 4.0
        assert one(s, "evergreen_intervention_dormant_ratio", run="sac-a", intervention="redo", network="actor") == 0.125
        assert one(s, "evergreen_intervention_events_total", run="sac-a", intervention="redo",
                   event="critic_units_reset") == 1
    finally:
        exp.stop()
    with pytest.raises(ValueError, match="networks='actor'"):
        TelemetryExporter(run="x", networks="actor")
