"""Learning benchmark: the cartpole preset over several seeds, and a peer under the same stopping rule.

    .venv/bin/python benchmarks/learning_cartpole.py [--seeds 0,1,2,3,4] [--peer sb3] [--burn 2]

Each Evergreen seed is a full `evergreen train --preset cartpole` run (Ray actor, gRPC replay shard,
the learner as a Ray actor) in a fresh Ray session. The stopping rule, for every row: the mean
undiscounted return of the last 100 finished training episodes reaches 475, or 100k env steps.

Peer (``--peer sb3``, needs the ``peers`` extra: ``pip install -e '.[peers]'``): Stable-Baselines3
DQN with the rl-baselines3-zoo hyperparameters for CartPole-v1 (hyperparams/dqn.yml at zoo commit
ce95481b: lr 2.3e-3, batch 64, buffer 100k, learning_starts 1000, gamma 0.99, target update every 10
steps, train_freq 256 with 128 gradient steps, epsilon linear to 0.04 over 16% of the zoo's 50k
steps, i.e. over the first 8k, MLP 256x256), one env, one torch thread (as Evergreen's learner: on these
small networks more intra-op threads only add synchronization, and on a loaded machine they spin).

``--burn N`` runs N CPU-burning processes beside the benchmark (the machine under load): learning
is tied to env steps and updates by the rate limiter, so the env steps to solve should not change.
Targets: every Evergreen seed solves within 100k env steps and 5 minutes.
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

SOLVED_AT = 475.0
WALL_LIMIT_S = 300.0


def run_evergreen(seed: int, max_env_steps: int, root: Path) -> dict:
    config = load_config(preset="cartpole", overrides={
        "seed": seed, "learner": {"total_env_steps": max_env_steps, "stop_at_return": SOLVED_AT, "log_every_s": 10.0},
    }).validate()
    start = time.time()
    summary = Trainer(config, run_dir=root / f"evergreen-seed{seed}").run()
    return {"system": "evergreen", "seed": seed, "solved": summary.solved, "env_steps": summary.env_steps,
            "updates": summary.updates, "wall_s": time.time() - start, "mean_return": summary.mean_return_100}


def run_sb3(seed: int, max_env_steps: int) -> dict:
    import numpy as np
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    class StopWhenSolved(BaseCallback):
        def _on_step(self) -> bool:
            buffer = self.model.ep_info_buffer
            return not (len(buffer) == 100 and np.mean([e["r"] for e in buffer]) >= SOLVED_AT)

    import torch

    torch.set_num_threads(1)
    zoo_steps = 50_000  # the zoo's n_timesteps: its exploration schedule is a fraction of it
    start = time.time()
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                exploration_fraction=0.16 * zoo_steps / max_env_steps, exploration_final_eps=0.04,
                policy_kwargs={"net_arch": [256, 256]}, seed=seed, verbose=0)
    model.learn(total_timesteps=max_env_steps, callback=StopWhenSolved())
    returns = [e["r"] for e in model.ep_info_buffer]
    mean = float(np.mean(returns)) if returns else None
    return {"system": "sb3-dqn (zoo)", "seed": seed, "solved": len(returns) == 100 and mean >= SOLVED_AT,
            "env_steps": int(model.num_timesteps), "updates": int(model._n_updates), "wall_s": time.time() - start,
            "mean_return": mean}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--max-env-steps", type=int, default=100_000)
    parser.add_argument("--peer", choices=["sb3", "none"], default="sb3")
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes to run beside the benchmark")
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="evergreen-bench-cartpole-"))
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
    print("| system | seed | solved | env steps | updates | wall time (s) | mean return (last 100) |")
    print("|---|---:|:---:|---:|---:|---:|---:|")
    for r in rows:
        ret = "n/a" if r["mean_return"] is None else f"{r['mean_return']:.1f}"
        print(f"| {r['system']} | {r['seed']} | {'yes' if r['solved'] else 'no'} | {r['env_steps']:,} | "
              f"{r['updates']:,} | {r['wall_s']:.0f} | {ret} |")
    ours = [r for r in rows if r["system"] == "evergreen"]
    ok = all(r["solved"] and r["env_steps"] <= args.max_env_steps and r["wall_s"] <= WALL_LIMIT_S for r in ours)
    print(f"\ntarget (every Evergreen seed solves within {args.max_env_steps:,} env steps and {WALL_LIMIT_S:.0f} s): "
          f"{'met' if ok else 'NOT met'} ({sum(r['solved'] for r in ours)}/{len(ours)} solved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
