"""Acting throughput on Pong: a single-process baseline against Evergreen's actors, in one run.

    .venv/bin/python benchmarks/actor_throughput.py [--seconds 30] [--num-envs 8]

Rows (env steps/s, each after a warm-up, same machine, same run):
  (a)  baseline: one process looping ale-py's AtariVectorEnv + the learner's Nature-CNN Q-network
       inference on the CPU (1 torch thread) + epsilon-greedy — no replay, no Ray;
  (a') the `Actor` class in-process (adder and batching included), inserting into nothing;
  (b)  Evergreen: one Ray actor process writing n-step transitions to a gRPC replay shard, no learner;
  (c)  the full system (`evergreen train --preset pong`): actor + replay + learner updating, with the
       preset's samples-per-insert ratio (so env steps are paced by learner updates, by design);
  (c2) the same with no ratio limit: actors and learner run freely and share the cores.
Reports (b)/(a), (c)/(a) and (c2)/(a) (target (b)/(a) >= 0.8), and from (c) and (c2) the policy lag and
the fraction of time the learner waited on data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.actor import Actor  # noqa: E402
from actors.envs import EnvConfig, make_vector_env  # noqa: E402
from actors.policy import ConstantEpsilon, epsilon_greedy  # noqa: E402
from evergreen.config import load_config  # noqa: E402
from evergreen.train import ReplayInserter, Trainer, env_spec, table_config  # noqa: E402
from learner.networks import NetworkConfig, build_network  # noqa: E402


def _network(obs_shape, num_actions):
    return build_network(NetworkConfig(encoder="nature_cnn", dueling=True), obs_shape=obs_shape,
                         num_actions=num_actions, obs_dtype="uint8")


def baseline(env_config: EnvConfig, seconds: float, warmup: float) -> float:
    torch.set_num_threads(1)
    env = make_vector_env(env_config)
    net = _network(env.observation_shape, env.num_actions).eval()
    rng = np.random.default_rng(0)
    obs = env.reset()
    steps, start, t_end = 0, None, time.perf_counter() + warmup + seconds
    while (now := time.perf_counter()) < t_end:
        if start is None and now >= t_end - seconds:
            start, steps = now, 0
        with torch.inference_mode():
            q = net(torch.from_numpy(obs)).numpy()
        obs, *_ = env.step(epsilon_greedy(q, epsilon=0.01, rng=rng))
        steps += env.num_envs
    env.close()
    return steps / (time.perf_counter() - start)


def actor_in_process(env_config: EnvConfig, seconds: float, warmup: float) -> float:
    shape, _, actions = (84, 84), None, None
    env = make_vector_env(env_config.replace(num_envs=1))
    shape, actions = env.observation_shape, env.num_actions
    env.close()
    actor = Actor(env_config=env_config, network_factory=lambda: _network(shape, actions),
                  insert=lambda columns: None, epsilon=ConstantEpsilon(0.01), insert_batch_size=64)
    actor.run(max_seconds=warmup)
    stats = actor.run(max_seconds=seconds)
    actor.close()
    return stats.steps_per_second


def ray_actors_to_replay(config, seconds: float, warmup: float) -> float:
    import ray

    from actors.ray_actor import ActorPool
    from replay.client import ReplayClient
    from replay.launch import ShardProcess

    obs_shape, obs_dtype, num_actions = env_spec(config)
    # No learner samples here, so no samples-per-insert limiter: it would (rightly) block the actor.
    table = dataclasses.replace(table_config(config, obs_shape=obs_shape, obs_dtype=obs_dtype),
                                samples_per_insert=None)
    shard = ShardProcess([table])
    client = ReplayClient([shard.address], table=table.name)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        def kwargs(index: int) -> dict:
            return dict(env_config=config.env,
                        network_factory=lambda: _network(obs_shape, num_actions),
                        insert=ReplayInserter(client, writer_key=f"actor-{index}"), epsilon=ConstantEpsilon(0.01),
                        actor_index=index, num_actors=1, insert_batch_size=64, seed=index)

        pool = ActorPool(1, kwargs)
        pool.start()
        time.sleep(warmup)
        pool.stats()
        time.sleep(seconds)
        stats = pool.stats()
        inserted = sum(i.inserts for i in client.info())
        pool.stop()
        print(f"  (b) {stats.env_steps:,} env steps in {stats.wall_s:.1f} s; replay holds {inserted:,} inserts")
        return stats.env_steps / stats.wall_s
    finally:
        ray.shutdown()
        client.close()
        shard.stop()


def full_system(config, seconds: float, warmup: float) -> dict:
    """Run `evergreen train`; measure over `seconds` starting `warmup` s after the first learner update."""
    run_dir = Path(tempfile.mkdtemp(prefix="evergreen-bench-throughput-"))
    trainer = Trainer(config, run_dir=run_dir)
    log = run_dir / "metrics.jsonl"

    def read() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            time.sleep(1.0)
            records = read()
            started = [r for r in records if r["updates"] > 0]
            if started and records[-1]["elapsed_s"] >= started[0]["elapsed_s"] + warmup + seconds:
                break
        trainer.request_stop("benchmark window complete")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trainer.run()
    records = read()
    t_start = next(r["elapsed_s"] for r in records if r["updates"] > 0) + warmup
    steady = [r for r in records if r["elapsed_s"] >= t_start]
    first, last = steady[0], steady[-1]
    span = max(1e-9, last["elapsed_s"] - first["elapsed_s"])
    env_rate = (last["env_steps"] - first["env_steps"]) / span
    upd_rate = (last["updates"] - first["updates"]) / span

    def mean(key):
        values = [r[key] for r in steady[1:] if r.get(key) is not None]
        return float(np.mean(values)) if values else float("nan")

    return {"env_steps_per_s": env_rate, "updates_per_s": upd_rate, "policy_lag": mean("policy_lag_updates"),
            "actor_policy_lag": mean("actor_policy_lag_updates"), "wait": mean("learner_wait_fraction"),
            "span_s": span, "run_dir": str(run_dir)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--num-envs", type=int, default=8)
    args = parser.parse_args()
    config = load_config(preset="pong", overrides={
        "env": {"num_envs": args.num_envs},
        "replay": {"capacity": 100_000, "min_size_to_sample": 2_000},
        "learner": {"total_env_steps": 10**9, "log_every_s": 2.0, "checkpoint_every_s": 10**6},
    }).validate()
    print(f"Pong, {args.num_envs} envs per actor, Nature-CNN (dueling) inference on CPU, 1 torch thread per actor")
    a = baseline(config.env, args.seconds, args.warmup)
    print(f"  (a) {a:.0f} env steps/s")
    a2 = actor_in_process(config.env, args.seconds, args.warmup)
    print(f"  (a') {a2:.0f} env steps/s")
    b = ray_actors_to_replay(config, args.seconds, args.warmup)
    print(f"  (b) {b:.0f} env steps/s")
    c = full_system(config, args.seconds, args.warmup)
    print(f"  (c) {c['env_steps_per_s']:.0f} env steps/s")
    free = dataclasses.replace(config, replay=dataclasses.replace(config.replay, samples_per_insert=0.0),
                               learner=dataclasses.replace(config.learner, updates_per_env_step=0.0))
    c2 = full_system(free, args.seconds, args.warmup)
    print(f"  (c2) {c2['env_steps_per_s']:.0f} env steps/s")
    print("\n| row | what | env steps/s | ratio to (a) |")
    print("|---|---|---:|---:|")
    print(f"| (a) | single process: AtariVectorEnv + CNN inference (baseline) | {a:.0f} | 1.00 |")
    print(f"| (a') | `Actor` in-process, no insert | {a2:.0f} | {a2 / a:.2f} |")
    print(f"| (b) | 1 Ray actor -> gRPC replay shard, no learner | {b:.0f} | {b / a:.2f} |")
    print(f"| (c) | full system, preset replay ratio ({config.replay.samples_per_insert:g} samples per insert) "
          f"| {c['env_steps_per_s']:.0f} | {c['env_steps_per_s'] / a:.2f} |")
    print(f"| (c2) | full system, no ratio limit (actors and learner free-running) "
          f"| {c2['env_steps_per_s']:.0f} | {c2['env_steps_per_s'] / a:.2f} |")
    print("\n| run | learner updates/s | learner waited on data | policy lag of sampled data (updates) "
          "| actors' weights lag (updates) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("(c)", c), ("(c2)", c2)):
        print(f"| {name} | {r['updates_per_s']:.1f} | {100 * r['wait']:.0f}% | {r['policy_lag']:.0f} "
              f"| {r['actor_policy_lag']:.0f} |")
    print(f"target (b)/(a) >= 0.8: {'met' if b / a >= 0.8 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
