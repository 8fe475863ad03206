"""Learner throughput: the full system's update rate against a bare update loop, in one run.

    .venv/bin/python benchmarks/learner_throughput.py [--presets cartpole,pong,pendulum] [--seconds 30] [--before aa10109]

For each preset:

* **bare (now)**: a loop of the preset's ``Algorithm.update`` (built by the agent builder, exactly
  as the learner process builds it) on synthetic batches of the preset's shapes and dtypes, with
  the learner's torch thread count, nothing else running;
* **bare (now, eager)**: where the preset sets ``dqn.compile``, the same loop with it off;
* **bare (before)**: the same loop with ``learner/dqn.py`` as it was at git revision ``--before``
  (loaded from git into this process), to show what the hot-path work changed (DQN presets only;
  the pendulum preset's SAC has no earlier version);
* **system, learner-bound**: ``evergreen train --preset <preset>`` (Ray actors, gRPC replay shard, the
  learner as a Ray actor) with a replay ratio of ``LEARNER_BOUND_UPDATES_PER_ENV_STEP`` updates per
  env step, so that the rate limiter holds the actors to a trickle and nothing but the learner's own
  work (sampling over gRPC, conversion, the update, publication, diagnostics) sets its pace, on a
  core of its own as the bare loop has; measured over a steady window from its metrics log. This is
  the row the target is about. (With no ratio limit at all the free-running actors take the cores
  the learner needs: on 2 cores that row measures CPU sharing, not the learner.)
* **bare (now), beside replay sampling**: the bare (now) loop while a second process samples the
  learner's batches from a real replay shard process at the rate the system's learner asks for them
  (one call of ``batch_size x batches_per_sample`` rows per ``batches_per_sample`` updates of the
  bare loop's rate). The update loop shares nothing with them but the machine: this column measures
  what the rest of a running system costs the learner through the cores alone (on a VM whose two
  vCPUs interfere, a lot), and so how much of the system's gap the learner's own code can still close.
* **system, preset ratio**: the same with the preset's ``samples_per_insert``: the rate limiter holds
  updates to the env steps the actors deliver, so where the actors are slower than the learner (the
  cartpole preset on 2 shared cores) this row shows the actors' pace, not the learner's.

The two bare loops alternate in short windows (best of ``--rounds``) so that a noisy machine
affects both alike; the system row is compared with the mean of the bare (now) windows measured
right before and right after it. Targets: learner-bound system >= 0.8x bare (now) for every preset; the
cartpole bare update >= 2x before.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the packages: benchmarks/replay.py must not shadow replay/

from _system import run_system  # noqa: E402

from actors.envs import env_spec  # noqa: E402
from evergreen.agents import make_builder  # noqa: E402
from evergreen.config import load_config  # noqa: E402

# Updates per env step in the learner-bound row: high enough that acting costs next to nothing.
LEARNER_BOUND_UPDATES_PER_ENV_STEP = 16


def synthetic_batches(spec, batch_size: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random batches with the replay columns' shapes and dtypes (what the replay dataset hands over)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, *spec.observation_shape)

    def obs() -> np.ndarray:
        if spec.observation_dtype == np.uint8:
            return rng.integers(0, 256, shape, dtype=np.uint8)
        return rng.standard_normal(shape).astype(spec.observation_dtype)

    def action() -> np.ndarray:
        if spec.discrete:
            return rng.integers(0, spec.num_actions, batch_size)
        box = spec.actions   # continuous: uniform inside the box
        return rng.uniform(box.low, box.high, (batch_size, *box.shape)).astype(np.float32)

    return [{
        "obs": torch.from_numpy(obs()),
        "action": torch.from_numpy(action()),
        "reward": torch.from_numpy(rng.standard_normal(batch_size).astype(np.float32)),
        "discount": torch.from_numpy(rng.choice([0.0, 0.97], batch_size).astype(np.float32)),
        "next_obs": torch.from_numpy(obs()),
    } for _ in range(count)]


def load_old_dqn(revision: str) -> types.ModuleType:
    """``learner/dqn.py`` at ``revision``, imported as a separate module (it uses today's learner.networks)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:learner/dqn.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"learner_dqn_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    exec(compile(source, f"{revision}:learner/dqn.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def updates_per_second(update, batches, seconds: float) -> float:
    for batch in batches[:3]:  # warm-up: allocator, optimizer state
        update(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        update(batches[count % len(batches)])
        count += 1
    return count / (time.perf_counter() - start)


def _sample_forever(address: str, rows: int, calls_per_s: float, stop) -> None:
    """In a child process: sample ``rows`` rows ``calls_per_s`` times a second until ``stop`` is set."""
    from replay.client import ReplayClient

    client = ReplayClient([address])
    period, due = 1.0 / calls_per_s, time.perf_counter()
    while not stop.is_set():
        client.sample(rows, beta=1.0, timeout=5.0)
        due += period
        time.sleep(max(0.0, due - time.perf_counter()))
    client.close()


def bare_beside_sampling(config, *, rate: float, seconds: float, rounds: int) -> float:
    """The bare (now) loop's rate while another process samples from a real shard (see the docstring)."""
    import multiprocessing

    from evergreen.train import table_config
    from replay.launch import ShardProcess

    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    table = table_config(config, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                         obs_dtype=spec.observation_dtype, bounds=builder.replay_bounds())
    table = dataclasses.replace(table, samples_per_insert=None, capacity=max(table.min_size_to_sample, 4096))
    per_call = config.learner.batch_size * config.learner.batches_per_sample
    with ShardProcess([table]) as shard:
        from replay.client import ReplayClient

        with ReplayClient([shard.address]) as client:  # fill it with rows of the right shapes
            rows = {k: v.numpy() for k, v in synthetic_batches(spec, table.capacity, 1)[0].items()}
            if len(spec.observation_shape) == 3:   # frame stacks: consecutive rows share frames, as an env's do
                stack = spec.observation_shape[0]  # (random stacks would need 2 x stack frames per row of storage)
                frames = np.random.default_rng(1).integers(0, 256, (table.capacity + stack + 1,
                                                                    *spec.observation_shape[1:]), dtype=np.uint8)
                windows = np.lib.stride_tricks.sliding_window_view(frames, stack, axis=0).transpose(0, 3, 1, 2)
                rows["obs"] = np.ascontiguousarray(windows[:table.capacity])
                rows["next_obs"] = np.ascontiguousarray(windows[1:table.capacity + 1])
            rows["policy_version"] = np.zeros(table.capacity, dtype=np.int64)
            rows["task"] = np.zeros(table.capacity, dtype=np.int64)
            client.insert(rows, writer_key="bench")
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        sampler = context.Process(target=_sample_forever, daemon=True,
                                  args=(shard.address, per_call, rate / config.learner.batches_per_sample, stop))
        sampler.start()
        try:
            return bare_rates(config, old_module=None, seconds=seconds, rounds=rounds)["now"]
        finally:
            stop.set()
            sampler.join(timeout=30)


def bare_rates(config, *, old_module, seconds: float, rounds: int) -> dict[str, float]:
    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    threads = config.learner.num_threads or max(1, int(config.learner.placement.num_cpus))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(config.learner.flush_denormal)   # as the learner process does
    batches = synthetic_batches(spec, config.learner.batch_size, 16)
    loops = {"now": builder.make_algorithm(torch.device("cpu")).update}
    if config.algorithm != "dqn":
        old_module = None   # the "before" revision is of learner/dqn.py
    if config.algorithm == "dqn" and config.dqn.compile and old_module is not None:  # the same update without compilation, for the table
        eager = dataclasses.replace(config, dqn=dataclasses.replace(config.dqn, compile=False))
        loops["eager"] = make_builder(eager, spec).make_algorithm(torch.device("cpu")).update
    if old_module is not None:
        loops["before"] = old_module.DQN(
            config.dqn, config.network, obs_shape=spec.observation_shape, num_actions=spec.num_actions,
            obs_dtype=spec.observation_dtype.name, seed=config.seed).update
    for update in loops.values():
        update(batches[0])  # outside every window: with dqn.compile this first call compiles
    rates = {name: [] for name in loops}
    for _ in range(rounds):
        for name, update in loops.items():
            rates[name].append(updates_per_second(update, batches, seconds))
    return {k: max(v) for k, v in rates.items()} | {"threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="cartpole,pong")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds of the system row")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--bare-seconds", type=float, default=4.0, help="seconds per bare window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="aa10109", help="git revision of the 'before' learner/dqn.py ('' to skip)")
    args = parser.parse_args()
    old_module = load_old_dqn(args.before) if args.before else None
    rows = []
    for preset in args.presets.split(","):
        config = load_config(preset=preset, overrides={
            "learner": {"total_env_steps": 10**9, "stop_at_return": None, "log_every_s": 2.0,
                        "checkpoint_every_s": 10**6},
        }).validate()
        print(f"== {preset}: bare loops ({args.rounds} x {args.bare_seconds:g} s each)", flush=True)
        pre = bare_rates(config, old_module=old_module, seconds=args.bare_seconds, rounds=args.rounds)
        print(f"   bare now {pre['now']:.0f}/s, before {pre.get('before', float('nan')):.0f}/s", flush=True)
        print(f"== {preset}: full system, learner-bound ({args.warmup:g} s warm-up, {args.seconds:g} s window)",
              flush=True)
        bound = dataclasses.replace(config, replay=dataclasses.replace(
            config.replay, samples_per_insert=float(LEARNER_BOUND_UPDATES_PER_ENV_STEP * config.learner.batch_size),
            error_buffer=0.0))  # 0: the limiter's automatic band for this ratio
        system = run_system(bound, warmup_s=args.warmup, seconds=args.seconds)
        print(f"   system {system['updates_per_s']:.0f} updates/s", flush=True)
        print(f"== {preset}: full system, preset ratio {config.replay.samples_per_insert:g}", flush=True)
        paced = run_system(config, warmup_s=args.warmup, seconds=args.seconds)
        print(f"   system {paced['updates_per_s']:.0f} updates/s, {paced['env_steps_per_s']:.0f} env steps/s", flush=True)
        post = bare_rates(dataclasses.replace(config), old_module=None, seconds=args.bare_seconds,
                          rounds=args.rounds)
        bare_now = (pre["now"] + post["now"]) / 2
        print(f"   bare now after {post['now']:.0f}/s", flush=True)
        beside = bare_beside_sampling(config, rate=bare_now, seconds=args.bare_seconds, rounds=args.rounds)
        print(f"   bare now beside replay sampling {beside:.0f}/s", flush=True)
        rows.append((preset, pre, bare_now, beside, system, paced, config.replay.samples_per_insert))

    print("\n| preset | torch threads | bare before (updates/s) | bare now, eager (updates/s) | bare now (updates/s) "
          "| now / before | bare now beside replay sampling (updates/s) | system, learner-bound (updates/s) "
          "| system / bare now | system / bare beside sampling | learner waited on data "
          "| system, preset ratio (updates/s) | its env steps/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for preset, pre, bare_now, beside, system, paced, ratio_limit in rows:
        before = pre.get("before", float("nan"))
        ratio = system["updates_per_s"] / bare_now
        ok &= ratio >= 0.8
        if preset == "cartpole" and "before" in pre:
            ok &= bare_now / before >= 2.0
        eager = f"{pre['eager']:.0f}" if "eager" in pre else "(no dqn.compile)"
        has_before = "before" in pre
        before_cell = f"{before:.0f}" if has_before else "n/a"
        gain_cell = f"{bare_now / before:.2f}x" if has_before else "n/a"
        print(f"| {preset} | {pre['threads']} | {before_cell} | {eager} | {bare_now:.0f} | {gain_cell} "
              f"| {beside:.0f} | {system['updates_per_s']:.0f} | **{ratio:.2f}** "
              f"| {system['updates_per_s'] / beside:.2f} | {100 * system['wait']:.0f}% "
              f"| {paced['updates_per_s']:.0f} ({ratio_limit:g} samples/insert) | {paced['env_steps_per_s']:.0f} |")
    print(f"\ntargets (learner-bound system >= 0.8x bare now on every preset; cartpole bare now >= 2x before): "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
