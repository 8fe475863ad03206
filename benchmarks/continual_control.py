"""Continual control benchmark: does a DQN agent lose plasticity over a sequence of CartPole tasks, and
which interventions keep it?

    .venv/bin/python benchmarks/continual_control.py                       # 6 methods x 3 seeds, 2 at a time
    .venv/bin/python benchmarks/continual_control.py --quick               # a minute; a smoke test
    .venv/bin/python benchmarks/continual_control.py --methods baseline,fresh --seeds 0 --out /tmp/cc

The scenario (:func:`benchmark_config`): a warm start, then ``--tasks - 1`` CartPole tasks, all of
``--steps-per-task`` env steps. The warm start is the nominal CartPole with Gaussian noise of standard
deviation ``--warm-noise`` (100; the true reward is 1 per step) on the reward the agent learns from:
a noisy first task, the setting in which warm-started networks are known to train worse than fresh
ones. Every later task is the nominal CartPole seen through its own fixed permutation of the
observation features and of the actions. A freshly initialized MLP finds every such task exactly as
hard as any other (a permutation of its inputs and outputs is a relabelling of its random initial
weights), so the reference is the ``fresh`` method, which re-initializes the whole network (and its
optimizer state) at every switch: ``AUC / fresh`` is the area under a task's evaluation curve divided
by what a fresh network reaches on that task, averaged over the permuted tasks; below 1 is plasticity
lost (or negative transfer), above 1 is a network that learns faster than a fresh one.

Replay is flushed at every switch (``scenario.replay_at_switch: "flush"``), so each task is learned
from its own data only, at 1 update per env step (``samples_per_insert`` = batch size), with a
constant learning rate (a decaying one would itself slow later tasks down), no early stopping, and
the network without layer norm (``layer_norm`` is one of the methods). ``--warm-noise 0`` makes the
first task a permutation like the others (no noisy warm start). ``--warm-scale S`` multiplies the warm
start's learning reward by S (with ``--warm-noise 0``: the nominal task at S times its value scale),
the setting in which this benchmark shows lost trainability (BENCHMARKS.md).

Each (method, seed) is :func:`evergreen.bench.continual.run_lockstep`: the system's actor, replay
table, DQN learner loop, interventions, diagnostics and evaluation protocol in one process, in
lockstep, so the numbers depend on the seed and not on the machine. ``--jobs`` runs them side by side
(one torch thread each). Results go to ``--out``: one JSON per run (a rerun skips the runs already
there: delete them to re-measure), ``summary.json``, the printed table as ``table.md`` and
``continual_control.png`` (evaluation return over env steps with the task boundaries, the dormant
ratio, the feature rank and the plasticity probe over the run; mean over seeds, the band min..max).

The plasticity probe (``diag/plasticity_probe/ratio``, see ``plasticity/diagnostics.py``) measures
trainability directly: a copy of the network fits random regression targets on held-out states for
100 Adam steps, and its final loss is divided by that of a freshly initialized copy (> 1: the trained
network fits new targets worse than a fresh one). It tells whether the network lost plasticity even
when the returns, where transfer between tasks also counts, do not show it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: method name -> (plasticity.interventions, their options). "baseline" is the plain network.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("", {}),
    "layer_norm+weight_decay": ("layer_norm,weight_decay", {}),
    # Scaled to the benchmark's tasks: about four recycling rounds per task.
    "redo": ("redo", {"redo": {"period": 1000, "tau": 0.1}}),
    "shrink_perturb": ("shrink_perturb", {}),      # at every task switch (its default)
    "reset": ("reset", {"reset": {"layers": "head"}}),  # the Q-head's layers at every task switch
    # The reference: a freshly initialized network (and optimizer state) on every task.
    "fresh": ("reset", {"reset": {"layers": "all"}}),
}
DEFAULT_METHODS = tuple(METHODS)


def benchmark_config(method: str, seed: int, *, tasks: int, steps_per_task: int, warm_noise: float,
                     warm_scale: float = 1.0) -> Any:
    """The run config of one (method, seed): see the module docstring."""
    from evergreen.config import load_config

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    interventions, options = METHODS[method]
    task_list = [{"name": f"perm-{k}", "variation": {"permute_observations": True, "permute_actions": True,
                                                     "seed": 100 + k}} for k in range(tasks)]
    if warm_noise or warm_scale != 1.0:
        name = "-".join(([f"noisy-{warm_noise:g}"] if warm_noise else []) +
                        ([f"scaled-{warm_scale:g}"] if warm_scale != 1.0 else []))
        task_list[0] = {"name": name, "variation": {"reward_noise": warm_noise, "reward_scale": warm_scale}}
    return load_config(preset="cartpole", overrides={
        "seed": seed,
        "network": {"norm": "none"},
        "dqn": {"lr": 1e-3, "lr_end": None, "compile": False},
        "replay": {"samples_per_insert": 128.0},
        "actors": {"epsilon_decay_steps": 1000},
        "learner": {"total_env_steps": tasks * steps_per_task, "stop_at_return": None},
        "plasticity": {"interventions": interventions, "options": options, "diagnostics_every": 500,
                       "diagnostics": "dormant_ratio,srank,weight_norm,plasticity_probe"},
        "scenario": {"steps_per_task": steps_per_task, "cycles": 1, "tasks": task_list,
                     "replay_at_switch": "flush"},
    }).validate()


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    from evergreen.bench.continual import run_lockstep

    config = benchmark_config(job["method"], job["seed"], tasks=job["tasks"], steps_per_task=job["steps_per_task"],
                              warm_noise=job["warm_noise"], warm_scale=job.get("warm_scale", 1.0))
    result = run_lockstep(config, eval_every=job["eval_every"], eval_episodes=job["episodes"], progress=None)
    result.update(method=job["method"], seed=job["seed"])
    path = Path(job["path"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def _mean_sd(values: list[float], digits: int = 0) -> str:
    """``mean ± std`` over seeds (one value as is, none as "-")."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _final_diag(result: dict[str, Any], key: str) -> float | None:
    values = [p[key] for p in result["curve"] if key in p]
    return values[-1] if values else None


def summarize(results: list[dict[str, Any]], methods: list[str]) -> tuple[list[dict[str, Any]], str]:
    """Per method, over seeds: each task's AUC, average performance and forgetting at the end, AUC
    relative to the fresh network on the permuted tasks (1..n-1), and the diagnostics at the end."""
    rows, lines = [], []
    tasks = len(results[0]["tasks"])
    later = range(1, tasks)

    def auc(run: dict[str, Any], task: int) -> float:
        return run["continual"]["visit_auc"][str(task)]

    fresh = [r for r in results if r["method"] == "fresh"]
    fresh_auc = {k: statistics.fmean(auc(r, k) for r in fresh) for k in later} if fresh else {}
    head = (["method", "seeds"] + [f"AUC {name}" for name in results[0]["tasks"]]
            + ["avg perf (end)", "forgetting", "AUC / fresh (tasks 1..)", "dormant (end)", "srank (end)",
               "probe loss / fresh (end)", "wall s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        aucs = [[auc(r, k) for r in runs] for k in range(tasks)]
        relative = [statistics.fmean(auc(r, k) / max(fresh_auc[k], 1e-9) for k in later) for r in runs] if fresh else []
        perf = [r["continual"]["average_performance"] for r in runs]
        forget = [statistics.fmean(r["continual"]["forgetting"].values()) for r in runs]
        dormant = [d for r in runs if (d := _final_diag(r, "diag/dormant_ratio/total")) is not None]
        srank = [d for r in runs if (d := _final_diag(r, "diag/srank")) is not None]
        probe = [d for r in runs if (d := _final_diag(r, "diag/plasticity_probe/ratio")) is not None]
        wall = [r["wall_s"] for r in runs]
        rows.append({"method": method, "seeds": [r["seed"] for r in runs], "visit_auc": aucs,
                     "auc_over_fresh": relative, "average_performance": perf, "forgetting_mean": forget,
                     "dormant_end": dormant, "srank_end": srank, "probe_ratio_end": probe, "wall_s": wall})
        cells = ([method, str(len(runs))] + [_mean_sd(a) for a in aucs]
                 + [_mean_sd(perf), _mean_sd(forget), _mean_sd(relative, 2),
                    f"{statistics.fmean(dormant):.3f}" if dormant else "-",
                    f"{statistics.fmean(srank):.0f}" if srank else "-", _mean_sd(probe, 2),
                    f"{statistics.fmean(wall):.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def plot(results: list[dict[str, Any]], methods: list[str], path: Path, *, warm: str = "a noisy warm start") -> Path:
    """Evaluation return of the current task, dormant ratio, srank and the plasticity probe's loss ratio
over env steps (mean over seeds, band min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    visits = results[0]["visits"]
    for ax in axes:
        for i, v in enumerate(visits):
            if i % 2:
                ax.axvspan(v["start"], v["end"], color="0.92", lw=0)
    for color, method in zip(colors, methods, strict=False):
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        series = [("return", [[(e["env_steps"], s["mean"]) for e in r["evaluations"] if e["reason"] == "periodic"
                               for s in e["scores"].values()] for r in runs]),
                  ("dormant", [[(p["env_steps"], p["diag/dormant_ratio/total"]) for p in r["curve"]
                                if "diag/dormant_ratio/total" in p] for r in runs]),
                  ("srank", [[(p["env_steps"], p["diag/srank"]) for p in r["curve"] if "diag/srank" in p]
                             for r in runs]),
                  ("probe", [[(p["env_steps"], p["diag/plasticity_probe/ratio"]) for p in r["curve"]
                              if "diag/plasticity_probe/ratio" in p] for r in runs])]
        for ax, (_, per_run) in zip(axes, series, strict=True):
            per_run = [np.array(points) for points in per_run if points]
            if not per_run:
                continue
            grid = per_run[0][:, 0]
            ys = np.stack([np.interp(grid, p[:, 0], p[:, 1]) for p in per_run])
            ax.plot(grid, ys.mean(axis=0), color=color, label=f"{method} ({len(per_run)} seeds)")
            if len(per_run) > 1:
                ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.15, lw=0)
    axes[0].set_ylabel("evaluation return\n(current task)")
    axes[1].set_ylabel("dormant ratio")
    axes[2].set_ylabel("srank")
    axes[3].set_ylabel("probe loss / fresh\n(> 1: less plastic)")
    axes[3].set_xlabel(f"env steps (a new task at each shaded/unshaded boundary; the first is {warm})")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Continual CartPole: {warm}, then permuted observations and actions; replay flushed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--steps-per-task", type=int, default=6_000)
    parser.add_argument("--warm-noise", type=float, default=100.0,
                        help="reward noise of the first task (the warm start); 0 = a permuted task like the rest")
    parser.add_argument("--warm-scale", type=float, default=1.0,
                        help="factor on the first task's learning reward (the warm start's value-target scale)")
    parser.add_argument("--eval-every", type=int, default=1_000, help="env steps between evaluations of the current task")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes per task")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one core each)")
    parser.add_argument("--out", default="runs/bench-continual-control")
    parser.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 3 tasks of 1500 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.tasks, args.steps_per_task, args.eval_every = (
            "baseline,fresh", "0", 3, 1500, 500)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {list(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.tasks < 2 or args.steps_per_task < 500 or args.jobs < 1 or not args.warm_noise >= 0 or \
            not args.warm_scale > 0:
        parser.error("--tasks must be >= 2, --steps-per-task >= 500, --jobs >= 1, --warm-noise >= 0, --warm-scale > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.tasks}x{args.steps_per_task}-noise{args.warm_noise:g}" + (
        f"-scale{args.warm_scale:g}" if args.warm_scale != 1.0 else "")
    jobs = [{"method": m, "seed": s, "tasks": args.tasks, "steps_per_task": args.steps_per_task,
             "warm_noise": args.warm_noise, "warm_scale": args.warm_scale, "eval_every": args.eval_every,
             "episodes": args.episodes,
             "path": str(out / f"{m}-seed{s}-{tag}.json")}
            for s in seeds for m in methods]
    todo = [j for j in jobs if not Path(j["path"]).exists()]
    print(f"continual_control: {len(jobs)} runs ({len(jobs) - len(todo)} already in {out}), "
          f"{args.tasks} tasks x {args.steps_per_task} env steps, {args.jobs} at a time", flush=True)
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for done, result in enumerate(pool.imap_unordered(_run_one, todo), 1):
            print(f"  [{done}/{len(todo)}] {result['method']} seed {result['seed']}: "
                  f"{result['wall_s']:.0f} s, AUC per task "
                  f"{[round(v) for v in result['continual']['visit_auc'].values()]} "
                  f"({time.time() - start:.0f} s so far)", flush=True)
    results = [json.loads(Path(j["path"]).read_text()) for j in jobs]
    rows, table = summarize(results, methods)
    total = time.time() - start
    header = (f"{len(jobs)} runs, {args.tasks} tasks x {args.steps_per_task} env steps, "
              f"{len(todo)} measured now in {total:.0f} s with {args.jobs} side by side")
    print("\n" + header + "\n\n" + table)
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "args": vars(args), "wall_s": total}, indent=1))
    warm = (f"a warm start with the reward x{args.warm_scale:g}" if args.warm_scale != 1 else
            "a noisy warm start" if args.warm_noise > 0 else "a permuted task")
    print(f"\nplot: {plot(results, methods, out / 'continual_control.png', warm=warm)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
