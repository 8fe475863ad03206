"""`evergreen report`: plots and one HTML page from runs' metrics logs, seeds grouped into mean and spread.

    evergreen report runs/pong-20261121-193000                    # -> runs/pong-.../report/
    evergreen report runs/pong-base-s* runs/pong-redo-s* --out cmp/   # mean ± s.e. per intervention
    evergreen report runs/a runs/b --group-by none                # one line per run, no grouping
    evergreen report runs/* --group-by plasticity.interventions,dqn.lr

or from Python::

    from evergreen.report import render_report
    html = render_report(["runs/pong-base-s0", "runs/pong-base-s1", "runs/pong-redo-s0"], out="cmp")

Each run directory holds ``metrics.jsonl`` (one record per log interval, written by ``evergreen train``;
see ``Trainer._record``) and ``config.json``; ``evaluations.jsonl`` and ``continual.json`` are read
when present. The report writes PNGs (matplotlib, Agg) and ``index.html``, which embeds them (base64),
so the page is one self-contained file:

* ``learning_curve.png`` — mean return of the last 100 episodes (and the interval's mean) against
  env steps; per task when records carry ``task``, task switches as vertical lines;
* ``evaluation.png`` — evaluation return of every task (``evaluations.jsonl``), task stays shaded;
* ``plasticity.png`` — one panel per diagnostic (``diag/<name>[/<layer>]``), one line per layer
  (``total`` bold); with several runs, one line per run or group of the network-level value (``total``);
* ``throughput.png`` — env steps/s, updates/s, replay size, learner wait, policy lag, actors
  and restarts against wall time;
* ``losses.png`` — loss, TD error, Q mean, gradient norm, learning rate against env steps;
* ``interventions.png`` — every ``<intervention>/<metric>`` (only when the logs have some).

Comparing runs: the runs are first grouped (``--group-by``, :func:`group_runs`):

* ``config`` (default) — runs whose config.json is equal except for the seeds (``seed``, ``env.seed``)
  and the fields that only name or place a run (:data:`IGNORED_FIELDS`) form a group: the seeds of one
  experiment. A group is labelled by its interventions (``baseline`` when there are none), plus the
  fields that tell it apart from another group with the same interventions;
* ``interventions`` — by ``plasticity.interventions`` alone, whatever else differs;
* ``none`` — no grouping: one line per run, labelled ``<run dir name> (<interventions>)``;
* ``KEY[,KEY...]`` — by these dotted config fields, e.g. ``dqn.lr`` or ``plasticity.options``.

A group of two or more runs is drawn as the mean over its runs with a shaded band of ±1 standard
error of that mean (sample standard deviation / sqrt(n)) on a common env-step grid: each run's curve
is interpolated linearly onto the env steps that every run of the group covers, never extrapolated
(:func:`mean_and_spread`). A group of one run is drawn as a single run. The page adds a comparison
table: per group its runs and seeds, and the final mean return, average performance and forgetting
(from ``continual.json``) as mean ± standard error over the group.

The default output is ``RUN_DIR/report/`` for one run and ``<parent of the first RUN_DIR>/report-compare/``
for several. A missing, empty or corrupt log is an error naming the file (a truncated *last* line, as a
crash mid-write leaves, is skipped with a warning), and so is a ``--group-by`` field that a run's
config.json does not have (the message lists the valid choices).
"""

from __future__ import annotations

import argparse
import base64
import copy
import html
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PLOTS = ("learning_curve", "evaluation", "plasticity", "throughput", "losses", "interventions")
_THROUGHPUT = (("env_steps_per_s", "env steps / s"), ("updates_per_s", "updates / s"),
               ("replay_size", "replay size (items)"), ("learner_wait_fraction", "learner wait (fraction)"),
               ("policy_lag_updates", "policy lag (updates)"), ("num_actors", "actors"),
               ("actor_restarts", "actor restarts (cumulative)"))
_LOSSES = (("loss", "loss"), ("td_error", "|TD error|"), ("q", "Q mean"), ("grad_norm", "gradient norm"),
           ("lr", "learning rate"))
_TOP_LEVEL = {"time", "elapsed_s", "env_steps", "updates", "episodes", "env_steps_per_s", "updates_per_s",
              "return_mean_100", "return_recent", "replay_size", "learner_wait_fraction", "policy_lag_updates",
              "actor_restarts", "num_actors", "task", "task_switch", "visit", "switch_env_steps",
              "task_switch_metrics"}
_LOG_SCALE = {"effective_lr", "grad_l1", "grad_l2", "grad_norm_l1", "grad_norm_l2"}

GROUP_BY_MODES = ("config", "interventions", "none")
"""The named ``--group-by`` modes; anything else is read as comma-separated dotted config fields."""
SEED_FIELDS = ("seed", "env.seed")
"""Config fields that are a run's seeds: what the runs of one group differ in."""
IGNORED_FIELDS = SEED_FIELDS + ("name", "runs_dir", "telemetry_port", "ray", "learner.checkpoint_dir",
                                "replay.checkpoint_dir")
"""Config fields left out when ``--group-by config`` compares configs: seeds, and fields that only name
a run, say where it writes or which cluster it joined (they differ between seeds without changing
the experiment)."""
SPREAD = "±1 standard error"
"""What the shaded band around a group's mean is (and the ± in the comparison table)."""
_MISSING = object()


class ReportError(ValueError):
    """A run directory or log that cannot be reported on; the message names the file."""


@dataclass
class Run:
    """One run's metrics log, as columns."""

    path: Path
    label: str
    interventions: str
    records: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """``evaluations.jsonl`` entries (evaluation of every task beside training), if the run has any."""
    config: dict[str, Any] | None = None
    """The parsed ``config.json``; None when the run has none (or it is unreadable)."""
    continual: dict[str, Any] | None = None
    """The parsed ``continual.json`` (``evergreen.continual.summarize_evaluations``), if the run has one."""

    def column(self, key: str) -> np.ndarray:
        """float64 values of ``key`` per record; NaN where absent, None or non-numeric."""
        out = np.full(len(self.records), np.nan)
        for i, r in enumerate(self.records):
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i] = float(v)
        return out

    def record_keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def tasks(self) -> list[Any]:
        return [r.get("task") for r in self.records]

    def switches(self) -> list[tuple[float, str]]:
        """(env steps, new task) where the task changes between records or a record marks a switch."""
        out, previous = [], None
        for r in self.records:
            task = r.get("task_switch") or r.get("task")
            if task is not None and previous is not None and task != previous:
                out.append((float(r.get("env_steps") or 0), str(task)))
            if task is not None:
                previous = task
        return out

    @property
    def seed(self) -> Any:
        """The run's ``seed`` from config.json (None without one)."""
        return (self.config or {}).get("seed")

    def final_return(self) -> float:
        """The last logged mean return of the last 100 episodes; NaN when no episode has finished."""
        values = self.column("return_mean_100")
        values = values[np.isfinite(values)]
        return float(values[-1]) if values.size else float("nan")

    def evaluation_curve(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(env steps, mean evaluation return) of ``task``, in env-step order."""
        points = sorted((float(e["env_steps"]), float(e["scores"][task]["mean"])) for e in self.evaluations
                        if task in e["scores"] and isinstance(e["scores"][task].get("mean"), (int, float)))
        if not points:
            return np.array([]), np.array([])
        x, y = zip(*points, strict=True)
        return np.array(x), np.array(y)


def _read_json(path: Path, what: str, warnings: list[str]) -> dict[str, Any] | None:
    """``path`` as a JSON object, or None (with a warning naming the file) when unreadable."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        warnings.append(f"{path}: unreadable ({exc}); {what} unknown")
        return None
    if not isinstance(value, dict):
        warnings.append(f"{path}: expected a JSON object, got {type(value).__name__}; {what} unknown")
        return None
    return value


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``run_dir/metrics.jsonl`` and, when present, config.json, evaluations.jsonl, continual.json."""
    path = Path(run_dir)
    log = path / "metrics.jsonl"
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    if not log.is_file():
        raise ReportError(f"{log}: no metrics log; expected a run directory made by evergreen train")
    lines = log.read_text().splitlines()
    records, warnings = [], []
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(numbered) - 1:
                warnings.append(f"{log}:{lineno}: skipped a truncated last line ({exc.msg})")
                continue
            raise ReportError(f"{log}:{lineno}: not a JSON record ({exc.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ReportError(f"{log}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise ReportError(f"{log}: the metrics log holds no records yet (the first is written after "
                          f"learner.log_every_s)")
    if not any(isinstance(r.get("env_steps"), (int, float)) for r in records):
        raise ReportError(f"{log}: no record has env_steps; expected records written by evergreen train")
    config = _read_json(path / "config.json", "interventions and seed", warnings)
    plasticity = (config or {}).get("plasticity")
    interventions = str(plasticity.get("interventions") or "") if isinstance(plasticity, dict) else ""
    evaluations = []
    eval_log = path / "evaluations.jsonl"
    if eval_log.is_file():
        for lineno, line in enumerate(eval_log.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("scores"), dict) and "env_steps" in entry:
                    evaluations.append(entry)
                    continue
            except json.JSONDecodeError:
                pass
            warnings.append(f"{eval_log}:{lineno}: skipped a line that is not an evaluation entry")
    continual = _read_json(path / "continual.json", "continual metrics", warnings)
    name = path.resolve().name
    return Run(path=path, label=f"{name} ({interventions or 'no interventions'})", interventions=interventions,
               records=records, warnings=warnings, evaluations=evaluations, config=config, continual=continual)


# ---------------------------------------------------------------------------------------------------------
# Grouping runs into seeds of one experiment


@dataclass
class Group:
    """Runs that differ only in their seeds (or share the ``--group-by`` fields), drawn as one series."""

    label: str
    runs: list[Run]

    @property
    def name(self) -> str:
        """What plots and tables call the group: a single run keeps its own label."""
        return self.runs[0].label if len(self.runs) == 1 else self.label

    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value (or sub-tree) at ``a.b.c`` in ``config``; ``_MISSING`` when there is none."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _field_choices(config: dict[str, Any], dotted: str) -> list[str]:
    """The dotted fields beside the deepest existing parent of ``dotted`` (for an error message)."""
    parts = dotted.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = _lookup(config, ".".join(parts[:depth])) if depth else config
        if isinstance(parent, dict) and parent:
            prefix = ".".join(parts[:depth] + [""]) if depth else ""
            return [prefix + k for k in sorted(parent)]
    return []


def _without(config: dict[str, Any], dotted_fields: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for dotted in dotted_fields:
        *parents, leaf = dotted.split(".")
        node = _lookup(out, ".".join(parents)) if parents else out
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted field: leaf value}; lists and empty dicts are leaves."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _fields(by: str) -> list[str]:
    fields = [f.strip() for f in by.split(",")]
    if not all(fields):
        raise ReportError(f"--group-by {by!r}: an empty field name; expected one of {', '.join(GROUP_BY_MODES)} "
                          f"or comma-separated config fields such as plasticity.interventions,dqn.lr")
    return ["plasticity.interventions" if f == "interventions" else f for f in fields]


def _field_key(run: Run, fields: Sequence[str], by: str) -> tuple[str, ...]:
    """The run's values of ``fields`` (JSON, so that sub-trees compare by content)."""
    config_path = run.path / "config.json"
    if run.config is None:
        raise ReportError(f"{config_path}: missing or unreadable, and --group-by {by} reads it; "
                          f"use --group-by none to report such runs one by one")
    key = []
    for dotted in fields:
        value = _lookup(run.config, dotted)
        if value is _MISSING:
            choices = ", ".join(_field_choices(run.config, dotted)) or "(none)"
            raise ReportError(f"--group-by {by}: {config_path} has no field {dotted!r}; expected one of "
                              f"{', '.join(GROUP_BY_MODES)}, or config fields such as: {choices}")
        key.append(json.dumps(value, sort_keys=True))
    return tuple(key)


def _field_label(fields: Sequence[str], key: tuple[str, ...]) -> str:
    parts = []
    for dotted, value in zip(fields, key, strict=True):
        if dotted == "plasticity.interventions":
            parts.append(json.loads(value) or "baseline")
        else:
            parts.append(f"{dotted}={value}")
    return ", ".join(parts)


def _disambiguate(groups: list[Group]) -> None:
    """Groups that share an interventions label get the config fields that tell them apart appended."""
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flat = [_flatten(_without(g.runs[0].config or {}, IGNORED_FIELDS)) for g in same]
        keys = [k for k in dict.fromkeys(k for f in flat for k in f)
                if len({json.dumps(f.get(k, "<absent>"), sort_keys=True) for f in flat}) > 1]
        for g, f in zip(same, flat, strict=True):
            shown = [f"{k}={json.dumps(f.get(k, '<absent>'))}" for k in keys[:3]]
            more = f", +{len(keys) - 3} more" if len(keys) > 3 else ""
            g.label = f"{g.label} [{', '.join(shown)}{more}]" if keys else g.label


def group_runs(runs: Sequence[Run], by: str = "config") -> list[Group]:
    """Group ``runs`` for comparison; groups in the order their first run comes.

    ``by``: ``config`` (equal config.json but for :data:`IGNORED_FIELDS`), ``interventions``, ``none``
    (one group per run), or comma-separated dotted config fields::

        groups = group_runs([load_run(d) for d in dirs], by="plasticity.interventions,dqn.lr")
        [(g.label, [r.seed for r in g.runs]) for g in groups]   # [("redo, dqn.lr=0.001", [0, 1, 2]), ...]

    Raises :class:`ReportError` naming the field and the choices when a run's config lacks a field.
    """
    if by == "none":
        return [Group(label=r.label, runs=[r]) for r in runs]
    keyed: dict[Any, Group] = {}
    if by == "config":
        for i, run in enumerate(runs):
            if run.config is None:  # nothing to compare: a group of its own
                keyed[("no config", i)] = Group(label=run.label, runs=[run])
                continue
            key = json.dumps(_without(run.config, IGNORED_FIELDS), sort_keys=True)
            keyed.setdefault(key, Group(label=run.interventions or "baseline", runs=[])).runs.append(run)
        groups = list(keyed.values())
        _disambiguate(groups)
        return groups
    fields = _fields(by)
    for run in runs:
        key = _field_key(run, fields, by)
        keyed.setdefault(key, Group(label=_field_label(fields, key), runs=[])).runs.append(run)
    return list(keyed.values())


def _grouping_warnings(groups: Sequence[Group], by: str) -> list[str]:
    """Seeds that repeat within a group (the same run twice, or seeds not varied), runs without a config."""
    out = []
    for g in groups:
        seeds = [s for s in g.seeds() if s is not None]
        repeated = sorted({json.dumps(s) for s in seeds if seeds.count(s) > 1})
        if repeated:
            out.append(f"group {g.label}: several runs have seed {', '.join(repeated)}; the spread is not "
                       f"only over seeds")
        if by == "config" and len(g.runs) == 1 and g.runs[0].config is None:
            out.append(f"{g.runs[0].path / 'config.json'}: missing; the run is not grouped with others")
    return out


# ---------------------------------------------------------------------------------------------------------
# Mean and spread over seeds


@dataclass(frozen=True)
class SeedSpread:
    """A group's curves on a common env-step grid: their mean and its standard error, per grid point."""

    steps: np.ndarray
    mean: np.ndarray
    sem: np.ndarray
    """Standard error of the mean: sample standard deviation (ddof 1) / sqrt(n)."""
    n: int

    @property
    def low(self) -> np.ndarray:
        return self.mean - self.sem

    @property
    def high(self) -> np.ndarray:
        return self.mean + self.sem


def _clean(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Finite points in increasing x; of points with equal x the last logged is kept (as after a resume)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    last = np.append(x[1:] != x[:-1], True) if x.size else np.array([], dtype=bool)
    return x[last], y[last]


def mean_and_spread(curves: Sequence[tuple[Any, Any]]) -> SeedSpread | None:
    """Mean ± standard error of several ``(env steps, values)`` curves, on the env steps all of them cover.

    The grid is every env step of any curve that lies within ``[max of the curves' first steps, min of
    their last steps]``; each curve is interpolated linearly onto it (no curve is extrapolated, so the
    mean never rests on fewer curves than ``n``). NaN points are dropped first. None when fewer than two
    curves have points, or their ranges do not overlap::

        s = mean_and_spread([([0, 10], [0.0, 10.0]), ([5, 20], [5.0, 20.0])])
        s.steps, s.mean, s.sem          # [5, 10], [5, 10], [0, 0]  (both are y = x on [5, 10])
    """
    cleaned = [c for c in (_clean(x, y) for x, y in curves) if c[0].size]
    if len(cleaned) < 2:
        return None
    lo, hi = max(x[0] for x, _ in cleaned), min(x[-1] for x, _ in cleaned)
    if lo > hi:
        return None
    every = np.unique(np.concatenate([x for x, _ in cleaned]))
    grid = every[(every >= lo) & (every <= hi)]
    values = np.stack([np.interp(grid, x, y) for x, y in cleaned])
    n = len(cleaned)
    return SeedSpread(steps=grid, mean=values.mean(axis=0), sem=values.std(axis=0, ddof=1) / math.sqrt(n), n=n)


def mean_and_sem(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite ``values``; the error is NaN for fewer than two.

        mean_and_sem([1.0, 3.0, float("nan")])    # (2.0, 1.0, 2)
    """
    v = np.asarray([x for x in values if isinstance(x, (int, float)) and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return float("nan"), float("nan"), 0
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), sem, int(v.size)


# ---------------------------------------------------------------------------------------------------------
# Plots


def _diagnostics(run: Run) -> dict[str, dict[str, str]]:
    """{diagnostic: {layer: record key}}; network-level diagnostics have the layer ``total``."""
    out: dict[str, dict[str, str]] = {}
    for key in run.record_keys():
        parts = key.split("/")
        if parts[0] != "diag" or len(parts) < 2:
            continue
        if parts[1] == "plasticity_probe" and len(parts) == 3:  # loss/fresh_loss/ratio are metrics, not layers
            out.setdefault(f"plasticity_probe/{parts[2]}", {})["total"] = key
        else:
            out.setdefault(parts[1], {})["/".join(parts[2:]) or "total"] = key
    return out


def _interventions(run: Run) -> list[str]:
    return [k for k in run.record_keys() if "/" in k and not k.startswith("diag/") and k not in _TOP_LEVEL]


def _grid(n: int, *, ncols: int = 3):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _line(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> bool:
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], **kwargs)
    return True


def _series(ax, curves: Sequence[tuple[np.ndarray, np.ndarray]], *, label: str | None, color: str,
            **kwargs) -> bool:
    """One group's curves on ``ax``: the curve itself for one run, else the mean with a ±1 s.e. band.

    Runs without data for this curve are left out of the mean; runs whose env steps do not overlap are
    drawn one by one (thin) rather than averaged. Returns whether anything was drawn.
    """
    with_data = [c for c in curves if (np.isfinite(c[0]) & np.isfinite(c[1])).any()]
    if len(with_data) == 1:
        return _line(ax, *with_data[0], label=label, color=color, **kwargs)
    spread = mean_and_spread(with_data)
    if spread is None:
        drawn = False
        for x, y in with_data:  # no common range: every run on its own, the label once
            note = f"{label} (runs do not overlap)" if label and not drawn else None
            drawn |= _line(ax, x, y, label=note, color=color, linewidth=0.8, alpha=0.7)
        return drawn
    ax.fill_between(spread.steps, spread.low, spread.high, color=color, alpha=0.2, linewidth=0)
    kwargs.setdefault("linewidth", 1.8)
    ax.plot(spread.steps, spread.mean, color=color,
            label=f"{label} ({spread.n} runs: mean, {SPREAD})" if label else None, **kwargs)
    return True


def _mark_switches(ax, groups: Sequence[Group], colors: Sequence[str]) -> None:
    for group, color in zip(groups, colors, strict=True):
        for steps, task in dict.fromkeys(s for r in group.runs for s in r.switches()):  # once per group
            ax.axvline(steps, color=color if len(groups) > 1 else "0.3", linestyle="--", linewidth=0.9, alpha=0.8)
            ax.annotate(task, (steps, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=7, color="0.3")


def _colors(n: int) -> list[str]:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _finish(fig, ax_list, path: Path, title: str) -> Path:
    fig.suptitle(title)
    for ax in ax_list:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _one_run(groups: Sequence[Group]) -> Run | None:
    """The run, when the report is about a single run (the views that only make sense for one)."""
    return groups[0].runs[0] if len(groups) == 1 and len(groups[0].runs) == 1 else None


def _learning_curve_per_task(ax, run: Run) -> None:
    """One colour per task: the segments of the curve spent on each task."""
    steps, mean100, recent = run.column("env_steps"), run.column("return_mean_100"), run.column("return_recent")
    tasks = run.tasks()
    names = list(dict.fromkeys(str(t) for t in tasks if t is not None))
    for name, task_color in zip(names, _colors(len(names)), strict=True):
        mask = np.array([str(t) == name for t in tasks])
        _line(ax, np.where(mask, steps, np.nan), np.where(mask, mean100, np.nan), color=task_color,
              label=f"{name}: mean of last 100")
        ok = mask & np.isfinite(recent)
        ax.scatter(steps[ok], recent[ok], s=6, color=task_color, alpha=0.35)


def plot_learning_curve(groups: Sequence[Group], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = _colors(len(groups))
    single = _one_run(groups)
    if single is not None and any(t is not None for t in single.tasks()):
        _learning_curve_per_task(ax, single)
    else:
        for group, color in zip(groups, colors, strict=True):
            curves = [(r.column("env_steps"), r.column("return_mean_100")) for r in group.runs]
            _series(ax, curves, label=f"{group.name}: mean of last 100", color=color)
            if len(group.runs) == 1:  # interval means only for single runs: for groups they are noise
                run = group.runs[0]
                steps, recent = run.column("env_steps"), run.column("return_recent")
                ok = np.isfinite(steps) & np.isfinite(recent)
                ax.scatter(steps[ok], recent[ok], s=6, color=color, alpha=0.3,
                           label=f"{run.label}: interval mean" if ok.any() else None)
    _mark_switches(ax, groups, colors)
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return")
    return _finish(fig, [ax], path, "Learning curve")


def _shade_visits(ax, run: Run) -> None:
    """Alternate light bands for the stays on each task (between the run's task switches)."""
    edges = [0.0] + [steps for steps, _ in run.switches()]
    end = float(np.nanmax(run.column("env_steps")))
    edges.append(max(end, edges[-1]))
    for i, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if i % 2 == 1 and stop > start:
            ax.axvspan(start, stop, color="0.5", alpha=0.08, linewidth=0)


def plot_evaluation(groups: Sequence[Group], path: Path) -> Path | None:
    """Evaluation return of every task over env steps (colour: task; line style: group), task stays shaded.

    A group of several runs is drawn as the mean over its runs with a ±1 standard error band per task.
    """
    runs = [r for g in groups for r in g.runs]
    if not any(r.evaluations for r in runs):
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    tasks = list(dict.fromkeys(t for r in runs for e in r.evaluations for t in e["scores"]))
    task_colors = dict(zip(tasks, _colors(len(tasks)), strict=True))
    styles = ["-", "--", ":", "-."]
    if len(groups) == 1:  # one scenario on the x axis: its stays can be shaded
        _shade_visits(ax, groups[0].runs[0])
    for i, group in enumerate(groups):
        for task in tasks:
            curves = [r.evaluation_curve(task) for r in group.runs if r.evaluations]
            label = task if len(groups) == 1 else f"{group.name}: {task}"
            _series(ax, curves, label=label, color=task_colors[task], linestyle=styles[i % len(styles)],
                    marker="o", markersize=3)
    _mark_switches(ax, groups, _colors(len(groups)))
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return (mean)")
    return _finish(fig, [ax], path, "Evaluation per task (task stays shaded)")


def _all_positive(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> bool:
    return all(bool(np.all(y[np.isfinite(y)] > 0)) for _, y in curves)


def plot_plasticity(groups: Sequence[Group], path: Path) -> Path | None:
    """One panel per diagnostic: per layer for a single run; else the network total per run or group."""
    runs = [r for g in groups for r in g.runs]
    per_run = {id(r): _diagnostics(r) for r in runs}
    names = list(dict.fromkeys(n for d in per_run.values() for n in d))
    if not names:
        return None
    fig, axes = _grid(len(names))
    colors = _colors(len(groups))
    single = _one_run(groups)
    for ax, name in zip(axes, names, strict=True):
        positive = True
        if single is not None:
            layers = per_run[id(single)].get(name, {})
            for layer, key in sorted(layers.items(), key=lambda kv: (kv[0] == "total", kv[0])):
                positive &= _all_positive([(single.column("env_steps"), single.column(key))])
                total = layer == "total"
                _line(ax, single.column("env_steps"), single.column(key), label=layer,
                      linewidth=2.2 if total else 1.0, color="black" if total else None)
        else:
            for group, color in zip(groups, colors, strict=True):
                curves = [(r.column("env_steps"), r.column(per_run[id(r)][name]["total"])) for r in group.runs
                          if "total" in per_run[id(r)].get(name, {})]
                if curves:
                    positive &= _all_positive(curves)
                    _series(ax, curves, label=group.name, color=color)
        if name in _LOG_SCALE and positive and ax.lines:
            ax.set_yscale("log")
        _mark_switches(ax, groups, colors)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("env steps", fontsize=8)
    return _finish(fig, axes, path, "Plasticity diagnostics" + (" (per layer)" if single else " (network)"))


def _panels(groups: Sequence[Group], path: Path, fields: Sequence[tuple[str, str]], *, x: str,
            title: str) -> Path | None:
    runs = [r for g in groups for r in g.runs]
    present = [(k, lbl) for k, lbl in fields if any(np.isfinite(r.column(k)).any() for r in runs)]
    if not present:
        return None
    fig, axes = _grid(len(present))
    colors = _colors(len(groups))
    for ax, (key, label) in zip(axes, present, strict=True):
        for group, color in zip(groups, colors, strict=True):
            _series(ax, [(r.column(x), r.column(key)) for r in group.runs], color=color,
                    label=group.name if len(runs) > 1 else None)
        if x == "env_steps":
            _mark_switches(ax, groups, colors)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("env steps" if x == "env_steps" else "wall time (s)", fontsize=8)
    return _finish(fig, axes, path, title)


# ---------------------------------------------------------------------------------------------------------
# The report


def render_report(run_dirs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
                  group_by: str = "config", on_warning: Callable[[str], None] | None = None) -> Path:
    """Write the PNGs and ``index.html`` for ``run_dirs`` into ``out``; return the HTML path.

    ``group_by`` is as for :func:`group_runs` (``config``, ``interventions``, ``none`` or config fields).
    ``on_warning`` receives each warning (e.g. a skipped truncated last line); they are also listed
    on the page::

        render_report(["runs/base-s0", "runs/base-s1", "runs/redo-s0"], out="cmp", group_by="interventions")
    """
    if not run_dirs:
        raise ReportError("no run directories given; expected at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]  # every log is checked before anything is written
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} #{i + 1}"
    groups = group_runs(runs, group_by)  # a bad --group-by also fails before anything is written
    warnings = [w for r in runs for w in r.warnings] + (_grouping_warnings(groups, group_by) if len(runs) > 1 else [])
    for w in warnings:
        if on_warning is not None:
            on_warning(w)
    if out is None:
        first = Path(run_dirs[0])
        out = first / "report" if len(runs) == 1 else first.resolve().parent / "report-compare"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg", force=True)
    images: list[tuple[str, Path]] = []
    made = {
        "learning_curve": plot_learning_curve(groups, out / "learning_curve.png"),
        "evaluation": plot_evaluation(groups, out / "evaluation.png"),
        "plasticity": plot_plasticity(groups, out / "plasticity.png"),
        "throughput": _panels(groups, out / "throughput.png", _THROUGHPUT, x="elapsed_s",
                              title="Throughput, replay and actors"),
        "losses": _panels(groups, out / "losses.png", _LOSSES, x="env_steps", title="Learner"),
        "interventions": _panels(
            groups, out / "interventions.png",
            [(k, k) for k in dict.fromkeys(k for r in runs for k in _interventions(r))],
            x="env_steps", title="Intervention metrics"),
    }
    for name in PLOTS:
        if made[name] is not None:
            images.append((name, made[name]))
        else:
            (out / f"{name}.png").unlink(missing_ok=True)  # a stale image from an earlier report
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(_html(runs, groups, images, warnings))
    os.replace(tmp, page)
    return page


def _summary(run: Run) -> dict[str, str]:
    last = run.records[-1]

    def fmt(v: Any, spec: str = ",.0f") -> str:
        return "n/a" if not isinstance(v, (int, float)) else format(v, spec)

    best = run.column("return_mean_100")
    return {
        "run": run.label, "records": str(len(run.records)), "env steps": fmt(last.get("env_steps")),
        "updates": fmt(last.get("updates")), "episodes": fmt(last.get("episodes")),
        "last return (100)": fmt(last.get("return_mean_100"), ".2f"),
        "best return (100)": fmt(float(np.nanmax(best)) if np.isfinite(best).any() else None, ".2f"),
        "wall time (s)": fmt(last.get("elapsed_s")),
    }


def _fmt_mean_sem(values: Sequence[float], of: int) -> str:
    """``mean ± s.e.``, just the value for one run, ``(k of n)`` when only k of the group's n have it."""
    mean, sem, n = mean_and_sem(values)
    if n == 0:
        return "n/a"
    text = f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {sem:.2f}"
    return text if n == of else f"{text} ({n} of {of})"


def _mean_forgetting(run: Run) -> float:
    """The run's forgetting averaged over tasks (continual.json), NaN without it."""
    per_task = (run.continual or {}).get("forgetting")
    values = [v for v in per_task.values() if isinstance(v, (int, float))] if isinstance(per_task, dict) else []
    return float(np.mean(values)) if values else float("nan")


def _comparison(group: Group, *, continual: bool) -> dict[str, str]:
    """One row of the comparison table: the group's size and its results as mean ± standard error."""
    n = len(group.runs)
    steps = [float(np.nanmax(r.column("env_steps"))) for r in group.runs]  # load_run ensured one exists
    seeds = [s for s in group.seeds() if s is not None]
    row = {
        "group": group.name, "runs": str(n), "seeds": ", ".join(map(str, seeds)) or "n/a",
        "env steps": f"{min(steps):,.0f}" if min(steps) == max(steps) else f"{min(steps):,.0f}–{max(steps):,.0f}",
        "final return (100)": _fmt_mean_sem([r.final_return() for r in group.runs], n),
    }
    if continual:
        row["average performance"] = _fmt_mean_sem(
            [(r.continual or {}).get("average_performance", float("nan")) for r in group.runs], n)
        row["forgetting (mean over tasks)"] = _fmt_mean_sem([_mean_forgetting(r) for r in group.runs], n)
    return row


_CAPTIONS = {
    "learning_curve": "Mean return of the last 100 episodes (line) and of each interval (dots, single runs); "
                      f"groups of runs: mean over the runs, shaded {SPREAD}; dashed lines: task switches.",
    "evaluation": "Evaluation return of every task (evaluations.jsonl: near-greedy policy, never training); shaded: "
                  f"every other stay on a task (one group), {SPREAD} around a group's mean; dashed lines: task switches.",
    "plasticity": "Plasticity diagnostics (evergreen_plasticity_*): per layer for one run, network totals when "
                  f"comparing (groups: mean, shaded {SPREAD}).",
    "throughput": "Throughput, replay size, learner wait, policy lag and actors against wall time.",
    "losses": "Learner metrics averaged over each log interval.",
    "interventions": "Metrics reported by the plasticity interventions (<intervention>/<metric>).",
}


def _table(rows: Sequence[dict[str, str]], *, table_id: str, row_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    tr = f'<tr class="{row_class}">' if row_class else "<tr>"
    body = "".join(tr + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _html(runs: Sequence[Run], groups: Sequence[Group], images: Sequence[tuple[str, Path]],
          warnings: Sequence[str]) -> str:
    runs_table = _table([_summary(r) for r in runs], table_id="runs")
    comparison = ""
    if len(runs) > 1:
        continual = any(r.continual for r in runs)
        rows = [_comparison(g, continual=continual) for g in groups]
        comparison = (f"<h2>Groups</h2><p>Runs grouped so that each group differs only in its seeds; values are "
                      f"the mean over a group's runs {SPREAD} (sample standard deviation / sqrt(n)).</p>"
                      + _table(rows, table_id="groups", row_class="group") + "<h2>Runs</h2>")
    figures = "".join(
        f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(_CAPTIONS[name])}'
        f"</figcaption></figure>" for name, path in images)
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    title = "Evergreen report: " + ", ".join(r.path.resolve().name for r in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}figure{{margin:2em 0}}figcaption{{color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1>
{comparison}{runs_table}
{f"<ul class='warnings'>{warn}</ul>" if warn else ""}
{figures}
</body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evergreen report",
                                     description="Plot runs' metrics logs to PNGs and one HTML page; several "
                                                 "runs are grouped by config and each group's seeds drawn as "
                                                 f"a mean with a {SPREAD} band.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by evergreen train")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: RUN_DIR/report, or <parent>/report-compare for several)")
    parser.add_argument("--group-by", default="config", metavar="KEY",
                        help="config (default): runs whose config.json differs only in seeds and run names form "
                             "a group; interventions: by plasticity.interventions alone; none: one line per "
                             "run; or comma-separated dotted config fields, e.g. plasticity.interventions,dqn.lr")
    return parser


def main(argv: Sequence[str]) -> int:
    """``evergreen report RUN_DIR [RUN_DIR ...] [--out DIR] [--group-by KEY]``; returns the exit status."""
    args = build_parser().parse_args(list(argv))
    try:
        page = render_report(args.run_dirs, out=args.out, group_by=args.group_by,
                             on_warning=lambda w: print(f"evergreen report: warning: {w}", file=sys.stderr))
    except ReportError as exc:
        print(f"evergreen report: {exc}", file=sys.stderr)
        return 2
    print(f"evergreen report: wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
