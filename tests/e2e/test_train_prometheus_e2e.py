"""A real short training job scraped by a real Prometheus, with the project's scrape config.

`evergreen train` (Ray actors, a gRPC replay shard, the learner with interventions and every
diagnostic) runs in this process; it writes its exporters' addresses to
``runs_dir/prometheus_targets/<run>.json``, which the Prometheus fixture watches (file_sd, as in
deploy/prometheus/prometheus.yml). A checker thread waits until the learner, the replay shard and
the actors' statistics have been scraped, checks families and labels through the HTTP API, runs
every dashboard and alert expression, and then stops the run.

Every dashboard panel query must return series. Expressions that are conditions by design return
nothing on a healthy run without task switches: the alert rules (they must parse) and the
annotations ``... > 0`` for task switches and intervention events (they must parse; the
fed-exporter test in test_prometheus_e2e.py makes each of them return series).
"""

from __future__ import annotations

import threading
import time

import pytest

from evergreen.config import load_config
from evergreen.train import Trainer
from tests.e2e.conftest import dashboard_and_alert_exprs, query, wait_for

pytestmark = pytest.mark.e2e

CONDITIONAL = ("alert ", "plasticity: annotation Task switches", "system: annotation Task switches",
               "plasticity: annotation Intervention events",
               "plasticity: Human-normalized evaluation (Atari)")  # CartPole has no human reference score


def test_training_job_metrics_reach_prometheus_and_every_dashboard_query_returns_data(tmp_path, prometheus):
    port, sd_dir = prometheus
    runs_dir = sd_dir.parent
    config = load_config(preset="cartpole", overrides={
        "runs_dir": str(runs_dir),
        "replay": {"capacity": 5000, "min_size_to_sample": 200, "samples_per_insert": 8.0},
        "learner": {"total_env_steps": 10**7, "stop_at_return": None, "log_every_s": 1.0},
        "dqn": {"compile": False},  # the compiled update has its own tests; here it would only add minutes
        "evaluation": {"every_env_steps": 1000, "episodes": 2},  # so the evaluation panels have data
        "plasticity": {"interventions": "layer_norm,weight_decay,redo", "options": {"redo": {"period": 20}},
                       "diagnostics": "all", "diagnostics_every": 25},
    }).validate()
    trainer = Trainer(config, run_dir=runs_dir / "e2e-train")
    run = "e2e-train"
    results: dict = {}

    def check() -> None:
        try:
            for family in ("evergreen_learner_updates_total", "evergreen_replay_size",
                           "evergreen_actor_env_steps_total", "evergreen_plasticity_dormant_ratio",
                           "evergreen_plasticity_hessian_max_eigenvalue", "evergreen_actor_episode_return_bucket",
                           "evergreen_intervention_events_total", "evergreen_eval_return"):
                wait_for(lambda f=family: query(port, f'{f}{{run="{run}"}}'), timeout=150, what=family)
            time.sleep(4.0)  # a few more scrapes, so rate() and increase() have two points
            results["layers"] = {r["metric"]["layer"]
                                 for r in query(port, f'evergreen_plasticity_dormant_ratio{{run="{run}"}}')}
            results["tasks"] = {r["metric"]["task"]
                                for r in query(port, f'evergreen_actor_env_steps_total{{run="{run}"}}')}
            results["jobs"] = {(r["metric"]["job"], float(r["value"][1]))
                               for r in query(port, f'up{{run="{run}"}}')}
            results["interventions"] = {r["metric"]["intervention"] for r in query(
                port, f'{{__name__=~"evergreen_intervention_.+", run="{run}"}}')}
            empty = [(where, expr) for where, expr in dashboard_and_alert_exprs()
                     if not where.startswith(CONDITIONAL) and not query(port, expr)]
            # A per-interval gauge (policy lag, data wait) has no value for an interval without learner
            # reports, which a loaded machine makes happen: such a query gets 30 s to show data again.
            results["empty"] = []
            for where, expr in empty:
                try:
                    wait_for(lambda e=expr: query(port, e), timeout=30, what=where)
                except AssertionError:
                    results["empty"].append(where)
            results["conditional"] = [(where, query(port, expr)) for where, expr in dashboard_and_alert_exprs()
                                      if where.startswith(CONDITIONAL)]  # each parses (query() asserts success)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            results["error"] = exc
        finally:
            trainer.request_stop("e2e checks done")

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    summary = trainer.run()
    checker.join(timeout=60)
    if "error" in results:
        raise results["error"]
    assert summary.updates > 0
    assert "total" in results["layers"] and len(results["layers"]) >= 3, results["layers"]
    assert results["tasks"] == {"CartPole-v1"}
    assert results["jobs"] == {("evergreen-learner", 1.0), ("evergreen-replay", 1.0)}
    assert "redo" in results["interventions"], results["interventions"]
    assert results["empty"] == [], f"dashboard queries without data from a real run: {results['empty']}"
    assert len(results["conditional"]) >= 7
