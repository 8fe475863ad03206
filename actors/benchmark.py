"""Single-process acting throughput: env alone, env + CPU inference, and the full ``Actor`` loop.

Prints a table of env steps/s (and the ratio to env-alone, measured in the same run)::

    python -m actors.benchmark --env pong --num-envs 8 --seconds 5

The network is a Nature-CNN-sized Q-network (3 convs, 512-unit layer), built here because
``actors`` does not depend on ``learner``; one torch thread, as in an actor process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from actors.actor import Actor
from actors.envs import EnvConfig, make_vector_env
from actors.policy import ConstantEpsilon, epsilon_greedy

__all__ = ["nature_cnn", "main"]


def nature_cnn(*, in_channels: int = 4, num_actions: int = 6) -> nn.Module:
    """Mnih et al. (2015) Q-network on 84x84 uint8 stacks; scales frames to [0, 1] itself."""

    class NatureCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
                nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, num_actions),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x.float() / 255.0)

    return NatureCNN()


def _timed(seconds: float, step) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="pong")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = EnvConfig(id=args.env, num_envs=args.num_envs, seed=0)
    rng = np.random.default_rng(0)
    results: dict[str, float] = {}

    env = make_vector_env(cfg)
    obs = env.reset()
    n, a = env.num_envs, env.num_actions
    count, wall = _timed(args.seconds, lambda: env.step(rng.integers(0, a, n)))
    results["env only (random actions)"] = count * n / wall

    net = nature_cnn(in_channels=env.observation_shape[0], num_actions=a).eval()
    batch = torch.from_numpy(obs)

    def infer() -> None:
        with torch.inference_mode():
            net(batch)

    count, wall = _timed(args.seconds, infer)
    results[f"inference only (batch {n})"] = count * n / wall

    state = {"obs": obs}

    def env_and_infer() -> None:
        with torch.inference_mode():
            q = net(torch.from_numpy(state["obs"])).numpy()
        actions = epsilon_greedy(q, epsilon=0.01, rng=rng)
        state["obs"] = env.step(actions)[0]

    actor = Actor(
        env_config=cfg,
        network_factory=lambda: nature_cnn(in_channels=cfg.frame_stack, num_actions=a),
        insert=lambda columns: None,
        n_step=3,
        gamma=0.99,
        epsilon=ConstantEpsilon(0.01),
        insert_batch_size=256,
    )
    actor.run(10)  # warm-up: env reset and first allocations
    # Interleaved short rounds, so that load from other processes hits both loops alike.
    rounds = max(1, int(args.seconds))
    steps = {"plain": 0, "actor": 0}
    walls = {"plain": 0.0, "actor": 0.0}
    for _ in range(rounds):
        count, wall = _timed(args.seconds / rounds, env_and_infer)
        steps["plain"] += count * n
        walls["plain"] += wall
        stats = actor.run(max_seconds=args.seconds / rounds)
        steps["actor"] += stats.env_steps
        walls["actor"] += stats.wall_s
    results["env + inference (hand-written loop)"] = steps["plain"] / walls["plain"]
    results["Actor loop (adder, batching, no-op insert)"] = steps["actor"] / walls["actor"]
    actor.close()
    env.close()

    base = results["env only (random actions)"]
    print(f"{args.env}, {n} envs, 1 torch thread, {args.seconds:g} s each")
    print(f"{'measurement':<46} {'env steps/s':>12} {'vs env only':>12}")
    for name, value in results.items():
        print(f"{name:<46} {value:>12.0f} {value / base:>12.2f}")
    return results


if __name__ == "__main__":
    main()
