"""Learning benchmark for SAC on MuJoCo: HalfCheetah-v5 return curves of the halfcheetah presets.

    .venv/bin/python benchmarks/learning_halfcheetah.py [--env-steps 100000] [--seeds 0] [--variants rr1,rr8,rr8-reset]
        [--reset-every UPDATES] [--jobs 2]

Variants (each a full `evergreen train` run: a Ray actor, a gRPC replay shard, the learner as a Ray actor):

* ``rr1``: the ``halfcheetah`` preset (CleanRL's SAC settings, one update per env step);
* ``rr8``: the ``halfcheetah-rr`` preset without its resets (8 updates per env step);
* ``rr8-reset``: ``halfcheetah-rr`` as it is (resets of actor, critic, Adam states and temperature every
  200k updates): the primacy-bias comparison.

The table gives the mean return of the episodes finished in each tenth of the run, per variant and seed,
and the plot the curves. Reference: CleanRL's SAC (sac_continuous_action) reports about 9.6k on
HalfCheetah-v4 after 1M env steps; a 100k-step run sees the first tenth of that budget, so it shows
whether the curve rises as SAC's does early on, not the final number. Each rr8 run makes 8x the
updates of rr1 (on 2 CPUs, hours for 100k env steps). ``--reset-every`` changes the reset period of
``rr8-reset`` (in updates) for a shorter run; ``--jobs N`` runs N of the runs at once, each in its own
process (learning depends on env steps and updates only, so running side by side changes the wall
times, not the curves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evergreen.config import load_config  # noqa: E402
from evergreen.train import Trainer  # noqa: E402

VARIANTS = {
    "rr1": ("halfcheetah", {}),
    "rr8": ("halfcheetah-rr", {"sac": {"reset_every": None}}),
    "rr8-reset": ("halfcheetah-rr", {}),
}
CLEANRL_1M = 9.6e3  # CleanRL SAC, HalfCheetah-v4, 1M env steps (its published benchmark)


def run(variant: str, seed: int, env_steps: int, root: Path, reset_every: int | None = None) -> dict:
    preset, overrides = VARIANTS[variant]
    if reset_every is not None and variant == "rr8-reset":
        overrides = {**overrides, "sac": {**overrides.get("sac", {}), "reset_every": reset_every}}
    config = load_config(preset=preset, overrides={
        **overrides, "seed": seed,
        "learner": {"total_env_steps": env_steps, "log_every_s": 15.0, "checkpoint_every_s": 600.0},
    }).validate()
    run_dir = root / f"{variant}-seed{seed}"
    start = time.time()
    summary = Trainer(config, run_dir=run_dir).run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"variant": variant, "seed": seed, "env_steps": summary.env_steps, "updates": summary.updates,
            "wall_s": time.time() - start, "records": records}


def curve(records: list[dict], env_steps: int, bins: int = 10) -> list[float | None]:
    """Mean return of the episodes finished in each of ``bins`` equal spans of env steps (weighted by episodes)."""
    sums, counts = [0.0] * bins, [0] * bins
    previous = 0
    for r in records:
        finished = r["episodes"] - previous
        previous = r["episodes"]
        if finished <= 0 or r.get("return_recent") is None:
            continue
        b = min(bins - 1, int(r["env_steps"] * bins / env_steps))
        sums[b] += r["return_recent"] * finished
        counts[b] += finished
    return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def plot(results: list[dict], env_steps: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        # The episodes finished in each log interval (the last-100 mean would trail by the whole run).
        points = [(rec["env_steps"], rec["return_recent"]) for rec in r["records"]
                  if rec.get("return_recent") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=f"{r['variant']} seed {r['seed']}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("return of the episodes finished in each log interval")
    ax.set_title(f"SAC on HalfCheetah-v5, {env_steps:,} env steps (CleanRL v4 at 1M: ~{CLEANRL_1M:,.0f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report(r: dict) -> None:
    print(f"-- {r['variant']} seed {r['seed']}: {r['env_steps']:,} env steps, {r['updates']:,} updates, "
          f"{r['wall_s']:.0f} s", flush=True)


def _run_in_processes(runs: list[tuple[str, int]], args: argparse.Namespace, root: Path) -> list[dict]:
    """Each run in a child process of this script, ``args.jobs`` at a time; their results in ``runs`` order."""
    from concurrent.futures import ThreadPoolExecutor

    def child(variant: str, seed: int) -> dict:
        out = root / f"{variant}-seed{seed}.json"
        cmd = [sys.executable, __file__, "--variants", variant, "--seeds", str(seed), "--env-steps",
               str(args.env_steps), "--out", str(root), "--result-json", str(out)]
        if args.reset_every is not None:
            cmd += ["--reset-every", str(args.reset_every)]
        with open(root / f"{variant}-seed{seed}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {root / f'{variant}-seed{seed}.log'}")
        result = json.loads(out.read_text())
        _report(result)
        return result

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(lambda r: child(*r), runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-steps", type=int, default=100_000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="rr1", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    parser.add_argument("--reset-every", type=int, default=None,
                        help="updates between resets in rr8-reset (default: the preset's 200,000)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # one run's result (--jobs > 1)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or args.env_steps < 1000:
        parser.error(f"--variants {unknown} unknown (expected some of {sorted(VARIANTS)})" if unknown
                     else f"--env-steps {args.env_steps}: expected >= 1000")
    if args.jobs < 1 or (args.reset_every is not None and args.reset_every < 1):
        parser.error(f"--jobs {args.jobs} / --reset-every {args.reset_every}: expected integers >= 1")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="evergreen-bench-halfcheetah-"))
    runs = [(variant, int(seed)) for variant in variants for seed in args.seeds.split(",")]
    if args.result_json:   # a child of --jobs: one run, its result to a file
        (variant, seed), = runs
        Path(args.result_json).write_text(json.dumps(run(variant, seed, args.env_steps, root, args.reset_every)))
        return 0
    results = []
    if args.jobs == 1:
        for variant, seed in runs:
            results.append(run(variant, seed, args.env_steps, root, args.reset_every))
            _report(results[-1])
    else:
        results = _run_in_processes(runs, args, root)
    if not args.out:
        print(f"run directories: {root}")
    tenth = args.env_steps // 10
    print("\n| variant | seed | updates | wall (s) | "
          + " | ".join(f"return {i * tenth // 1000}-{(i + 1) * tenth // 1000}k" for i in range(10)) + " |")
    print("|---|---:|---:|---:|" + "---:|" * 10)
    for r in results:
        cells = " | ".join("n/a" if v is None else f"{v:.0f}" for v in curve(r["records"], args.env_steps))
        print(f"| {r['variant']} | {r['seed']} | {r['updates']:,} | {r['wall_s']:.0f} | {cells} |")
    print(f"\nplot: {plot(results, args.env_steps, root / 'halfcheetah.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
