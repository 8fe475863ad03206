"""Learning benchmark: the cartpole preset over several seeds, to a 100-episode mean return >= 475.

    .venv/bin/python benchmarks/learning_cartpole.py [--seeds 0,1,2] [--max-env-steps 100000]

Each seed is a full `evergreen train` run (Ray actors, gRPC replay, learner) in a fresh Ray session.
Prints one row per seed (env steps and wall time to solve, or the final mean return if unsolved)
and the targets: every seed within 100k env steps and 10 minutes on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evergreen.config import load_config  # noqa: E402
from evergreen.train import Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-env-steps", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="evergreen-bench-cartpole-"))
    rows = []
    for seed in seeds:
        config = load_config(preset="cartpole", overrides={
            "seed": seed, "learner": {"total_env_steps": args.max_env_steps, "log_every_s": 10.0},
        }).validate()
        start = time.time()
        summary = Trainer(config, run_dir=root / f"seed{seed}").run()
        rows.append((seed, summary, time.time() - start))
        print(f"-- seed {seed}: {summary.stopped_by}", flush=True)
    print("\n| seed | solved | env steps | wall time (s) | updates | mean return (last 100) |")
    print("|---:|:---:|---:|---:|---:|---:|")
    for seed, s, wall in rows:
        ret = "n/a" if s.mean_return_100 is None else f"{s.mean_return_100:.1f}"
        print(f"| {seed} | {'yes' if s.solved else 'no'} | {s.env_steps:,} | {wall:.0f} | {s.updates:,} | {ret} |")
    ok = all(s.solved and s.env_steps <= 100_000 and wall <= 600 for _, s, wall in rows)
    print(f"\ntarget (every seed solves within 100k env steps and 10 minutes): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
