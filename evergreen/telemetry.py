"""Prometheus telemetry of a training run: the trainer's per-interval record, served on ``/metrics``.

    exporter = TelemetryExporter(run="cartpole-20261121-193000", task="CartPole-v1", batch_size=64)
    port = exporter.start()                              # GET http://127.0.0.1:<port>/metrics
    write_targets(run_dir, {"learner": port, "replay": [shard.metrics_port for shard in shards]})
    ...
    exporter.update(record, episodes_by_task={"CartPole-v1": {"returns": [21.0], "lengths": [21]}},
                    env_steps_by_task={"CartPole-v1": 4096}, task_switch=None)
    ...
    exporter.stop()

``update`` takes the flat metrics.jsonl record (see ``evergreen.train.Trainer._record``). The whole
update is validated before anything changes, so a bad record raises ``ValueError`` and the exported
state stays as it was. Every family carries ``run``; labels are bounded (``task``, ``layer``,
``intervention``, ``event``; never actor ids or pids).

Families (counters are set from the trainer's cumulative values; ``None`` values remove a gauge's
series until a value comes again, so a diverged loss is never shown as its last finite value):

    evergreen_learner_updates_total                  counter   record ``updates``
    evergreen_learner_samples_total                  counter   updates * batch_size (only with batch_size)
    evergreen_learner_loss                           gauge     ``loss`` (interval mean)
    <the algorithm's own families>                   gauge     e.g. DQN: ``td_error`` -> evergreen_learner_td_error,
                                                               ``q`` -> evergreen_learner_q_value_mean (``families=``)
    evergreen_learner_grad_norm                      gauge     ``grad_norm``
    evergreen_learner_learning_rate                  gauge     ``lr``
    evergreen_learner_dropped_batches_total          counter   ``dropped_batches`` (invalid batches refused)
    evergreen_learner_updates_per_second             gauge     ``updates_per_s``
    evergreen_learner_samples_per_second             gauge     updates_per_s * batch_size (only with batch_size)
    evergreen_learner_data_wait_ratio                gauge     ``learner_wait_fraction`` (0..1)
    evergreen_learner_policy_lag_updates             gauge     ``policy_lag_updates``
    evergreen_learner_replay_size                    gauge     ``replay_size`` (items, all shards, as the learner sees it)
    evergreen_learner_<key>                          gauge     any other top-level numeric key (sanitized, below)
    evergreen_actor_env_steps_total{task}            counter   see "tasks" below
    evergreen_actor_episodes_total{task}             counter
    evergreen_actor_episode_return{task}             histogram returns of finished episodes (episodes_by_task)
    evergreen_actor_episode_length_steps{task}       histogram lengths of finished episodes, in env steps
    evergreen_actor_env_steps_per_second             gauge     ``env_steps_per_s``
    evergreen_actor_return_mean_100                  gauge     ``return_mean_100``
    evergreen_actor_return_recent                    gauge     ``return_recent``
    evergreen_actor_restarts_total                   counter   ``actor_restarts``
    evergreen_actors                                 gauge     ``num_actors``
    evergreen_run_elapsed_seconds                    gauge     ``elapsed_s``
    evergreen_run_last_record_timestamp_seconds      gauge     ``time`` (the trainer's heartbeat)
    evergreen_task_info{task}                        gauge     1 for the current task, 0 for earlier ones
    evergreen_task_start_timestamp_seconds{task}     gauge     record ``time`` when the run switched to task
    evergreen_task_switches_total                    counter
    evergreen_plasticity_<diagnostic>{layer}         gauge     ``diag/<name>`` and ``diag/<name>/<layer>``
                                                               (several networks: ``{network,layer}`` from
                                                               ``diag/<network>/<name>/<layer>``)
    evergreen_intervention_<metric>{intervention}    gauge     ``<intervention>/<metric>`` (several networks:
                                                               ``{intervention,network}`` from
                                                               ``<intervention>/<network>/<metric>``)
    evergreen_intervention_events_total{intervention,event}   counter (event metrics, below)

Rules:

* **Plasticity layer label.** Every ``evergreen_plasticity_*`` series has a ``layer`` label;
  ``layer="total"`` is the whole network: the pooled ``diag/<name>/total`` of per-layer diagnostics
  and the only value of network-level ones (``diag/srank`` -> ``{layer="total"}``). Names are
  mapped to Prometheus conventions by ``DIAGNOSTIC_NAMES`` (``active_units`` -> ``active_units_ratio``,
  ``effective_lr`` -> ``effective_learning_rate``, ``grad_l2`` -> ``grad_l2_norm``, ...);
  ``plasticity_probe/<loss|fresh_loss|ratio>`` are network-level metrics, not layers
  (``evergreen_plasticity_probe_loss``, ``..._probe_fresh_loss``, ``..._probe_loss_ratio``).
* **Interventions.** ``<intervention>/<metric>`` becomes the gauge ``evergreen_intervention_<metric>
  {intervention=...}`` (a ``_fraction``/``_frac`` suffix becomes ``_ratio``). A metric whose last
  ``_``-separated word is one of ``EVENT_WORDS`` (``units_reset``, ``injections``, ``layers_scaled``,
  ...) is also an *event*: ``evergreen_intervention_events_total{intervention,event=<metric>}``
  counts the log intervals in which it was > 0. The trainer averages per-update metrics over the
  interval, so the number of triggers inside one interval is not recoverable; intervals are what
  the dashboards annotate. The series starts at 0 the first time the metric is seen at 0, so that
  ``increase()`` sees the first event. Event metrics must be per-update amounts, not running totals.
* **Tasks.** The current task starts as ``task`` (constructor) and changes with ``task_switch`` (the
  argument, or a record ``task_switch`` field) or a record ``task`` field that differs. With
  ``env_steps_by_task`` (cumulative per task) the per-task counters follow it exactly; without it, the growth of the record's ``env_steps`` (and
  ``episodes``, unless ``episodes_by_task`` is given) since the previous update is added to the task
  that was current before this update's switch. ``episodes_by_task`` holds the episodes finished since
  the previous call; without it the histograms get nothing (the record only has means).
* **Unknown keys.** A top-level key outside the contract becomes ``evergreen_learner_<key>``; a
  ``diag/...`` key with an unknown name ``evergreen_plasticity_<name>``. ``<key>`` is sanitized:
  lower case, every run of characters outside ``[a-z0-9_]`` becomes ``_``. Non-numeric values
  (other than ``task``) are refused with ``ValueError``, as are two keys that sanitize to one series.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

#: Episode-return bucket upper bounds: Pong (-21..21), CartPole (195 / 475 thresholds, 500 cap) and
#: the wide range of other Atari scores (Breakout hundreds, Space Invaders thousands, up to 1e5).
RETURN_BUCKETS = (-100.0, -21.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 21.0, 50.0, 100.0,
                  195.0, 200.0, 300.0, 400.0, 475.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0,
                  50000.0, 100000.0)
#: Episode-length buckets in env steps: CartPole caps at 500, Atari at 108,000 frames = 27,000 steps.
LENGTH_BUCKETS = (10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
                  27000.0, 50000.0, 108000.0)

#: Diagnostic name (``diag/<name>...``) -> family suffix after ``evergreen_plasticity_``.
DIAGNOSTIC_NAMES = {
    "dormant_ratio": "dormant_ratio",
    "dead_ratio": "dead_ratio",
    "active_units": "active_units_ratio",
    "saturated_units": "saturated_units_ratio",
    "srank": "srank",
    "effective_rank": "effective_rank",
    "feature_rank": "feature_rank",
    "feature_norm": "feature_norm",
    "feature_var": "feature_variance",
    "weight_norm": "weight_norm",
    "dist_to_init": "distance_to_init",
    "effective_lr": "effective_learning_rate",
    "grad_l1": "grad_l1_norm",
    "grad_l2": "grad_l2_norm",
    "grad_norm_l1": "grad_l1_norm",
    "grad_norm_l2": "grad_l2_norm",
    "grad_zero_frac": "grad_zero_ratio",
    "churn": "churn_ratio",
    "policy_entropy": "policy_entropy_nats",
    "hessian_max_eig": "hessian_max_eigenvalue",
    "grad_interference": "grad_interference",
}
#: Diagnostics whose second path part is a metric of the whole network rather than a layer.
DIAGNOSTIC_SUBMETRICS = {
    ("plasticity_probe", "loss"): "probe_loss",
    ("plasticity_probe", "fresh_loss"): "probe_fresh_loss",
    ("plasticity_probe", "ratio"): "probe_loss_ratio",
}
#: Last word of an intervention metric that makes it an event (see the module docstring).
EVENT_WORDS = frozenset({"reset", "resets", "injection", "injections", "injected", "replaced", "perturbed",
                         "scaled", "events", "switches"})

# record key -> (family, help, kind); kind: "gauge" or "counter" (cumulative value).
_FIXED = {
    "updates": ("evergreen_learner_updates", "Learner updates (optimizer steps), cumulative.", "counter"),
    "loss": ("evergreen_learner_loss", "Learner loss, mean over the log interval.", "gauge"),
    "grad_norm": ("evergreen_learner_grad_norm", "Gradient L2 norm, mean over the log interval.", "gauge"),
    "lr": ("evergreen_learner_learning_rate", "Optimizer learning rate.", "gauge"),
    "dropped_batches": ("evergreen_learner_dropped_batches", "Sampled batches the learner refused as invalid "
                        "(dropped, not trained on), cumulative.", "counter"),
    "updates_per_s": ("evergreen_learner_updates_per_second", "Learner updates per second over the interval.",
                      "gauge"),
    "learner_wait_fraction": ("evergreen_learner_data_wait_ratio",
                              "Fraction of wall time the learner waited for replay data (0..1).", "gauge"),
    "policy_lag_updates": ("evergreen_learner_policy_lag_updates",
                           "Mean age, in learner updates, of the policy that produced sampled transitions.",
                           "gauge"),
    "replay_size": ("evergreen_learner_replay_size", "Items in replay, all shards, as reported to the learner.",
                    "gauge"),
    "env_steps_per_s": ("evergreen_actor_env_steps_per_second", "Environment steps per second, all actors.",
                        "gauge"),
    "return_mean_100": ("evergreen_actor_return_mean_100", "Mean return of the last 100 episodes.", "gauge"),
    "return_recent": ("evergreen_actor_return_recent", "Mean return of the episodes finished in the interval.",
                      "gauge"),
    "actor_restarts": ("evergreen_actor_restarts", "Actor restarts after crashes, cumulative.", "counter"),
    "num_actors": ("evergreen_actors", "Actors currently running.", "gauge"),
    "elapsed_s": ("evergreen_run_elapsed_seconds", "Training wall time, resumed runs included.", "gauge"),
    "time": ("evergreen_run_last_record_timestamp_seconds",
             "Unix time of the trainer's last metrics record (its heartbeat).", "gauge"),
}
# Record keys handled by the task/actor bookkeeping rather than as plain families.
_SPECIAL = {"env_steps", "episodes", "task", "task_switch", "task_switch_metrics"}

_ENV_STEPS = "evergreen_actor_env_steps"
_EPISODES = "evergreen_actor_episodes"
_RETURN_HIST = "evergreen_actor_episode_return"
_LENGTH_HIST = "evergreen_actor_episode_length_steps"
_TASK_INFO = "evergreen_task_info"
_TASK_START = "evergreen_task_start_timestamp_seconds"
_TASK_SWITCHES = "evergreen_task_switches"
_EVENTS = "evergreen_intervention_events"
_SAMPLES = "evergreen_learner_samples"
_SAMPLES_PER_S = "evergreen_learner_samples_per_second"

_NAME_OK = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def sanitize(name: str) -> str:
    """A metric-name fragment from a record key: lower case, runs of other characters -> ``_``.

    >>> sanitize("Loss/Aux-1")
    'loss_aux_1'
    """
    out = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    out = re.sub(r"_+", "_", out)
    if not out:
        raise ValueError(f"metric key {name!r} has no usable characters; expected letters, digits or _")
    return out


def _ratio_suffix(metric: str) -> str:
    return re.sub(r"_(fraction|frac)$", "_ratio", metric)


@dataclass
class _Family:
    name: str
    help: str
    kind: str  # "gauge" | "counter"
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float] = field(default_factory=dict)


@dataclass
class _Hist:
    counts: np.ndarray  # per bucket (not cumulative), len(bounds) + 1 (the last is +Inf)
    total: float


@dataclass
class _State:
    families: dict[str, _Family]
    hists: dict[str, dict[str, _Hist]]
    task: str
    tasks_seen: tuple[str, ...]
    last_env_steps: int
    last_episodes: int
    sources: dict[tuple[str, tuple[str, ...]], str]  # (family, labels) -> record key, for collisions

    def copy(self) -> _State:
        return _State(
            families={k: _Family(f.name, f.help, f.kind, f.labels, dict(f.values)) for k, f in self.families.items()},
            hists={k: dict(v) for k, v in self.hists.items()},
            task=self.task, tasks_seen=self.tasks_seen, last_env_steps=self.last_env_steps,
            last_episodes=self.last_episodes, sources=dict(self.sources),
        )


def _number(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    raise ValueError(f"metrics record key {key!r} has value {value!r} ({type(value).__name__}); "
                     f"expected a number or None")


class _RunCollector(Collector):
    def __init__(self, exporter: TelemetryExporter):
        self._exporter = exporter

    def describe(self):
        return []

    def collect(self):
        yield from self._exporter._collect()


class TelemetryExporter:
    """Serves one run's metrics on its own registry (with process and platform metrics).

    Thread-safe: ``update`` from the training loop, scrapes from the HTTP server's thread. See the
    module docstring for the families and rules.
    """

    def __init__(self, *, run: str, port: int = 0, host: str = "127.0.0.1", task: str = "default",
                 batch_size: int | None = None, return_buckets: Sequence[float] = RETURN_BUCKETS,
                 length_buckets: Sequence[float] = LENGTH_BUCKETS, families: Mapping[str, Any] | None = None,
                 networks: Sequence[str] = ()):
        if not isinstance(run, str) or not run:
            raise ValueError(f"run={run!r}: expected a non-empty string (the run directory's name)")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task={task!r}: expected a non-empty string")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: expected an int in 0..65535 (0 = a free port)")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int or None")
        self.run, self.host, self.batch_size = run, host, batch_size
        # An algorithm with several networks (SAC: actor, critic) prefixes its diagnostics and intervention
        # metrics with the network (diag/critic/..., redo/critic/...): those series get a ``network`` label.
        if isinstance(networks, str) or not all(isinstance(n, str) and n for n in networks):
            raise ValueError(f"networks={networks!r}: expected a sequence of network names")
        self._networks = tuple(networks) if len(networks) > 1 else ()
        # The algorithm's own metrics (an agent builder's telemetry_families: key -> family, help, kind).
        self._fixed = dict(_FIXED)
        for key, spec in (families or {}).items():
            if not _NAME_OK.match(spec.family) or spec.kind not in ("gauge", "counter"):
                raise ValueError(f"telemetry family for {key!r}: {spec!r}; expected a valid metric name and "
                                 f"kind 'gauge' or 'counter'")
            self._fixed[key] = (spec.family, spec.help, spec.kind)
        self._requested_port = port
        self._bounds = {_RETURN_HIST: self._check_buckets("return_buckets", return_buckets),
                        _LENGTH_HIST: self._check_buckets("length_buckets", length_buckets)}
        self._lock = threading.Lock()
        families = {
            _ENV_STEPS: _Family(_ENV_STEPS, "Environment steps taken by all actors, per task.", "counter",
                                ("run", "task")),
            _EPISODES: _Family(_EPISODES, "Episodes finished by all actors, per task.", "counter", ("run", "task")),
            _TASK_INFO: _Family(_TASK_INFO, "1 for the task the run is training on now, 0 for earlier tasks.",
                                "gauge", ("run", "task")),
            _TASK_START: _Family(_TASK_START, "Unix time at which the run switched to the task.", "gauge",
                                 ("run", "task")),
            _TASK_SWITCHES: _Family(_TASK_SWITCHES, "Task switches.", "counter", ("run",)),
            _EVENTS: _Family(_EVENTS, "Log intervals in which an intervention acted (event metric > 0).",
                             "counter", ("run", "intervention", "event")),
        }
        # Pre-created at 0 so that rate()/increase() see the first increment.
        families[_ENV_STEPS].values[(run, task)] = 0.0
        families[_EPISODES].values[(run, task)] = 0.0
        families[_TASK_INFO].values[(run, task)] = 1.0
        families[_TASK_SWITCHES].values[(run,)] = 0.0
        self._state = _State(families=families, hists={_RETURN_HIST: {}, _LENGTH_HIST: {}}, task=task,
                             tasks_seen=(task,), last_env_steps=0, last_episodes=0, sources={})
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RunCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._http = None
        self._http_thread: threading.Thread | None = None
        self.port: int | None = None

    @staticmethod
    def _check_buckets(name: str, buckets: Sequence[float]) -> np.ndarray:
        b = np.asarray(list(buckets), dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)) or np.any(np.diff(b) <= 0):
            raise ValueError(f"{name}={list(buckets)!r}: expected finite, strictly increasing upper bounds")
        return b

    # -- HTTP ---------------------------------------------------------------------------------------
    def start(self) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; return the bound port."""
        if self._http is not None:
            raise RuntimeError(f"telemetry exporter already serving on port {self.port}")
        self._http, self._http_thread = start_http_server(self._requested_port, addr=self.host,
                                                          registry=self.registry)
        self.port = int(self._http.server_address[1])
        return self.port

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http, self._http_thread = None, None

    def exposition(self) -> bytes:
        """What ``/metrics`` serves, without HTTP."""
        return generate_latest(self.registry)

    @property
    def task(self) -> str:
        """The current task label."""
        return self._state.task

    # -- updates ------------------------------------------------------------------------------------
    def update(self, record: Mapping[str, Any], *, episodes_by_task: Mapping[str, Mapping[str, Sequence]] | None = None,
               env_steps_by_task: Mapping[str, int] | None = None, task_switch: str | None = None) -> None:
        """Apply one metrics record (all or nothing; ``ValueError`` names what was wrong)."""
        if not isinstance(record, Mapping):
            raise ValueError(f"record={record!r}: expected a dict (one metrics.jsonl record)")
        with self._lock:
            state = self._state.copy()
            self._apply(state, record, episodes_by_task, env_steps_by_task, task_switch)
            self._state = state

    def update_evaluation(self, scores: Mapping[str, Mapping[str, Any]]) -> None:
        """The newest evaluation of every task (``evaluations.jsonl`` scores): ``evergreen_eval_return`` and,
        for Atari, ``evergreen_eval_human_normalized``, labelled by ``task`` (the scenario's tasks: bounded)."""
        with self._lock:
            state = self._state.copy()
            for task, score in scores.items():
                if not isinstance(task, str) or not task:
                    raise ValueError(f"evaluation task {task!r}: expected a non-empty task name")
                labels = (self.run, task)
                self._set_gauge(state, "evergreen_eval_return", "Mean return of the latest evaluation, per task.",
                                ("run", "task"), labels, _number("eval mean", score.get("mean")), f"eval/{task}")
                normalized = score.get("normalized")
                if normalized is not None:
                    self._set_gauge(state, "evergreen_eval_human_normalized",
                                    "Human-normalized mean return of the latest evaluation (Atari), per task.",
                                    ("run", "task"), labels, _number("eval normalized", normalized),
                                    f"eval/{task}/normalized")
            self._state = state

    def _apply(self, s: _State, record, episodes_by_task, env_steps_by_task, task_switch) -> None:
        run = self.run
        now = _number("time", record.get("time"))
        # Tasks first: the interval's growth goes to the task current before the switch.
        previous_task = s.task
        new_task = next((t for t in (task_switch, record.get("task_switch"), record.get("task")) if t is not None),
                        None)
        if new_task is not None and (not isinstance(new_task, str) or not new_task):
            raise ValueError(f"task switch {new_task!r}: expected a non-empty task name")

        self._count_steps(s, record, env_steps_by_task, previous_task)
        self._count_episodes(s, record, episodes_by_task, previous_task)

        for key, value in record.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metrics record key {key!r}: expected a non-empty string")
            if key in _SPECIAL:
                continue
            if key in self._fixed:
                family, help_text, kind = self._fixed[key]
                number = _number(key, value)
                if kind == "counter":
                    self._set_counter(s, family, help_text, (run,), number, key, labelnames=("run",))
                else:
                    self._set_gauge(s, family, help_text, ("run",), (run,), number, key)
                continue
            number = _number(key, value)
            family, help_text, labelnames, labels = self._dynamic(key)
            self._set_gauge(s, family, help_text, labelnames, labels, number, key)
            if labelnames[:2] == ("run", "intervention"):  # with a network: its event reads "critic_units_reset"
                self._count_event(s, key, labels[1], number)

        if self.batch_size is not None:
            updates = _number("updates", record.get("updates"))
            if updates is not None:
                self._set_counter(s, _SAMPLES, "Transitions sampled by the learner (updates * batch size).",
                                  (run,), updates * self.batch_size, "updates", labelnames=("run",))
            ups = _number("updates_per_s", record.get("updates_per_s"))
            self._set_gauge(s, _SAMPLES_PER_S, "Transitions sampled per second (updates/s * batch size).",
                            ("run",), (run,), None if ups is None else ups * self.batch_size, "updates_per_s")

        if new_task is not None and new_task != previous_task:
            s.task = new_task
            info = s.families[_TASK_INFO].values
            for t in s.tasks_seen:
                info[(run, t)] = 0.0
            info[(run, new_task)] = 1.0
            if new_task not in s.tasks_seen:
                s.tasks_seen = (*s.tasks_seen, new_task)
            s.families[_TASK_SWITCHES].values[(run,)] += 1.0
            if now is not None:
                s.families[_TASK_START].values[(run, new_task)] = now
            s.families[_ENV_STEPS].values.setdefault((run, new_task), 0.0)
            s.families[_EPISODES].values.setdefault((run, new_task), 0.0)
        elif now is not None and (run, s.task) not in s.families[_TASK_START].values:
            s.families[_TASK_START].values[(run, s.task)] = now

    def _dynamic(self, key: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
        run = self.run
        parts = key.split("/")
        if len(parts) == 1:
            return (f"evergreen_learner_{sanitize(key)}", f"Learner metric {key!r} (not in the record contract).",
                    ("run",), (run,))
        if parts[0] == "diag":
            network, parts = self._network_of(parts, at=1)
            if len(parts) < 2 or not parts[1]:
                raise ValueError(f"metrics record key {key!r}: expected diag/<name> or diag/<name>/<layer>"
                                 + (f" (after a network of {list(self._networks)})" if self._networks else ""))
            name, rest = parts[1], "/".join(parts[2:])
            sub = DIAGNOSTIC_SUBMETRICS.get((name, rest))
            if sub is not None:
                suffix, layer = sub, "total"
            else:
                suffix, layer = DIAGNOSTIC_NAMES.get(name) or sanitize(name), rest or "total"
            labelnames, labels = (("run", "network", "layer"), (run, network, layer)) if self._networks \
                else (("run", "layer"), (run, layer))
            return (f"evergreen_plasticity_{suffix}", f"Plasticity diagnostic {name!r} (record key diag/{name}/...).",
                    labelnames, labels)
        network, parts = self._network_of(parts, at=1)
        intervention, metric = parts[0], "/".join(parts[1:])
        if not metric:
            raise ValueError(f"metrics record key {key!r}: expected <intervention>/<metric>")
        name = f"evergreen_intervention_{_ratio_suffix(sanitize(metric))}"
        labelnames, labels = (("run", "intervention", "network"), (run, intervention, network)) if self._networks \
            else (("run", "intervention"), (run, intervention))
        return (name, f"Intervention metric {metric!r} (record key <intervention>/{metric}).", labelnames, labels)

    def _network_of(self, parts: list[str], *, at: int) -> tuple[str, list[str]]:
        """With several networks: the network named at ``parts[at]`` ("" if none is) and the parts without it."""
        if self._networks and len(parts) > at + 1 and parts[at] in self._networks:
            return parts[at], parts[:at] + parts[at + 1:]
        return "", parts

    def _claim(self, s: _State, family: str, labels: tuple[str, ...], key: str) -> None:
        owner = s.sources.setdefault((family, labels), key)
        if owner != key:
            raise ValueError(f"metrics record keys {owner!r} and {key!r} both map to {family}{list(labels)}; "
                             f"rename one of them")

    def _family(self, s: _State, name: str, help_text: str, kind: str, labelnames: tuple[str, ...]) -> _Family:
        fam = s.families.get(name)
        if fam is None:
            clash = name[:-len("_total")] if name.endswith("_total") else name + "_total"
            other = s.families.get(clash)
            if other is not None or not _NAME_OK.match(name):
                raise ValueError(f"metric family {name!r} clashes with {clash!r} or is not a valid name")
            fam = s.families[name] = _Family(name, help_text, kind, labelnames)
        elif fam.kind != kind or fam.labels != labelnames:
            raise ValueError(f"metric family {name!r} is already a {fam.kind} with labels {fam.labels}; "
                             f"cannot reuse it as a {kind} with labels {labelnames}")
        return fam

    def _set_gauge(self, s, name, help_text, labelnames, labels, value, key) -> None:
        fam = self._family(s, name, help_text, "gauge", labelnames)
        self._claim(s, name, labels, key)
        if value is None:
            fam.values.pop(labels, None)
        else:
            fam.values[labels] = value

    def _set_counter(self, s, name, help_text, labels, value, key, *, labelnames) -> None:
        fam = self._family(s, name, help_text, "counter", labelnames)
        self._claim(s, name, labels, key)
        if value is None:
            return
        old = fam.values.get(labels, 0.0)
        if not math.isfinite(value) or value < old:
            raise ValueError(f"metrics record key {key!r}={value!r}: expected a finite cumulative count "
                             f">= the previous {old!r}")
        fam.values[labels] = value

    def _count_event(self, s: _State, key: str, intervention: str, value: float | None) -> None:
        event = _ratio_suffix(sanitize(key.split("/", 1)[1]))
        if event.rsplit("_", 1)[-1] not in EVENT_WORDS or value is None or math.isnan(value):
            return
        series = s.families[_EVENTS].values
        labels = (self.run, intervention, event)
        series[labels] = series.get(labels, 0.0) + (1.0 if value > 0 else 0.0)

    def _count_steps(self, s: _State, record, env_steps_by_task, task: str) -> None:
        steps = s.families[_ENV_STEPS].values
        env_steps = _number("env_steps", record.get("env_steps"))
        if env_steps is not None and (not math.isfinite(env_steps) or env_steps < s.last_env_steps):
            raise ValueError(f"metrics record env_steps={env_steps!r}: expected a cumulative count >= "
                             f"the previous {s.last_env_steps}")
        if env_steps_by_task is not None:
            if not isinstance(env_steps_by_task, Mapping):
                raise ValueError(f"env_steps_by_task={env_steps_by_task!r}: expected {{task: cumulative steps}}")
            for t, v in env_steps_by_task.items():
                n = _number(f"env_steps_by_task[{t!r}]", v)
                old = steps.get((self.run, t), 0.0)
                if not isinstance(t, str) or not t or n is None or not math.isfinite(n) or n < old:
                    raise ValueError(f"env_steps_by_task[{t!r}]={v!r}: expected a task name and a cumulative "
                                     f"step count >= the previous {old!r}")
                steps[(self.run, t)] = n
                self._add_task_series(s, t)
        elif env_steps is not None:
            steps[(self.run, task)] = steps.get((self.run, task), 0.0) + (env_steps - s.last_env_steps)
        if env_steps is not None:
            s.last_env_steps = int(env_steps)

    def _count_episodes(self, s: _State, record, episodes_by_task, task: str) -> None:
        episodes = _number("episodes", record.get("episodes"))
        if episodes is not None and (not math.isfinite(episodes) or episodes < s.last_episodes):
            raise ValueError(f"metrics record episodes={episodes!r}: expected a cumulative count >= "
                             f"the previous {s.last_episodes}")
        counts = s.families[_EPISODES].values
        if episodes_by_task is not None:
            if not isinstance(episodes_by_task, Mapping):
                raise ValueError(f"episodes_by_task={episodes_by_task!r}: expected "
                                 f"{{task: {{'returns': [...], 'lengths': [...]}}}}")
            for t, stats in episodes_by_task.items():
                returns, lengths = self._episode_arrays(t, stats)
                counts[(self.run, t)] = counts.get((self.run, t), 0.0) + returns.size
                self._observe(s, _RETURN_HIST, t, returns)
                self._observe(s, _LENGTH_HIST, t, lengths)
                self._add_task_series(s, t)
        elif episodes is not None:
            counts[(self.run, task)] = counts.get((self.run, task), 0.0) + (episodes - s.last_episodes)
        if episodes is not None:
            s.last_episodes = int(episodes)

    def _add_task_series(self, s: _State, task: str) -> None:
        s.families[_ENV_STEPS].values.setdefault((self.run, task), 0.0)
        s.families[_EPISODES].values.setdefault((self.run, task), 0.0)

    @staticmethod
    def _episode_arrays(task: Any, stats: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(task, str) or not task or not isinstance(stats, Mapping) \
                or set(stats) - {"returns", "lengths"}:
            raise ValueError(f"episodes_by_task[{task!r}]={stats!r}: expected a task name mapped to "
                             f"{{'returns': [...], 'lengths': [...]}}")
        try:
            returns = np.asarray(stats.get("returns", ()), dtype=np.float64).reshape(-1)
            lengths = np.asarray(stats.get("lengths", ()), dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"episodes_by_task[{task!r}]: returns and lengths must be numbers ({exc})") from None
        if returns.size != lengths.size or not np.all(np.isfinite(returns)) or not np.all(np.isfinite(lengths)) \
                or np.any(lengths < 0):
            raise ValueError(f"episodes_by_task[{task!r}]: expected as many finite returns as non-negative "
                             f"lengths, got {returns.tolist()!r} and {lengths.tolist()!r}")
        return returns, lengths

    def _observe(self, s: _State, name: str, task: str, values: np.ndarray) -> None:
        bounds = self._bounds[name]
        old = s.hists[name].get(task) or _Hist(np.zeros(bounds.size + 1, dtype=np.int64), 0.0)
        # searchsorted 'left': a value equal to a bound falls in that bound's bucket (Prometheus "le").
        add = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=bounds.size + 1)
        s.hists[name][task] = _Hist(old.counts + add, old.total + float(values.sum()))

    # -- scrape -------------------------------------------------------------------------------------
    def _collect(self) -> Iterable:
        with self._lock:
            state = self._state  # replaced, never mutated, after construction: safe to read unlocked below
        for fam in state.families.values():
            if not fam.values:
                continue
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            out = cls(fam.name, fam.help, labels=list(fam.labels))
            for labels, value in sorted(fam.values.items()):
                out.add_metric(list(labels), value)
            yield out
        for name, help_text in ((_RETURN_HIST, "Returns of finished episodes, per task."),
                                (_LENGTH_HIST, "Lengths of finished episodes in env steps, per task.")):
            out = HistogramMetricFamily(name, help_text, labels=["run", "task"])
            bounds = self._bounds[name]
            for task, hist in sorted(state.hists[name].items()):
                cumulative = np.cumsum(hist.counts)
                buckets = [(_fmt(b), int(c)) for b, c in zip(bounds, cumulative[:-1], strict=True)]
                buckets.append(("+Inf", int(cumulative[-1])))
                out.add_metric([self.run, task], buckets, hist.total)
                if bounds[0] < 0:
                    # prometheus_client leaves out _sum/_count when a bucket bound is negative (an
                    # OpenMetrics rule for sums that may decrease); the mean return needs them, and
                    # Prometheus accepts them, so they are added here.
                    labels = {"run": self.run, "task": task}
                    out.samples.append(Sample(name + "_count", labels, float(cumulative[-1]), None, None))
                    out.samples.append(Sample(name + "_sum", labels, hist.total, None, None))
            yield out


def _fmt(bound: float) -> str:
    return repr(float(bound))


def write_targets(run_dir: str | os.PathLike, ports: Mapping[str, int | Sequence[int] | None], *,
                  host: str = "127.0.0.1", hosts: Mapping[str, str | Sequence[str]] | None = None,
                  run: str | None = None, sd_dir: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/prometheus_targets.json`` (Prometheus ``file_sd``) and ``run_dir/ports.json``.

        write_targets("runs/cartpole-1", {"learner": 9400, "replay": [9401, 9402]},
                      sd_dir="runs/prometheus_targets")
        ...
        clear_targets("runs/cartpole-1", sd_dir="runs/prometheus_targets")   # at the end of the run

    Each component becomes target groups labelled ``job="evergreen-<component>"`` and ``run`` (the run
    directory's name unless given); replay ports are listed in shard order and labelled ``shard``.
    Targets are at ``host``, or at ``hosts[component]`` (one host, or one per port: the shards of a
    cluster run live on different nodes), the address Prometheus reaches them at.
    ``file_sd`` globs only the last path element, so ``deploy/prometheus/prometheus.yml`` cannot read
    ``runs/*/prometheus_targets.json``: with ``sd_dir`` the same targets are also written to
    ``sd_dir/<run>.json``, the directory that config watches (``runs/prometheus_targets``).
    Files are replaced atomically, so Prometheus never reads half of one. Returns the run-dir targets path.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r}: no such directory")
    run = run or run_dir.resolve().name
    if not isinstance(ports, Mapping) or not ports:
        raise ValueError(f"ports={ports!r}: expected {{component: port or [ports]}}, e.g. "
                         f"{{'learner': 9400, 'replay': [9401]}}")
    groups: list[dict[str, Any]] = []
    plain: dict[str, Any] = {}
    for component, value in ports.items():
        if not isinstance(component, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", component):
            raise ValueError(f"component {component!r}: expected a lower-case name such as 'learner' or 'replay'")
        if value is None:
            continue
        listed = [value] if isinstance(value, int) else list(value)
        for p in listed:
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
                raise ValueError(f"ports[{component!r}] contains {p!r}: expected ports in 1..65535")
        where = (hosts or {}).get(component, host)
        where = [where] * len(listed) if isinstance(where, str) else list(where)
        if len(where) != len(listed) or not all(isinstance(h, str) and h for h in where):
            raise ValueError(f"hosts[{component!r}] = {where!r}: expected one host name or one per port ({len(listed)})")
        plain[component] = value if isinstance(value, int) else listed
        labels = {"job": f"evergreen-{component}", "run": run}
        if isinstance(value, int):
            groups.append({"targets": [f"{where[0]}:{value}"], "labels": labels})
        else:
            groups.extend({"targets": [f"{h}:{p}"], "labels": {**labels, "shard": str(i)}}
                          for i, (h, p) in enumerate(zip(where, listed, strict=True)))
    targets = run_dir / "prometheus_targets.json"
    text = json.dumps(groups, indent=2) + "\n"
    if sd_dir is not None:
        Path(sd_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "ports.json", json.dumps(plain, indent=2, sort_keys=True) + "\n")
    _atomic_write(targets, text)
    if sd_dir is not None:
        _atomic_write(Path(sd_dir) / f"{run}.json", text)
    return targets


def clear_targets(run_dir: str | os.PathLike, *, sd_dir: str | os.PathLike, run: str | None = None) -> bool:
    """Remove ``sd_dir/<run>.json`` so that Prometheus stops scraping a finished run (no false "down"
    alerts); the run directory's own copy stays as a record. Returns whether a file was removed."""
    name = run or Path(run_dir).resolve().name
    path = Path(sd_dir) / f"{name}.json"
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
