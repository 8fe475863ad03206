"""Learner scaling: updates/s and samples/s of 1 and 2 data-parallel ranks, against bare loops, in one run.

    .venv/bin/python benchmarks/learner_scaling.py                                 # CPU (gloo): cartpole, pong
    .venv/bin/python benchmarks/learner_scaling.py --device cuda --networks nature_cnn,impala \\
        --batches 32,64,128,256,512 --no-system                                  # a lent GPU, in a few minutes

Rows, per network and batch size (``batch`` = rows per rank and update; samples/s = ranks x batch x updates/s):

* **bare, 1 rank**: a loop of the agent's ``Algorithm.update`` on synthetic batches of the preset's
  shapes, on ``--device``, nothing else running: what one learner can do;
* **bare, N ranks**: N processes in one ``torch.distributed`` group (gloo on the CPU, NCCL on CUDA),
  each running the same loop on its own synthetic batches with the gradient all-reduce and the
  learner service's agreement round (one per ``learner.prefetch_batches`` updates): what the group
  itself costs (a fixed number of updates; the group's rate is rank 0's);
* **system, N ranks**: ``evergreen train --learner.num_ranks N`` (Ray actors, a gRPC replay shard,
  the learner ranks as Ray actors sampling their own batches) held learner-bound by a high replay
  ratio, over a steady window of its metrics log.

Each system row is compared with the bare loop of the same rank count as a ratio (the machine's
noise affects both alike); the target on a GPU is system >= 0.8x bare (the data path is never the
bottleneck). On this project's 2-core CI machines the CPU rows report the scaling only: two ranks
share two cores with the actors and the replay shard.

Two devices: ``--ranks 1,2`` runs rank r on ``cuda:r``; with one device, ``--ranks 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the packages: benchmarks/replay.py must not shadow replay/

from _system import run_system  # noqa: E402
from learner_throughput import LEARNER_BOUND_UPDATES_PER_ENV_STEP, synthetic_batches  # noqa: E402

from actors.envs import env_spec  # noqa: E402
from evergreen.agents import make_builder  # noqa: E402
from evergreen.config import load_config  # noqa: E402

#: The preset whose env (and so batch shapes) each network is measured with.
PRESET_OF_NETWORK = {"mlp": "cartpole", "nature_cnn": "pong", "impala": "pong"}


def _config(network: str, batch: int, ranks: int, device: str):
    return load_config(preset=PRESET_OF_NETWORK[network], overrides={
        "network": {"encoder": network},
        "learner": {"batch_size": batch, "num_ranks": ranks, "device": device, "total_env_steps": 10**9,
                    "stop_at_return": None, "log_every_s": 2.0, "checkpoint_every_s": 10**6},
        "dqn": {"compile": False},
        "plasticity": {"diagnostics": ""},   # the update loop alone: diagnostics have their own benchmark
    }).validate()


def _algorithm(config, device: torch.device, parallel=None):
    builder = make_builder(config, env_spec(config.env))
    return builder.make_algorithm(device) if parallel is None else builder.make_algorithm(device, parallel=parallel)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_one_rank(config, device: torch.device, seconds: float) -> float:
    """Updates/s of the bare update loop in this process."""
    algorithm = _algorithm(config, device)
    batches = synthetic_batches(env_spec(config.env), config.learner.batch_size, 8)
    for batch in batches[:3]:
        algorithm.update(batch)
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        algorithm.update(batches[count % len(batches)])
        count += 1
    _sync(device)
    return count / (time.perf_counter() - start)


def _rank_loop(config, address: str, rank: int, ranks: int, updates: int, device: str, threads: int, out) -> None:
    """One rank of the bare group: ``updates`` updates, with the service's agreement round every
    ``prefetch_batches`` of them."""
    from learner.parallel import ReplicaGroup

    torch.set_num_threads(threads)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else device)
    group = ReplicaGroup.join(address, rank=rank, world_size=ranks, device=dev)
    algorithm = _algorithm(config, dev, group)
    batches = synthetic_batches(env_spec(config.env), config.learner.batch_size, 8, seed=rank)
    for batch in batches[:3]:
        group.agree([True, True, True])
        algorithm.update(batch)
    _sync(dev)
    group.agree([True])
    every = config.learner.prefetch_batches
    start = time.perf_counter()
    for i in range(updates):
        if i % every == 0:   # what LearnerService does before each round of data-parallel updates
            group.agree([True, every, True])
        algorithm.update(batches[i % len(batches)])
    _sync(dev)
    elapsed = time.perf_counter() - start
    if rank == 0:
        out.put(updates / elapsed)
    group.close()


def bare_ranks(config, ranks: int, *, device: str, updates: int, threads: int) -> float:
    """Updates/s of the bare ``ranks``-rank group (rank 0's rate)."""
    from learner.parallel import Rendezvous

    rendezvous = Rendezvous()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_rank_loop, args=(config, rendezvous.address, r, ranks, updates, device, threads,
                                                      out)) for r in range(ranks)]
    for p in procs:
        p.start()
    rate = out.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    return rate


def system(config, *, warmup: float, seconds: float) -> dict:
    bound = dataclasses.replace(config, replay=dataclasses.replace(
        config.replay, samples_per_insert=float(LEARNER_BOUND_UPDATES_PER_ENV_STEP * config.learner.batch_size),
        error_buffer=0.0))
    return run_system(bound, warmup_s=warmup, seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="mlp,nature_cnn")
    parser.add_argument("--batches", default="64", help="rows per rank and update, comma-separated")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--device", default="cpu", help='"cpu" (gloo) or "cuda" (NCCL; rank r on cuda:r)')
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each bare measurement")
    parser.add_argument("--system-seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--no-system", action="store_true", help="bare loops only (e.g. a GPU without actors' CPUs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rank_counts = [int(r) for r in args.ranks.split(",")]
    if device.type == "cuda" and max(rank_counts) > torch.cuda.device_count():
        parser.error(f"--ranks {args.ranks}: only {torch.cuda.device_count()} CUDA device(s)")
    threads = max(1, torch.get_num_threads() // max(rank_counts)) if device.type == "cpu" else 1
    rows = []
    for network in args.networks.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            one = _config(network, batch, 1, args.device)
            torch.set_num_threads(threads)
            bare1 = bare_one_rank(one, device, args.seconds)
            print(f"== {network}, batch {batch}: bare 1 rank {bare1:.0f} updates/s", flush=True)
            for ranks in rank_counts:
                config = _config(network, batch, ranks, args.device)
                bare = bare1 if ranks == 1 else bare_ranks(config, ranks, device=args.device,
                                                           updates=max(20, int(bare1 * args.seconds / ranks)),
                                                           threads=threads)
                measured = None if args.no_system else system(config, warmup=args.warmup, seconds=args.system_seconds)
                print(f"   {ranks} rank(s): bare {bare:.0f} updates/s"
                      + ("" if measured is None else f", system {measured['updates_per_s']:.0f} updates/s"), flush=True)
                rows.append((network, batch, ranks, bare, bare1, measured))

    print(f"\ndevice {args.device}; torch threads per rank {threads}\n")
    print("| network | batch per rank | ranks | bare (updates/s) | bare (samples/s) | bare / bare 1 rank (samples) "
          "| system (updates/s) | system (samples/s) | system / bare | learner waited on data |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for network, batch, ranks, bare, bare1, measured in rows:
        samples = bare * batch * ranks
        cells = ["—"] * 4 if measured is None else [
            f"{measured['updates_per_s']:.0f}", f"{measured['updates_per_s'] * batch * ranks:.0f}",
            f"**{measured['updates_per_s'] / bare:.2f}**", f"{100 * measured['wait']:.0f}%"]
        print(f"| {network} | {batch} | {ranks} | {bare:.0f} | {samples:.0f} | {samples / (bare1 * batch):.2f} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
