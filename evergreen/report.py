"""`evergreen report`: plots and one HTML page from runs' metrics logs.

    evergreen report runs/pong-20261121-193000                    # -> runs/pong-.../report/
    evergreen report runs/pong-base runs/pong-redo --out cmp/     # overlay: compare interventions

or from Python::

    from evergreen.report import render_report
    html = render_report(["runs/pong-base", "runs/pong-redo"], out="cmp")

Each run directory holds ``metrics.jsonl`` (one record per log interval, written by ``evergreen train``;
see ``Trainer._record``) and ``config.json``. The report writes PNGs (matplotlib, Agg) and
``index.html``, which embeds them (base64), so the page is one self-contained file:

* ``learning_curve.png`` — mean return of the last 100 episodes (and the interval's mean) against
  env steps; per task when records carry ``task``, task switches as vertical lines;
* ``plasticity.png`` — one panel per diagnostic (``diag/<name>[/<layer>]``), one line per layer
  (``total`` bold); with several runs, one line per run of the network-level value (``total``);
* ``throughput.png`` — env steps/s, updates/s, replay size, learner wait, policy lag, actors
  and restarts against wall time;
* ``losses.png`` — loss, TD error, Q mean, gradient norm, learning rate against env steps;
* ``interventions.png`` — every ``<intervention>/<metric>`` (only when the logs have some).

Several runs are overlaid, labelled ``<run dir name> (<plasticity.interventions>)`` from each run's
config.json. The default output is ``RUN_DIR/report/`` for one run and ``<parent of the first
RUN_DIR>/report-compare/`` for several. A missing, empty or corrupt log is an error naming the
file (a truncated *last* line, as a crash mid-write leaves, is skipped with a warning).
"""

from __future__ import annotations

import argparse
import base64
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


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``run_dir/metrics.jsonl`` (and the interventions from ``run_dir/config.json``)."""
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
    interventions = ""
    config = path / "config.json"
    if config.is_file():
        try:
            interventions = str(json.loads(config.read_text()).get("plasticity", {}).get("interventions") or "")
        except (json.JSONDecodeError, AttributeError) as exc:
            warnings.append(f"{config}: unreadable ({exc}); interventions unknown")
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
    name = path.resolve().name
    return Run(path=path, label=f"{name} ({interventions or 'no interventions'})", interventions=interventions,
               records=records, warnings=warnings, evaluations=evaluations)


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


def _mark_switches(ax, runs: Sequence[Run], colors: Sequence[str]) -> None:
    for run, color in zip(runs, colors, strict=True):
        for steps, task in run.switches():
            ax.axvline(steps, color=color if len(runs) > 1 else "0.3", linestyle="--", linewidth=0.9, alpha=0.8)
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


def plot_learning_curve(runs: Sequence[Run], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = _colors(len(runs))
    for run, color in zip(runs, colors, strict=True):
        steps, mean100, recent = run.column("env_steps"), run.column("return_mean_100"), run.column("return_recent")
        tasks = run.tasks()
        if len(runs) == 1 and any(t is not None for t in tasks):
            # One colour per task: the segments of the curve spent on each task.
            names = list(dict.fromkeys(str(t) for t in tasks if t is not None))
            for name, task_color in zip(names, _colors(len(names)), strict=True):
                mask = np.array([str(t) == name for t in tasks])
                _line(ax, np.where(mask, steps, np.nan), np.where(mask, mean100, np.nan), color=task_color,
                      label=f"{name}: mean of last 100")
                ok = mask & np.isfinite(recent)
                ax.scatter(steps[ok], recent[ok], s=6, color=task_color, alpha=0.35)
        else:
            _line(ax, steps, mean100, color=color, label=f"{run.label}: mean of last 100")
            ok = np.isfinite(steps) & np.isfinite(recent)
            ax.scatter(steps[ok], recent[ok], s=6, color=color, alpha=0.3,
                       label=f"{run.label}: interval mean" if ok.any() else None)
    _mark_switches(ax, runs, colors)
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


def plot_evaluation(runs: Sequence[Run], path: Path) -> Path | None:
    """Evaluation return of every task over env steps (one line per task and run), task stays shaded."""
    if not any(r.evaluations for r in runs):
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    tasks = list(dict.fromkeys(t for r in runs for e in r.evaluations for t in e["scores"]))
    task_colors = dict(zip(tasks, _colors(len(tasks)), strict=True))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        if len(runs) == 1:
            _shade_visits(ax, run)
        entries = sorted(run.evaluations, key=lambda e: e["env_steps"])
        for task in tasks:
            points = [(e["env_steps"], e["scores"][task]["mean"]) for e in entries if task in e["scores"]]
            if points:
                x, y = (np.array(v, dtype=np.float64) for v in zip(*points, strict=True))
                label = task if len(runs) == 1 else f"{run.label}: {task}"
                _line(ax, x, y, color=task_colors[task], linestyle=styles[i % len(styles)], marker="o",
                      markersize=3, label=label)
    _mark_switches(ax, runs, _colors(len(runs)))
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return (mean)")
    return _finish(fig, [ax], path, "Evaluation per task (task stays shaded)")


def plot_plasticity(runs: Sequence[Run], path: Path) -> Path | None:
    per_run = [_diagnostics(r) for r in runs]
    names = list(dict.fromkeys(n for d in per_run for n in d))
    if not names:
        return None
    fig, axes = _grid(len(names))
    colors = _colors(len(runs))
    for ax, name in zip(axes, names, strict=True):
        positive = True
        for run, diags, color in zip(runs, per_run, colors, strict=True):
            layers = diags.get(name, {})
            steps = run.column("env_steps")
            if len(runs) == 1:
                for layer, key in sorted(layers.items(), key=lambda kv: (kv[0] == "total", kv[0])):
                    y = run.column(key)
                    positive &= bool(np.all(y[np.isfinite(y)] > 0))
                    total = layer == "total"
                    _line(ax, steps, y, label=layer, linewidth=2.2 if total else 1.0,
                          color="black" if total else None)
            elif "total" in layers:
                y = run.column(layers["total"])
                positive &= bool(np.all(y[np.isfinite(y)] > 0))
                _line(ax, steps, y, label=run.label, color=color)
        if name in _LOG_SCALE and positive and ax.lines:
            ax.set_yscale("log")
        _mark_switches(ax, runs, colors)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("env steps", fontsize=8)
    return _finish(fig, axes, path, "Plasticity diagnostics" + (" (per layer)" if len(runs) == 1 else " (network)"))


def _panels(runs: Sequence[Run], path: Path, fields: Sequence[tuple[str, str]], *, x: str, title: str) -> Path | None:
    present = [(k, lbl) for k, lbl in fields if any(np.isfinite(r.column(k)).any() for r in runs)]
    if not present:
        return None
    fig, axes = _grid(len(present))
    colors = _colors(len(runs))
    for ax, (key, label) in zip(axes, present, strict=True):
        for run, color in zip(runs, colors, strict=True):
            _line(ax, run.column(x), run.column(key), color=color, label=run.label if len(runs) > 1 else None)
        if x == "env_steps":
            _mark_switches(ax, runs, colors)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("env steps" if x == "env_steps" else "wall time (s)", fontsize=8)
    return _finish(fig, axes, path, title)


def render_report(run_dirs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
                  on_warning: Callable[[str], None] | None = None) -> Path:
    """Write the PNGs and ``index.html`` for ``run_dirs`` into ``out``; return the HTML path.

    ``on_warning`` receives each warning (e.g. a skipped truncated last line); they are also listed
    on the page.
    """
    if not run_dirs:
        raise ReportError("no run directories given; expected at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]  # every log is checked before anything is written
    for run in runs:
        for w in run.warnings:
            if on_warning is not None:
                on_warning(w)
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} #{i + 1}"
    if out is None:
        first = Path(run_dirs[0])
        out = first / "report" if len(runs) == 1 else first.resolve().parent / "report-compare"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg", force=True)
    images: list[tuple[str, Path]] = []
    made = {
        "learning_curve": plot_learning_curve(runs, out / "learning_curve.png"),
        "evaluation": plot_evaluation(runs, out / "evaluation.png"),
        "plasticity": plot_plasticity(runs, out / "plasticity.png"),
        "throughput": _panels(runs, out / "throughput.png", _THROUGHPUT, x="elapsed_s",
                              title="Throughput, replay and actors"),
        "losses": _panels(runs, out / "losses.png", _LOSSES, x="env_steps", title="Learner"),
        "interventions": _panels(
            runs, out / "interventions.png",
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
    tmp.write_text(_html(runs, images))
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


_CAPTIONS = {
    "learning_curve": "Mean return of the last 100 episodes (line) and of each interval (dots); dashed lines: task switches.",
    "evaluation": "Evaluation return of every task (evaluations.jsonl: near-greedy policy, never training); shaded: "
                  "every other stay on a task; dashed lines: task switches.",
    "plasticity": "Plasticity diagnostics (evergreen_plasticity_*): per layer for one run, network totals when comparing.",
    "throughput": "Throughput, replay size, learner wait, policy lag and actors against wall time.",
    "losses": "Learner metrics averaged over each log interval.",
    "interventions": "Metrics reported by the plasticity interventions (<intervention>/<metric>).",
}


def _html(runs: Sequence[Run], images: Sequence[tuple[str, Path]]) -> str:
    rows = [_summary(r) for r in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    warnings = [w for r in runs for w in r.warnings]
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
<table><tr>{head}</tr>{body}</table>
{f"<ul class='warnings'>{warn}</ul>" if warn else ""}
{figures}
</body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evergreen report",
                                     description="Plot runs' metrics logs to PNGs and one HTML page; "
                                                 "several runs are overlaid to compare interventions.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by evergreen train")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: RUN_DIR/report, or <parent>/report-compare for several)")
    return parser


def main(argv: Sequence[str]) -> int:
    """``evergreen report RUN_DIR [RUN_DIR ...] [--out DIR]``; returns the exit status."""
    args = build_parser().parse_args(list(argv))
    try:
        page = render_report(args.run_dirs, out=args.out,
                             on_warning=lambda w: print(f"evergreen report: warning: {w}", file=sys.stderr))
    except ReportError as exc:
        print(f"evergreen report: {exc}", file=sys.stderr)
        return 2
    print(f"evergreen report: wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
