"""Grafana dashboards and Prometheus config/rules: structure, PromQL that parses, alerts that fire.

PromQL parsing and the alert behaviour use promtool (Debian's `prometheus` package; `.ci/run` installs
it). Without promtool those tests skip with the reason and a bracket/selector sanity check runs instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables, replaced by values Prometheus accepts, as Grafana would at query time.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$run": ".*", "$layer": ".*"}


def load(name: str) -> dict:
    return json.loads((DASHBOARDS / f"{name}.json").read_text())


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and annotation query."""
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{dash['uid']} panel {panel['title']!r} {target['refId']}", target["expr"]))
    for a in dash["annotations"]["list"]:
        if "expr" in a:
            out.append((f"{dash['uid']} annotation {a['name']!r}", a["expr"]))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    exprs = dashboard_exprs(load("plasticity")) + dashboard_exprs(load("system"))
    return exprs + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


# -- dashboards -------------------------------------------------------------------------------------
def test_uids_are_stable_and_unique():
    assert load("plasticity")["uid"] == "evergreen-plasticity"
    assert load("system")["uid"] == "evergreen-system"
    for name in ("plasticity", "system"):
        ids = [p["id"] for p in load(name)["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


@pytest.mark.parametrize("name", ["plasticity", "system"])
def test_datasource_variable_and_references(name):
    dash = load(name)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    for p in panels:
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
            assert t["expr"].strip(), p["title"]
    for a in dash["annotations"]["list"]:
        if not a.get("builtIn"):
            assert a["datasource"] == DS_REF, a["name"]
    # Panels do not overlap on the grid.
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_plasticity_dashboard_covers_the_diagnostics_and_annotations():
    dash = load("plasticity")
    text = " ".join(e for _, e in dashboard_exprs(dash))
    for family in ("dormant_ratio", "srank", "effective_rank", "feature_norm", "weight_norm", "distance_to_init",
                   "effective_learning_rate", "grad_l2_norm", "hessian_max_eigenvalue", "probe_loss",
                   "churn_ratio"):
        assert f"evergreen_plasticity_{family}" in text, family
    per_layer = [e for _, e in dashboard_exprs(dash) if 'layer=~"$layer"' in e]
    assert len(per_layer) >= 6
    names = {a["name"] for a in dash["annotations"]["list"]}
    assert {"Intervention events", "Task switches", "Current task"} <= names
    # continual runs: the latest evaluation of every task, and which task the actors are on
    assert "evergreen_eval_return" in text and "evergreen_eval_human_normalized" in text
    assert "evergreen_actor_env_steps_total" in text


def test_system_dashboard_covers_throughput_replay_and_processes():
    text = " ".join(e for _, e in dashboard_exprs(load("system")))
    for name in ("evergreen_actor_env_steps_total", "evergreen_learner_updates_total", "evergreen_replay_size",
                 "evergreen_replay_inserts_total", "evergreen_replay_samples_total",
                 "evergreen_replay_rate_limiter_blocked_seconds_total", "evergreen_learner_policy_lag_updates",
                 "evergreen_learner_data_wait_ratio", "evergreen_actors", "evergreen_actor_restarts_total",
                 "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert name in text, name


def replay_exported_names() -> set[str]:
    """Metric names a real replay shard exports: the exposition of ShardMetrics over a real table, after
    one request and one error of every kind, so that every labelled family has a sample."""
    import numpy as np

    from replay.metrics import METHODS, ShardMetrics
    from replay.schema import Schema
    from replay.table import Table, TableConfig

    table = Table(TableConfig(name="replay", schema=Schema.parse("x:int64"), capacity=4))
    table.insert({"x": np.arange(2)})
    metrics = ShardMetrics(tables={"replay": table}, shard_index=0)
    for method in METHODS:
        metrics.observe(method, 0.001, "INVALID_ARGUMENT")
    metrics.count_unauthenticated("Insert")
    return set(re.findall(r"^(\w+)", metrics.exposition().decode(), flags=re.M))


def test_replay_names_come_from_the_exporter():
    names = replay_exported_names()
    assert {"evergreen_replay_size", "evergreen_replay_inserts_total", "evergreen_replay_samples_total",
            "evergreen_replay_rate_limiter_blocked_seconds_total", "evergreen_replay_request_duration_seconds_count",
            "evergreen_replay_priority_updates_dropped_total", "evergreen_replay_unauthenticated_calls_total"} <= names
    assert "evergreen_replay_not_a_family" not in names


def test_every_referenced_family_is_exported():
    """Names in dashboards and alerts exist in the exporter's or the replay shard's exposition."""
    from evergreen.agents import DQNBuilder
    from evergreen.telemetry import TelemetryExporter

    exp = TelemetryExporter(run="r", batch_size=8, families=DQNBuilder.telemetry_families)
    rec = {"time": 1.0, "elapsed_s": 1.0, "env_steps": 10, "updates": 1, "episodes": 1, "env_steps_per_s": 1.0,
           "updates_per_s": 1.0, "return_mean_100": 1.0, "return_recent": 1.0, "replay_size": 10,
           "learner_wait_fraction": 0.0, "policy_lag_updates": 0.0, "actor_restarts": 0, "num_actors": 1,
           "loss": 1.0, "td_error": 1.0, "q": 1.0, "grad_norm": 1.0, "lr": 1.0, "redo/units_reset": 0.0}
    for name in ("dormant_ratio", "dead_ratio", "active_units", "weight_norm", "dist_to_init", "effective_lr",
                 "grad_l2", "grad_zero_frac"):
        rec[f"diag/{name}/total"] = 0.5
    for name in ("srank", "effective_rank", "feature_rank", "feature_norm", "feature_var", "churn",
                 "hessian_max_eig", "plasticity_probe/loss", "plasticity_probe/fresh_loss", "plasticity_probe/ratio"):
        rec[f"diag/{name}"] = 0.5
    exp.update(rec, episodes_by_task={"default": {"returns": [1.0], "lengths": [1]}})
    exp.update_evaluation({"pong": {"mean": 1.0, "normalized": 0.6}})  # what a run's evaluations report
    exported = set(re.findall(r"^(\w+)", exp.exposition().decode(), flags=re.M))
    exported |= replay_exported_names()
    exported |= {"up"}
    for where, expr in all_exprs():
        for name in re.findall(r"\b((?:evergreen|process)_\w+)", expr):
            if name == "evergreen_intervention_":  # the regex selector of all intervention gauges
                continue
            assert name in exported or name + "_total" in exported, f"{where}: {name} is not exported"


# -- PromQL and rules with promtool -----------------------------------------------------------------
def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_exprs_sanity_without_promtool():
    """Always runs: balanced brackets and quotes in every expression (promtool parses them below)."""
    for where, expr in all_exprs():
        e = substitute(expr)
        assert e.count('"') % 2 == 0, where
        for o, c in ("()", "{}", "[]"):
            assert e.count(o) == e.count(c), f"{where}: unbalanced {o}{c}"
        assert "$" not in e.replace("$labels", "").replace("$value", ""), f"{where}: unsubstituted variable"


@needs_promtool
def test_every_dashboard_expr_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard-exprs", "rules": [
        {"record": f"evergreen:check:{i}", "expr": substitute(e)} for i, (_, e) in enumerate(all_exprs())]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_exprs())} rules found" in result.stdout


@needs_promtool
def test_promtool_detects_a_broken_expr(tmp_path):
    """The check above can fail: a broken expression is refused."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "evergreen:bad", "expr": "sum by (run (rate(evergreen_actors[1m]))"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


@needs_promtool
def test_prometheus_config_and_rules_check():
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["../../runs/prometheus_targets/*.json"]


def test_alert_names():
    assert [r["alert"] for r in alert_rules()] == [
        "EvergreenDormantRatioHigh", "EvergreenLearnerStarved", "EvergreenNoActorProgress",
        "EvergreenTrainerNoHeartbeat", "EvergreenReplayShardDown", "EvergreenLearnerDown", "EvergreenPolicyLagHigh"]


def alert(name, severity, summary, description=None, **labels):
    out = {"exp_labels": {"alertname": name, "severity": severity, **labels}, "exp_annotations": {"summary": summary}}
    if description:
        out["exp_annotations"]["description"] = description
    return out


@needs_promtool
def test_alert_rules_fire_exactly_when_expected(tmp_path):
    """`promtool test rules` on hand-made series: run a misbehaves, run b is healthy."""
    tests = {
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # a: 0.10 rising by 0.01/min (> 0.25 from minute 16, firing 15 min later); b: 0.5 but flat.
                {"series": 'evergreen_plasticity_dormant_ratio{run="a",layer="total"}', "values": "0.1+0.01x60"},
                {"series": 'evergreen_plasticity_dormant_ratio{run="b",layer="total"}', "values": "0.5x60"},
                {"series": 'evergreen_plasticity_dormant_ratio{run="a",layer="encoder.0"}', "values": "0.9x60"},
                {"series": 'evergreen_learner_data_wait_ratio{run="a"}', "values": "0.9x60"},
                {"series": 'evergreen_learner_data_wait_ratio{run="b"}', "values": "0.1x60"},
                # a: steps stop at minute 10; b: steps go on but its actors drop to 0 at minute 11.
                {"series": 'evergreen_actor_env_steps_total{run="a",task="t"}', "values": "0+100x10 1000x50"},
                {"series": 'evergreen_actors{run="a"}', "values": "2x60"},
                {"series": 'evergreen_actor_env_steps_total{run="b",task="t"}', "values": "0+100x60"},
                {"series": 'evergreen_actors{run="b"}', "values": "2x10 0x50"},
                # a: the last record is written at t=180 s; b: a record every minute.
                {"series": 'evergreen_run_last_record_timestamp_seconds{run="a"}', "values": "0+60x3 180x57"},
                {"series": 'evergreen_run_last_record_timestamp_seconds{run="b"}', "values": "0+60x60"},
                {"series": 'up{job="evergreen-replay",run="a",shard="0",instance="h:1"}', "values": "1x5 0x55"},
                {"series": 'up{job="evergreen-replay",run="a",shard="1",instance="h:2"}', "values": "1x60"},
                {"series": 'up{job="evergreen-learner",run="a",instance="h:0"}', "values": "1x60"},
                {"series": 'evergreen_learner_policy_lag_updates{run="a"}', "values": "5000x60"},
                {"series": 'evergreen_learner_policy_lag_updates{run="b"}', "values": "10x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "EvergreenDormantRatioHigh", "exp_alerts": []},  # pending
                {"eval_time": "35m", "alertname": "EvergreenDormantRatioHigh", "exp_alerts": [
                    alert("EvergreenDormantRatioHigh", "warning", "Run a: dormant ratio 45% and rising",
                          "More than 25% of hidden units are dormant; consider redo/reset interventions.",
                          run="a", layer="total")]},
                {"eval_time": "4m", "alertname": "EvergreenLearnerStarved", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "EvergreenLearnerStarved", "exp_alerts": [
                    alert("EvergreenLearnerStarved", "warning", "Run a: learner waits for replay data 90% of the time",
                          "Actors or replay cannot keep up with the learner; add actors or check the rate limiter.",
                          run="a")]},
                {"eval_time": "12m", "alertname": "EvergreenNoActorProgress", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "EvergreenNoActorProgress", "exp_alerts": [
                    alert("EvergreenNoActorProgress", "critical", "Run a: no actor progress for 5 minutes",
                          "Environment steps are not increasing (or no actors are running).", run="a"),
                    alert("EvergreenNoActorProgress", "critical", "Run b: no actor progress for 5 minutes",
                          "Environment steps are not increasing (or no actors are running).", run="b")]},
                {"eval_time": "9m", "alertname": "EvergreenTrainerNoHeartbeat", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "EvergreenTrainerNoHeartbeat", "exp_alerts": [
                    alert("EvergreenTrainerNoHeartbeat", "critical", "Run a: no metrics record for 9m 0s", run="a")]},
                {"eval_time": "6m", "alertname": "EvergreenReplayShardDown", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "EvergreenReplayShardDown", "exp_alerts": [
                    alert("EvergreenReplayShardDown", "critical", "Run a: replay shard 0 (h:1) is down",
                          job="evergreen-replay", run="a", shard="0", instance="h:1")]},
                {"eval_time": "10m", "alertname": "EvergreenLearnerDown", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "EvergreenPolicyLagHigh", "exp_alerts": [
                    alert("EvergreenPolicyLagHigh", "warning", "Run a: policy lag 5000 updates",
                          "Actors pull weights too rarely or are too slow; check weight publishing.", run="a")]},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
