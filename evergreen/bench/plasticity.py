"""Synthetic continual-learning benchmark of plasticity interventions: ``evergreen bench plasticity``.

The task sequence (Lyle et al. 2023/2024 style random-label memorization): one fixed set of
``inputs`` Gaussian vectors; task ``t`` assigns fresh uniformly random labels out of ``classes``
and the network gets a fixed budget of ``steps`` Adam updates (minibatches of ``batch``) to fit them.
*Fit* = training accuracy on the whole input set at the end of the task (1 = memorized, chance
= 1/classes). A plastic network fits every task about as well as the first one; the plain MLP
does not. The same inputs, label sequence and initial weights are used for every method of a seed.

Each method is ``+``-joined intervention names (``baseline`` = none), built through
:func:`plasticity.interventions.build_interventions` with :data:`METHOD_OPTIONS`; its network is
``learner.networks.build_network`` with the interventions' ``network_overrides`` applied, and the
hooks are driven exactly as :mod:`plasticity.base` documents (``setup``; per step ``loss`` ->
backward -> ``opt.step()`` -> ``ctx.step += 1`` -> ``after_step(probe_obs=...)``; between tasks
``on_task_switch``). Diagnostics (dormant ratio, srank, weight norm) come from
:class:`plasticity.diagnostics.Diagnostics` on a fixed probe subset at the end of every task.

Example::

    evergreen bench plasticity --tasks 20 --seeds 3 --out runs/bench-plasticity
    evergreen bench plasticity --quick          # seconds; for smoke tests
    evergreen bench plasticity --measure-cost   # diagnostics cost vs one learner update

It lives in ``evergreen.bench`` rather than ``plasticity/`` because it builds learner networks, and
``plasticity`` imports only torch, numpy and itself.

Outputs in ``--out``: ``per_task.csv`` and ``results.json`` (every task of every method and seed),
``summary.json`` (the table), ``fit_per_task.png`` (mean fit per task, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from learner.networks import NetworkConfig, build_network
from plasticity.base import Intervention, InterventionContext, network_overrides
from plasticity.diagnostics import Diagnostics
from plasticity.interventions import build_interventions

DEFAULT_METHODS = "baseline,layer_norm+weight_decay,redo,shrink_perturb,continual_backprop,nap"

#: Per-intervention options used by the benchmark (scaled to its 400-step tasks).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # Decoupled: p <- p * (1 - lr * wd) per step, AdamW's convention.
    "weight_decay": {"weight_decay": 1e-2},
    # Twice per task; a large-ish tau since units here go quiet rather than fully dead.
    "redo": {"period": 200, "tau": 0.1},
    # Shrink toward a fresh init at every task switch (SR-SPR's 0.8 / 0.2 interpolation).
    "shrink_perturb": {"alpha": 0.8, "sigma": 0.2, "on_task_switch": True},
    # 3e-3 (about 1 of 384 units per step): 1e-4 / 1e-3 only delay the decline within 20 tasks here,
    # 1e-2 replaces units faster than they learn (first-task fit 0.61); see BENCHMARKS.md.
    "continual_backprop": {"replacement_rate": 3e-3, "decay": 0.99, "maturity": 100},
    "nap": {"period": 1},
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines one benchmark run (defaults: the full CPU benchmark on 2 cores)."""

    tasks: int = 20
    seeds: int = 3
    methods: str = DEFAULT_METHODS
    inputs: int = 1024
    input_dim: int = 32
    classes: int = 10
    width: int = 128
    depth: int = 3
    steps: int = 400
    batch: int = 128
    lr: float = 1e-3
    probe: int = 256
    out: str = "runs/bench-plasticity"
    threads: int = 1
    workers: int = 2

    def validate(self) -> BenchConfig:
        for name in ("tasks", "seeds", "inputs", "input_dim", "classes", "width", "depth", "steps", "batch",
                     "probe", "threads", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.classes < 2:
            raise ValueError(f"classes must be >= 2, got {self.classes}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        parse_methods(self.methods)
        return self


QUICK = {"tasks": 3, "seeds": 1, "inputs": 128, "width": 32, "depth": 2, "steps": 30, "batch": 32, "probe": 64}


def parse_methods(methods: str) -> list[tuple[str, list[str]]]:
    """``"baseline,layer_norm+weight_decay"`` -> ``[("baseline", []), ("layer_norm+weight_decay", [...])]``."""
    out = []
    for method in (m.strip() for m in methods.split(",")):
        if not method:
            continue
        names = [] if method == "baseline" else [n.strip() for n in method.split("+")]
        if any(not n for n in names) or "baseline" in names:
            raise ValueError(f"bad method {method!r}: use 'baseline' or '+'-joined intervention names")
        out.append((method, names))
    if not out:
        raise ValueError(f"no methods in {methods!r}; e.g. {DEFAULT_METHODS!r}")
    seen = [m for m, _ in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"method listed twice in {methods!r}")
    return out


def build_method(names: list[str]) -> list[Intervention]:
    """The interventions of one method with :data:`METHOD_OPTIONS` (validated by the registry)."""
    if not names:
        return []
    return build_interventions(",".join(names), {n: METHOD_OPTIONS[n] for n in names if n in METHOD_OPTIONS})


def build_net(cfg: BenchConfig, overrides: dict[str, Any]) -> torch.nn.Module:
    """The benchmark MLP through ``learner.networks`` with the interventions' overrides applied."""
    net_cfg = NetworkConfig(encoder="mlp", hidden_sizes=(cfg.width,) * cfg.depth)
    unknown = sorted(set(overrides) - {"norm", "activation"})
    if unknown:
        raise ValueError(f"network overrides {unknown} are not NetworkConfig fields this benchmark sets")
    return build_network(replace(net_cfg, **overrides), obs_shape=(cfg.input_dim,), num_actions=cfg.classes,
                         obs_dtype="float32")


def run_one(cfg: BenchConfig, method: str, names: list[str], seed: int,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train one method on one seed's task sequence; one result dict per task."""
    data_gen = torch.Generator().manual_seed(1_000 + seed)
    inputs = torch.randn(cfg.inputs, cfg.input_dim, generator=data_gen)
    labels = torch.randint(0, cfg.classes, (cfg.tasks, cfg.inputs), generator=data_gen)
    probe = inputs[: cfg.probe]
    interventions = build_method(names)
    torch.manual_seed(seed)  # identical initial weights for identical architectures
    net = build_net(cfg, network_overrides(interventions))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    ctx = InterventionContext(network=net, optimizer=opt, generator=torch.Generator().manual_seed(seed))
    for iv in interventions:
        iv.setup(ctx)
    diag = Diagnostics(net, names="dormant_ratio,srank,weight_norm", probe_obs=probe)
    batch_gen = torch.Generator().manual_seed(2_000 + seed)
    rows = []
    for task in range(cfg.tasks):
        started = time.perf_counter()
        ctx.task = task
        if task > 0:
            for iv in interventions:
                iv.on_task_switch(ctx)
        y = labels[task]
        net.train()
        for _ in range(cfg.steps):
            idx = torch.randint(0, cfg.inputs, (cfg.batch,), generator=batch_gen)
            obs = inputs[idx]
            feats = net.features(obs)
            loss = F.cross_entropy(net.head(feats), y[idx])
            for iv in interventions:
                extra = iv.loss(ctx, obs=obs, features=feats)
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.step += 1
            for iv in interventions:
                iv.after_step(ctx, probe_obs=probe)
        net.eval()
        with torch.no_grad():
            logits = net(inputs)
            fit = float((logits.argmax(dim=1) == y).float().mean())
            task_loss = float(F.cross_entropy(logits, y))
        d = diag.compute()
        rows.append({
            "method": method, "seed": seed, "task": task, "fit": fit, "loss": task_loss,
            "dormant_ratio": d["dormant_ratio/total"], "srank": d["srank"], "weight_norm": d["weight_norm/total"],
            "seconds": time.perf_counter() - started,
        })
        if not math.isfinite(task_loss):
            log(f"  {method} seed {seed}: loss diverged at task {task}")
    return rows


def _run_job(job: tuple[BenchConfig, str, list[str], int]) -> list[dict[str, Any]]:
    """One (method, seed) in a worker process, single-threaded (workers already fill the cores)."""
    cfg, method, names, seed = job
    torch.set_num_threads(cfg.threads)
    return run_one(cfg, method, names, seed, log=lambda s: print(s, flush=True))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Per method: mean/std over seeds of first-task fit, final-task fit, mean fit over the last 5
    tasks, first-task and last-5 mean end-of-task loss, and end-of-run dormant ratio, srank and
    weight norm; plus per-seed verdicts.

    Verdicts, per seed: the baseline *loses plasticity* if its last-5 fit is below half its
    first-task fit; a method *keeps plasticity* if its last-5 fit is at least 0.9x the baseline's
    first-task fit of that seed (the fit a fresh network reaches in the budget).
    """
    last = min(5, cfg.tasks)
    by_method: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {}).setdefault(row["seed"], []).append(row)
    baseline_first = {s: rs[0]["fit"] for s, rs in by_method.get("baseline", {}).items()}
    out = {}
    for method, seeds in by_method.items():
        per_seed = {s: sorted(rs, key=lambda r: r["task"]) for s, rs in seeds.items()}
        stats: dict[str, Any] = {}
        metrics = {
            "first_fit": lambda rs: rs[0]["fit"],
            "final_fit": lambda rs: rs[-1]["fit"],
            "last5_fit": lambda rs: statistics.fmean(r["fit"] for r in rs[-last:]),
            "first_loss": lambda rs: rs[0]["loss"],
            "last5_loss": lambda rs: statistics.fmean(r["loss"] for r in rs[-last:]),
            "dormant_ratio": lambda rs: rs[-1]["dormant_ratio"],
            "srank": lambda rs: rs[-1]["srank"],
            "weight_norm": lambda rs: rs[-1]["weight_norm"],
        }
        for key, fn in metrics.items():
            stats[key] = _mean_std([fn(rs) for rs in per_seed.values()])
        verdicts = {}
        for seed, rs in per_seed.items():
            last5 = metrics["last5_fit"](rs)
            if method == "baseline":
                verdicts[seed] = "lost" if last5 < 0.5 * rs[0]["fit"] else "kept"
            elif seed in baseline_first:
                verdicts[seed] = "kept" if last5 >= 0.9 * baseline_first[seed] else "lost"
        stats["verdicts"] = verdicts
        stats["seconds"] = sum(r["seconds"] for rs in per_seed.values() for r in rs)
        out[method] = stats
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    cols = [("first_fit", "first-task fit", 3), ("final_fit", "final-task fit", 3), ("last5_fit", "last-5 fit", 3),
            ("first_loss", "first-task loss", 3), ("last5_loss", "last-5 loss", 3), ("dormant_ratio", "dormant", 3),
            ("srank", "srank", 1), ("weight_norm", "weight norm", 1)]
    header = "| method | " + " | ".join(c[1] for c in cols) + " | plasticity (per seed) |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    for method, stats in summary.items():
        cells = [f"{stats[k][0]:.{p}f} ± {stats[k][1]:.{p}f}" for k, _, p in cols]
        verdict = " ".join(stats["verdicts"][s] for s in sorted(stats["verdicts"])) or "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, cfg: BenchConfig) -> None:
    """Two panels per task, mean ± std over seeds: fit (accuracy) and end-of-task loss (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = list(range(1, cfg.tasks + 1))
    for method in dict.fromkeys(r["method"] for r in rows):
        for ax, key in ((ax_fit, "fit"), (ax_loss, "loss")):
            per_task = [[r[key] for r in rows if r["method"] == method and r["task"] == t] for t in range(cfg.tasks)]
            mean = [statistics.fmean(v) for v in per_task]
            std = [statistics.pstdev(v) if len(v) > 1 else 0.0 for v in per_task]
            ax.plot(xs, mean, marker="o", markersize=3, label=method)
            ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15)
    ax_fit.axhline(1 / cfg.classes, color="grey", linestyle=":", linewidth=1, label="chance")
    ax_fit.set_ylabel(f"training accuracy after {cfg.steps} steps")
    ax_fit.set_ylim(0, 1.05)
    ax_fit.legend(fontsize=8, loc="lower left")
    ax_loss.set_ylabel("training cross-entropy at the end of the task")
    ax_loss.set_yscale("log")
    for ax in (ax_fit, ax_loss):
        ax.set_xlabel("task")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Random-label memorization: {cfg.inputs} inputs, {cfg.classes} classes, MLP {cfg.depth}x{cfg.width}, "
                 f"Adam lr {cfg.lr:g}, {cfg.seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method x seed, write the outputs into ``cfg.out`` and return the summary."""
    cfg.validate()
    methods = parse_methods(cfg.methods)
    for _, names in methods:  # fail on a bad name before spending minutes on other methods
        build_method(names)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, method, names, seed) for seed in range(cfg.seeds) for method, names in methods]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    started = time.perf_counter()

    def report(job_rows: list[dict[str, Any]]) -> None:
        first = job_rows[0]
        results[(first["seed"], first["method"])] = job_rows
        fits = " ".join(f"{r['fit']:.2f}" for r in job_rows)
        log(f"[{time.perf_counter() - started:6.1f}s] seed {first['seed']} {first['method']:<26} "
            f"({sum(r['seconds'] for r in job_rows):.1f}s) fit per task: {fits}")

    if cfg.workers == 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            for job in jobs:
                report(run_one(*job, log=log))
        finally:
            torch.set_num_threads(previous_threads)
    else:
        # Jobs are independent and seeded on their own, so results do not depend on the worker count.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_job, job) for job in jobs]
            for future in as_completed(futures):
                report(future.result())
    rows = [r for seed in range(cfg.seeds) for method, _ in methods for r in results[(seed, method)]]
    summary = summarize(rows, cfg)
    fields = list(rows[0])
    with open(out_dir / "per_task.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
    (out_dir / "summary.json").write_text(json.dumps({"config": asdict(cfg), "summary": summary}, indent=1))
    plot(rows, out_dir / "fit_per_task.png", cfg)
    table = format_table(summary)
    log("\n" + table)
    log(f"\nfit = training accuracy on all {cfg.inputs} inputs after each task's {cfg.steps} steps "
        f"(chance {1 / cfg.classes:.2f}); mean ± std over {cfg.seeds} seed(s); dormant/srank/weight norm "
        f"at the end of the last task. Verdicts: baseline 'lost' if last-5 fit < 0.5x its first-task fit; "
        f"others 'kept' if last-5 fit >= 0.9x the baseline's first-task fit.")
    log(f"total {time.perf_counter() - started:.1f}s; outputs in {out_dir}/ (per_task.csv, results.json, "
        f"summary.json, fit_per_task.png)")
    return {"summary": summary, "table": table, "rows": rows}


# --------------------------------------------------------------------------- diagnostics cost
def measure_diagnostics_cost(*, encoder: str = "nature_cnn", batch: int = 32, probe: int = 256, repeats: int = 5,
                             every: int = 1000, log: Callable[[str], None] = print) -> dict[str, float]:
    """Time one Adam update on ``batch`` against one default-set :meth:`Diagnostics.compute` on ``probe``.

    Returns seconds per update, per diagnostics call, and the diagnostics' share of update time
    at one call every ``every`` updates: ``diag / (every * update)``.
    """
    if encoder == "nature_cnn":
        net = build_network(NetworkConfig(encoder="nature_cnn"), obs_shape=(4, 84, 84), num_actions=18,
                            obs_dtype="uint8")
        make_obs = lambda n: torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8)  # noqa: E731
    elif encoder == "mlp":
        net = build_network(NetworkConfig(encoder="mlp", hidden_sizes=(256, 256)), obs_shape=(64,),
                            num_actions=18, obs_dtype="float32")
        make_obs = lambda n: torch.randn(n, 64)  # noqa: E731
    else:
        raise ValueError(f"encoder must be 'nature_cnn' or 'mlp', got {encoder!r}")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    obs, targets = make_obs(batch), torch.randn(batch, 18)
    diag = Diagnostics(net, names="default", every=every, probe_obs=make_obs(probe))

    def update() -> None:
        loss = F.mse_loss(net(obs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    update()  # warm-up
    diag.compute()
    t0 = time.perf_counter()
    for _ in range(repeats):
        update()
    update_s = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        diag.before_step()
        update()
        diag.compute()
    diag_s = max((time.perf_counter() - t0) / repeats - update_s, 0.0)
    result = {"update_s": update_s, "diagnostics_s": diag_s, "ratio_per_call": diag_s / update_s,
              "fraction_at_schedule": diag_s / (every * update_s)}
    log(f"{encoder}: update (Adam, batch {batch}) {update_s * 1e3:.1f} ms; default diagnostics on "
        f"{probe} probe obs {diag_s * 1e3:.1f} ms = {result['ratio_per_call']:.1f} updates; every {every} "
        f"updates -> {100 * result['fraction_at_schedule']:.2f}% of update time")
    return result


def main(argv: list[str]) -> int:
    """``evergreen bench plasticity [--tasks N] [--seeds N] [--methods ...] [--out DIR] [--quick]``."""
    parser = argparse.ArgumentParser(prog="evergreen bench plasticity", description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--tasks", type=int, default=None, help=f"tasks in the sequence (default {defaults.tasks})")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {defaults.seeds})")
    parser.add_argument("--methods", default=defaults.methods, help="comma-separated; '+' combines interventions")
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps per task (default {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads per worker")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help=f"parallel processes, one (method, seed) each (default {defaults.workers})")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    parser.add_argument("--measure-cost", action="store_true",
                        help="time the default diagnostics against one learner update and exit")
    args = parser.parse_args(argv)
    if args.measure_cost:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)  # one thread: stable timings on a shared machine
        try:
            for encoder in ("nature_cnn", "mlp"):
                measure_diagnostics_cost(encoder=encoder, repeats=5 if encoder == "nature_cnn" else 20)
        finally:
            torch.set_num_threads(previous_threads)
        return 0
    fields: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("tasks", "seeds", "steps"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        cfg = replace(defaults, methods=args.methods, lr=args.lr, out=args.out, threads=args.threads,
                      workers=args.workers, **fields)
        cfg.validate()
    except ValueError as exc:
        print(f"evergreen bench plasticity: {exc}", file=sys.stderr)
        return 2
    print(f"plasticity benchmark: {cfg.tasks} tasks x {cfg.seeds} seeds x {len(parse_methods(cfg.methods))} "
          f"methods, {cfg.steps} steps/task", flush=True)
    run_benchmark(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
