"""Acting throughput on Pong: a single-process baseline against Evergreen's actors, in one run.

    .venv/bin/python benchmarks/actor_throughput.py [--seconds 30] [--num-envs 8] [--rows a,a2,b]

Rows (env steps/s, each after a warm-up, same machine, same run):
  (a)  baseline: one process looping ale-py's AtariVectorEnv + the learner's Nature-CNN Q-network
       inference on the CPU (1 torch thread) + epsilon-greedy — no replay, no Ray;
  (a') the `Actor` class in-process (adder and batching included), inserting into nothing;
  (a'') the same `Actor` in-process inserting over gRPC into a replay shard process (no Ray): what the
       insert path costs, apart from running as a Ray actor; "(a'') dense" sends every transition's
       full obs/next_obs stacks instead of each distinct frame once (`ReplayClient(share_frames=False)`,
       the wire form before shared frames), so the two rows compare the insert paths in one run;
  (b)  Evergreen: one Ray actor process writing n-step transitions to a gRPC replay shard (itself a Ray
       actor, `replay.ray_shard.ShardActor`, as in a training run), no learner; "(b) dense" likewise;
  (c)  the full system (`evergreen train --preset pong`): actor + replay + learner updating, with the
       preset's samples-per-insert ratio (so env steps are paced by learner updates, by design);
  (c2) the same with no ratio limit: actors and learner run freely and share the cores.
(a) is measured first and again last; every ratio is to the mean of the two.
Reports (b)/(a), (c)/(a) and (c2)/(a) (target (b)/(a) >= 0.9), and from (c) and (c2) the policy lag and
the fraction of time the learner waited on data.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # after the packages: benchmarks/replay.py must not shadow replay/

from _system import run_system  # noqa: E402

from actors.actor import Actor  # noqa: E402
from actors.adder import NStepAdder  # noqa: E402
from actors.envs import EnvConfig, env_spec, make_vector_env  # noqa: E402
from actors.policy import ConstantEpsilon, EpsilonGreedyPolicy, epsilon_greedy  # noqa: E402
from evergreen.agents import make_builder  # noqa: E402
from evergreen.config import load_config  # noqa: E402
from evergreen.train import ReplayInserter, table_config  # noqa: E402
from learner.networks import NetworkConfig, build_network  # noqa: E402


def _network(obs_shape, num_actions):
    return build_network(NetworkConfig(encoder="nature_cnn", dueling=True), obs_shape=obs_shape,
                         num_actions=num_actions, obs_dtype="uint8")


def _policy(spec) -> EpsilonGreedyPolicy:
    return EpsilonGreedyPolicy(network=_network(spec.observation_shape, spec.num_actions),
                               epsilon=ConstantEpsilon(0.01), seed=0)


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
    spec = env_spec(env_config)
    adder = NStepAdder(spec, num_envs=env_config.num_envs, n=3, gamma=0.99)
    actor = Actor(env_config=env_config, policy=_policy(spec), adder=adder, insert=lambda columns: None,
                  insert_batch_size=64)
    actor.run(max_seconds=warmup)
    stats = actor.run(max_seconds=seconds)
    actor.close()
    return stats.steps_per_second


def actor_in_process_to_shard(config, seconds: float, warmup: float, *, share_frames: bool = True) -> float:
    from replay.client import ReplayClient
    from replay.launch import ShardProcess

    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    table = dataclasses.replace(table_config(config, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                                             obs_dtype=spec.observation_dtype), samples_per_insert=None)
    with ShardProcess([table]) as shard, \
            ReplayClient([shard.address], table=table.name, share_frames=share_frames) as client:
        actor = Actor(env_config=config.env, policy=_policy(spec),
                      adder=NStepAdder(spec, num_envs=config.env.num_envs, n=3, gamma=0.99),
                      insert=ReplayInserter(client, writer_key="actor-0"), insert_batch_size=64)
        actor.run(max_seconds=warmup)
        stats = actor.run(max_seconds=seconds)
        actor.close()
    return stats.steps_per_second


def ray_actors_to_replay(config, seconds: float, warmup: float, *, share_frames: bool = True) -> float:
    import ray

    from actors.ray_actor import ActorPool
    from replay.client import ReplayClient
    from replay.ray_shard import ShardActor

    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    # No learner samples here, so no samples-per-insert limiter: it would (rightly) block the actor.
    table = dataclasses.replace(table_config(config, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                                             obs_dtype=spec.observation_dtype), samples_per_insert=None)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        shard = ShardActor.options(num_cpus=1).remote([table], checkpoint_dir=None, shard_index=0)
        address, _ = ray.get(shard.endpoint.remote())
        client = ReplayClient([address], table=table.name, share_frames=share_frames)

        def kwargs(index: int) -> dict:
            return dict(env_config=config.env, policy=_policy(spec),
                        adder=NStepAdder(spec, num_envs=config.env.num_envs, n=3, gamma=0.99),
                        insert=ReplayInserter(client, writer_key=f"actor-{index}"), actor_index=index,
                        insert_batch_size=64, seed=index)

        pool = ActorPool(1, kwargs, actor_options={"num_cpus": 1})
        pool.start()
        time.sleep(warmup)
        pool.stats()
        time.sleep(seconds)
        stats = pool.stats()
        inserted = sum(i.inserts for i in client.info())
        pool.stop()
        ray.get(shard.stop.remote())
        print(f"  (b) {stats.env_steps:,} env steps in {stats.wall_s:.1f} s; replay holds {inserted:,} inserts")
        return stats.env_steps / stats.wall_s
    finally:
        ray.shutdown()


def full_system(config, seconds: float, warmup: float) -> dict:
    """Run `evergreen train`; measure over `seconds` starting `warmup` s after the first learner update."""
    return run_system(config, warmup_s=warmup, seconds=seconds)


def _rate(result: float | dict) -> float:
    """Env steps/s of a row: a measured rate, or a full-system row's ``run_system`` dict."""
    return result["env_steps_per_s"] if isinstance(result, dict) else result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--rows", default="a,a1,a2-dense,a2,b-dense,b,c,c2",
                        help="rows to measure, in this order (comma-separated; 'a' is required)")
    args = parser.parse_args()
    config = load_config(preset="pong", overrides={
        "env": {"num_envs": args.num_envs},
        "replay": {"capacity": 100_000, "min_size_to_sample": 2_000},
        "learner": {"total_env_steps": 10**9, "log_every_s": 2.0, "checkpoint_every_s": 10**6},
    }).validate()
    print(f"Pong, {args.num_envs} envs per actor, Nature-CNN (dueling) inference on CPU, 1 torch thread per actor")
    free = dataclasses.replace(config, replay=dataclasses.replace(config.replay, samples_per_insert=0.0),
                               learner=dataclasses.replace(config.learner, updates_per_env_step=0.0))
    t, w = args.seconds, args.warmup
    # Each row: (label, what, measure() -> env steps/s or run_system's dict).
    rows = {
        "a": ("(a)", "single process: AtariVectorEnv + CNN inference (baseline)", lambda: baseline(config.env, t, w)),
        "a1": ("(a')", "`Actor` in-process, no insert", lambda: actor_in_process(config.env, t, w)),
        "a2-dense": ("(a'') dense", "`Actor` in-process -> gRPC replay shard process (no Ray), dense frame stacks",
                     lambda: actor_in_process_to_shard(config, t, w, share_frames=False)),
        "a2": ("(a'')", "`Actor` in-process -> gRPC replay shard process (no Ray)",
               lambda: actor_in_process_to_shard(config, t, w)),
        "b-dense": ("(b) dense", "1 Ray actor -> gRPC replay shard, no learner, dense frame stacks",
                    lambda: ray_actors_to_replay(config, t, w, share_frames=False)),
        "b": ("(b)", "1 Ray actor -> gRPC replay shard, no learner", lambda: ray_actors_to_replay(config, t, w)),
        "c": ("(c)", f"full system, preset replay ratio ({config.replay.samples_per_insert:g} samples per insert)",
              lambda: full_system(config, t, w)),
        "c2": ("(c2)", "full system, no ratio limit (actors and learner free-running)", lambda: full_system(free, t, w)),
    }
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in rows]
    if unknown or "a" not in chosen:
        parser.error(f"--rows {args.rows!r}: expected a comma-separated subset of {list(rows)} including 'a' "
                     "(the baseline every ratio is to)")
    results = {}
    for key in chosen:
        label, _, measure = rows[key]
        results[key] = measure()
        print(f"  {label} {_rate(results[key]):.0f} env steps/s")
    # This machine's speed drifts by +-15% between minutes: the baseline runs again last, and every
    # ratio is to the mean of its two measurements (both are shown).
    results["a-after"] = rows["a"][2]()
    print(f"  (a) again {results['a-after']:.0f} env steps/s")
    a = (results["a"] + results["a-after"]) / 2
    print(f"\nbaseline (a): {results['a']:.0f} first, {results['a-after']:.0f} last, ratios are to the mean {a:.0f}")
    print("\n| row | what | env steps/s | ratio to (a) |")
    print("|---|---|---:|---:|")
    for key in chosen:
        label, what, _ = rows[key]
        rate = _rate(results[key])
        print(f"| {label} | {what} | {rate:.0f} | {rate / a:.2f} |")
    systems = [k for k in ("c", "c2") if k in results]
    if systems:
        print("\n| run | learner updates/s | learner waited on data | policy lag of sampled data (updates) "
              "| actors' weights lag (updates) |")
        print("|---|---:|---:|---:|---:|")
        for key in systems:
            r = results[key]
            print(f"| {rows[key][0]} | {r['updates_per_s']:.1f} | {100 * r['wait']:.0f}% | {r['policy_lag']:.0f} "
                  f"| {r['actor_policy_lag']:.0f} |")
    if "b" in results:
        b = results["b"]
        print(f"target (b)/(a) >= 0.9: {'met' if b / a >= 0.9 else 'NOT met'} ({b / a:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
