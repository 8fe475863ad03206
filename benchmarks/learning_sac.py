"""Learning benchmark for SAC: the pendulum preset over several seeds, and a peer under the same rule.

    .venv/bin/python benchmarks/learning_sac.py [--seeds 0,1,2] [--peer sb3] [--burn 2]

Each Evergreen seed is a full `evergreen train --preset pendulum` run (a Ray actor, a gRPC replay
shard, the learner as a Ray actor) in a fresh Ray session. The stopping rule, for every row: the
mean undiscounted return of the last 20 finished training episodes reaches -200, or 20k env steps.

Peer (``--peer sb3``, needs the ``peers`` extra: ``pip install -e '.[peers]'``): Stable-Baselines3
SAC with rl-baselines3-zoo's Pendulum hyperparameters (hyperparams/sac.yml: learning rate 1e-3, the
SB3 defaults otherwise: batch 256, buffer 1M, 100 random steps, tau 0.005, gamma 0.99, one gradient
step per env step, automatic entropy, MLPs 256x256), one env, one torch thread (as Evergreen's
learner).

``--burn N`` runs N CPU-burning processes beside the benchmark (the machine under load): learning
is tied to env steps and updates by the rate limiter, so the env steps to reach -200 should not change.
Target: every Evergreen seed within 20k env steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _system import cpu_burners  # noqa: E402

from evergreen.config import load_config  # noqa: E402
from evergreen.train import Trainer  # noqa: E402

SOLVED_AT = -200.0
WINDOW = 20


def run_evergreen(seed: int, max_env_steps: int, root: Path) -> dict:
    config = load_config(preset="pendulum", overrides={
        "seed": seed, "learner": {"total_env_steps": max_env_steps, "stop_at_return": SOLVED_AT,
                                  "stop_window": WINDOW, "log_every_s": 10.0},
    }).validate()
    start = time.time()
    summary = Trainer(config, run_dir=root / f"evergreen-seed{seed}").run()
    returns = _last_returns(root / f"evergreen-seed{seed}")
    return {"system": "evergreen sac", "seed": seed, "solved": summary.solved, "env_steps": summary.env_steps,
            "updates": summary.updates, "wall_s": time.time() - start,
            "mean_return": sum(returns) / len(returns) if returns else None}


def _last_returns(run_dir: Path) -> list[float]:
    """The returns of the run's last WINDOW episodes, from its checkpoint's recent returns."""
    from learner.checkpoint import load_latest_checkpoint

    state = load_latest_checkpoint(run_dir / "checkpoints")
    return list(state["recent_returns"])[-WINDOW:] if state else []


def run_sb3(seed: int, max_env_steps: int) -> dict:
    import numpy as np
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    class StopWhenSolved(BaseCallback):
        def _on_step(self) -> bool:
            last = list(self.model.ep_info_buffer)[-WINDOW:]
            return not (len(last) == WINDOW and np.mean([e["r"] for e in last]) >= SOLVED_AT)

    torch.set_num_threads(1)
    start = time.time()
    model = SAC("MlpPolicy", "Pendulum-v1", learning_rate=1e-3, seed=seed, verbose=0)
    model.learn(total_timesteps=max_env_steps, callback=StopWhenSolved())
    last = [e["r"] for e in list(model.ep_info_buffer)[-WINDOW:]]
    mean = float(np.mean(last)) if last else None
    return {"system": "sb3-sac (zoo)", "seed": seed, "solved": len(last) == WINDOW and mean >= SOLVED_AT,
            "env_steps": int(model.num_timesteps), "updates": int(model._n_updates), "wall_s": time.time() - start,
            "mean_return": mean}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-env-steps", type=int, default=20_000)
    parser.add_argument("--peer", choices=["sb3", "none"], default="sb3")
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes to run beside the benchmark")
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="evergreen-bench-sac-"))
    rows = []
    with cpu_burners(args.burn):
        for seed in seeds:
            rows.append(run_evergreen(seed, args.max_env_steps, root))
            print(f"-- evergreen seed {seed}: {rows[-1]}", flush=True)
        if args.peer == "sb3":
            for seed in seeds:
                rows.append(run_sb3(seed, args.max_env_steps))
                print(f"-- sb3 seed {seed}: {rows[-1]}", flush=True)
    print(f"\nload: {args.burn} CPU-burning processes beside the benchmark on {os.cpu_count()} cores")
    print(f"| system | seed | reached {SOLVED_AT:g} | env steps | updates | wall time (s) | mean return (last {WINDOW}) |")
    print("|---|---:|:---:|---:|---:|---:|---:|")
    for r in rows:
        ret = "n/a" if r["mean_return"] is None else f"{r['mean_return']:.1f}"
        print(f"| {r['system']} | {r['seed']} | {'yes' if r['solved'] else 'no'} | {r['env_steps']:,} | "
              f"{r['updates']:,} | {r['wall_s']:.0f} | {ret} |")
    ours = [r for r in rows if r["system"].startswith("evergreen")]
    ok = all(r["solved"] and r["env_steps"] <= args.max_env_steps for r in ours)
    print(f"\ntarget (every Evergreen seed reaches {SOLVED_AT:g} over {WINDOW} episodes within "
          f"{args.max_env_steps:,} env steps): {'met' if ok else 'NOT met'} ({sum(r['solved'] for r in ours)}/{len(ours)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
