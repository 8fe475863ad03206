"""A run's books: counters, recent returns, the metrics log, progress lines and telemetry.

The trainer feeds it what the actors and the learner report (``add_actor_stats``,
``add_learner_report``) and asks it for a record every ``log_every_s`` (``emit``); the counters it
keeps are what a checkpoint stores beside the learner's state (``checkpoint_extra``) and what a
resumed run starts from (``resume_from``).

    books = Bookkeeping(run_dir, telemetry=exporter, batch_size=128)
    books.resume_from(extra)                       # after the learner restored its checkpoint
    books.add_actor_stats(pool.stats())
    books.add_learner_report(report)               # a learner.service.TrainReport
    books.emit(replay_info=client.info(), pool_stats=stats)   # metrics.jsonl line, progress, /metrics
    learner.checkpoint(books.checkpoint_extra())
    print(books.summary(stopped_by="solved").format())
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Summary:
    run_dir: str
    env_steps: int
    updates: int
    episodes: int
    wall_seconds: float
    mean_return_100: float | None
    solved: bool
    stopped_by: str

    def format(self) -> str:
        ret = "n/a" if self.mean_return_100 is None else f"{self.mean_return_100:.1f}"
        return (
            f"\n== evergreen train: {self.stopped_by}\n"
            f"   run dir        {self.run_dir}\n"
            f"   env steps      {self.env_steps:,}\n"
            f"   updates        {self.updates:,}\n"
            f"   episodes       {self.episodes:,}\n"
            f"   mean return    {ret} (last 100 episodes){'  SOLVED' if self.solved else ''}\n"
            f"   wall time      {self.wall_seconds:.0f} s\n"
            f"   resume with    evergreen train --resume {self.run_dir}\n"
        )


class Bookkeeping:
    """See the module docstring."""

    def __init__(self, run_dir: Path, *, telemetry: Any = None, stop_at_return: float | None = None,
                 stop_window: int = 100):
        self.run_dir = Path(run_dir)
        self.telemetry = telemetry
        self.stop_at_return = stop_at_return
        self.stop_window = int(stop_window)  # episodes the stop_at_return mean is over
        self.counters: dict[str, Any] = {"env_steps": 0, "updates": 0, "episodes": 0, "elapsed_s": 0.0, "visit": 0}
        self.last_record: dict[str, Any] | None = None
        """The newest record :meth:`emit` wrote (what the control plane's heartbeats repeat)."""
        self.task: str | None = None  # the scenario task's name in records (None: a single-task run)
        self.task_index = 0
        self._switch: dict[str, Any] | None = None  # the switch the next record announces
        self.returns: deque[float] = deque(maxlen=max(100, self.stop_window))
        self._log = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.replay_rows_lost = 0
        """Rows replay acknowledged to actors and lost with a shard crash, in this run segment."""
        self.replay_shard_restarts = 0
        self._t0 = time.time()
        self._base_elapsed = 0.0
        self._published_version = 0
        self._dropped_batches = 0
        self._totals = {"update_seconds": 0.0, "diagnostics_seconds": 0.0, "wait_seconds": 0.0}
        self._last_diagnostics: dict[str, float] = {}
        self._new_interval(time.time())

    def _new_interval(self, now: float) -> None:
        self._interval_start = now
        self._interval_steps = self.counters["env_steps"]
        self._interval_updates = self.counters["updates"]
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._interval_returns: list[float] = []
        self._episodes_by_task: dict[str, dict[str, list[float]]] = {}
        self._wait = self._learner_wall = 0.0
        self._lag_sum, self._lag_count = 0.0, 0
        self._min_policy_version: int | None = None
        self._task_rows: dict[int, int] = {}

    # -- inputs ------------------------------------------------------------------------------------

    def resume_from(self, extra: dict[str, Any]) -> None:
        """Continue the counters and recent returns of a checkpoint's extra state."""
        self.counters.update(extra["counters"])
        self.returns.extend(extra.get("recent_returns", ()))
        self._base_elapsed = float(self.counters.get("elapsed_s", 0.0))
        self._published_version = int(self.counters["updates"])
        self._new_interval(time.time())

    def add_actor_stats(self, stats: Any) -> None:
        """An ``actors.ray_actor.PoolStats`` period: env steps, episodes and their returns."""
        self.counters["env_steps"] += stats.env_steps
        self.counters["episodes"] += stats.num_episodes
        for task, task_returns in stats.episode_returns.items():
            values = [float(r) for r in task_returns]
            self.returns.extend(values)
            self._interval_returns.extend(values)
            into = self._episodes_by_task.setdefault(task, {"returns": [], "lengths": []})
            into["returns"].extend(values)
            into["lengths"].extend(float(n) for n in stats.episode_lengths.get(task, ()))
        self.replay_rows_lost += getattr(stats, "replay_rows_lost", 0)
        if stats.min_policy_version >= 0:
            low = self._min_policy_version
            self._min_policy_version = stats.min_policy_version if low is None else min(low, stats.min_policy_version)

    def record_event(self, event: str, **fields: Any) -> None:
        """A fault and its recovery (a replay shard restarted, ...): one line of ``events.jsonl``."""
        if event == "replay_shard_restarted":
            self.replay_shard_restarts += 1
        line = {"time": time.time(), "env_steps": self.counters["env_steps"], "updates": self.counters["updates"],
                "event": event, **fields}
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def set_task(self, *, index: int, name: str) -> None:
        """The scenario task the run is on (records carry its name from now on)."""
        self.task_index, self.task = int(index), name

    def task_switch(self, *, visit: int, index: int, task: str, env_steps: int,
                    metrics: dict[str, float] | None = None) -> None:
        """The scenario moved to visit ``visit`` (task ``index``, named ``task``); the next record says so,
        with what the interventions' task-switch hooks reported (``task_switch_metrics``)."""
        self.counters["visit"] = int(visit)
        self.set_task(index=index, name=task)
        self._switch = {"task_switch": task, "switch_env_steps": int(env_steps),
                        "task_switch_metrics": {k: float(v) for k, v in (metrics or {}).items()}}

    def add_learner_report(self, report: Any) -> None:
        """A ``learner.service.TrainReport``."""
        self.counters["updates"] = report.updates
        for key, total in report.metric_sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + total
            self._counts[key] = self._counts.get(key, 0) + report.metric_counts[key]
        if report.diagnostics:
            self._last_diagnostics = dict(report.diagnostics)
        self._wait += report.wait_seconds
        self._learner_wall += report.wall_seconds
        self._lag_sum += report.policy_lag_sum
        self._lag_count += report.policy_lag_count
        self._published_version = report.published_version
        self._dropped_batches = report.dropped_batches
        for task, rows in report.task_rows.items():
            self._task_rows[task] = self._task_rows.get(task, 0) + rows
        for key in self._totals:
            self._totals[key] += getattr(report, key)

    # -- derived -----------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return self._base_elapsed + time.time() - self._t0

    @property
    def mean_return(self) -> float | None:
        """The mean return of the last 100 episodes (fewer at the start)."""
        return float(np.mean(list(self.returns)[-100:])) if self.returns else None

    @property
    def stop_window_mean(self) -> float | None:
        """The mean return of the last ``stop_window`` episodes; None until there are that many."""
        if len(self.returns) < self.stop_window:
            return None
        return float(np.mean(list(self.returns)[-self.stop_window:]))

    @property
    def solved(self) -> bool:
        """``stop_at_return`` reached by the mean of the last ``stop_window`` episodes."""
        mean = self.stop_window_mean
        return self.stop_at_return is not None and mean is not None and mean >= self.stop_at_return

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a learner checkpoint stores beside the algorithm state."""
        return {"counters": dict(self.counters, elapsed_s=self.elapsed), "recent_returns": list(self.returns)}

    # -- outputs -----------------------------------------------------------------------------------

    def emit(self, *, replay_info: list[Any], pool_stats: Any) -> dict[str, Any]:
        """Write one record for the interval ending now (metrics log, progress line, telemetry)."""
        now = time.time()
        dt = max(now - self._interval_start, 1e-6)
        c = self.counters
        record: dict[str, Any] = {
            "time": now, "elapsed_s": round(self.elapsed, 2),
            "env_steps": c["env_steps"], "updates": c["updates"], "episodes": c["episodes"],
            "env_steps_per_s": round((c["env_steps"] - self._interval_steps) / dt, 1),
            "updates_per_s": round((c["updates"] - self._interval_updates) / dt, 2),
            "return_mean_100": self.mean_return,
            "return_recent": float(np.mean(self._interval_returns)) if self._interval_returns else None,
            "replay_size": int(sum(i.size for i in replay_info)),
            "replay_inserts": int(sum(i.inserts for i in replay_info)),
            # The fraction of the learner's time it waited for a batch from replay.
            "learner_wait_fraction": round(min(1.0, self._wait / self._learner_wall), 4) if self._learner_wall else 0.0,
            "policy_lag_updates": self._lag_sum / self._lag_count if self._lag_count else None,
            # Learner version minus the oldest version any actor acted with in this interval.
            "actor_policy_lag_updates": (self._published_version - self._min_policy_version
                                         if self._min_policy_version is not None else None),
            "actor_restarts": pool_stats.restarts_total, "num_actors": pool_stats.num_actors,
            "actors_running": pool_stats.running, "dropped_batches": self._dropped_batches,
            "replay_shard_restarts": self.replay_shard_restarts, "replay_rows_lost": self.replay_rows_lost,
        }
        if self.task is not None:
            record["task"] = self.task
            record["visit"] = c["visit"]
            trained = sum(self._task_rows.values())
            # Which share of the rows the learner trained on came from the task the actors are on.
            record["replay_current_task_fraction"] = (round(self._task_rows.get(self.task_index, 0) / trained, 4)
                                                      if trained else None)
        if self._switch is not None:
            record.update(self._switch)
            self._switch = None
        for key, total in self._sums.items():
            mean = total / self._counts[key]
            record[key] = mean if math.isfinite(mean) else None
        record.update(self._last_diagnostics)
        self._log.write(json.dumps(record) + "\n")
        print(progress_line(record), flush=True)
        if self.telemetry is not None:
            try:
                self.telemetry.update(record, episodes_by_task=self._episodes_by_task)
            except ValueError as exc:  # a malformed metric must not stop a multi-day run
                print(f"  telemetry: {exc}", file=sys.stderr)
        self._new_interval(now)
        self.last_record = record
        return record

    def learner_time_line(self) -> str | None:
        t = self._totals
        if t["update_seconds"] <= 0:
            return None
        return (f"  learner: {t['update_seconds']:.1f} s in updates, {t['diagnostics_seconds']:.2f} s in diagnostics "
                f"({100 * t['diagnostics_seconds'] / t['update_seconds']:.1f}% of update time), "
                f"{t['wait_seconds']:.1f} s waiting on replay")

    def summary(self, *, stopped_by: str) -> Summary:
        c = self.counters
        return Summary(run_dir=str(self.run_dir), env_steps=c["env_steps"], updates=c["updates"],
                       episodes=c["episodes"], wall_seconds=self.elapsed, mean_return_100=self.mean_return,
                       solved=self.solved, stopped_by=stopped_by)

    def close(self) -> None:
        self._log.close()


def progress_line(r: dict[str, Any]) -> str:
    """The one-line progress report printed for each record."""
    ret = "   n/a" if r["return_mean_100"] is None else f"{r['return_mean_100']:6.1f}"
    lag = "n/a" if r["policy_lag_updates"] is None else f"{r['policy_lag_updates']:.0f}"
    # The algorithm's loss: DQN's TD loss, or an actor-critic's critic loss.
    value = r.get("loss", r.get("critic_loss"))
    loss = "n/a" if value is None else f"{value:.4f}"
    return (f"[{r['elapsed_s']:7.1f}s] env {r['env_steps']:>9,} ({r['env_steps_per_s']:6.0f}/s) | "
            f"upd {r['updates']:>8,} ({r['updates_per_s']:5.1f}/s) | return(100) {ret} | "
            f"episodes {r['episodes']:,} | replay {r['replay_size']:,} | lag {lag} | "
            f"wait {100 * r['learner_wait_fraction']:.0f}% | loss {loss}")
