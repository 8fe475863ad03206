"""Replay service throughput and memory, against a bare gRPC transport measured in the same run.

    .venv/bin/python benchmarks/replay.py            # full run (~5-8 minutes on 2 cores)
    .venv/bin/python benchmarks/replay.py --quick    # smoke run (~1 minute)

Everything crosses real process boundaries: shards are `python -m replay.server` processes started with
``replay.launch.ShardProcess``; the client (``ReplayClient``) runs in this process; the transport baseline
is a bare gRPC service in its own process with the same message-size options whose handlers move opaque
bytes (``Up``: bytes in, empty out; ``Down``: a few bytes in, a cached payload out), so it measures what
gRPC + loopback cost for the same payload sizes with no encoding or table work at all.

Workloads: CartPole-sized transitions (obs float32[4]) in a ring storage, and Atari-sized transitions
(uint8 4x84x84 obs and next_obs) in the frame-deduplicating Atari storage, with consecutive-frame stacks
from a few streams (random frames per stream, the stack slid by one frame per transition, next_obs the
following stack) so that deduplication applies as in real use. Inserts from one writer thread per shard
(writer keys routed to distinct shards); samples from one thread, the client splitting each batch across
shards concurrently.

Reported per row: transitions/s and MB/s (payload bytes: schema row size x rows), the ratio of the
replay byte rate to the transport byte rate for the same payload size and direction, and for
prioritized sampling its cost relative to uniform (time per batch, same workload and shard count).
Memory: RSS delta of one Atari shard process after 200k transitions, per transition.
Checkpoint: the same filled shard writes a checkpoint while a client samples batches of 32 without
pause; reported are the checkpoint's duration and how long sampling was paused by it (the longest
sample call during the checkpoint minus the median sample call before it).

Targets: Atari batch-256 sampling >= 50% of the transport byte rate; prioritized <= 1.25x uniform;
Atari storage <= 8 KB per transition; sampling paused < 100 ms by a checkpoint.

    .venv/bin/python benchmarks/replay.py --only-storage --fill 200000   # memory and checkpoint rows only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass

# Run as `python benchmarks/replay.py`, this file's directory is sys.path[0] and this module would shadow
# the `replay` package it benchmarks.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from replay.client import ReplayClient  # noqa: E402
from replay.launch import ShardProcess  # noqa: E402
from replay.schema import Schema  # noqa: E402
from replay.server import DEFAULT_MAX_MESSAGE_BYTES, grpc_options  # noqa: E402
from replay.table import TableConfig  # noqa: E402

CARTPOLE = Schema.parse("obs:float32:4,action:int64,reward:float32,next_obs:float32:4,discount:float32")
ATARI = Schema.parse("obs:uint8:4x84x84,action:int64,reward:float32,next_obs:uint8:4x84x84,discount:float32")
MB = 1e6
SAMPLERS = ("uniform", "prioritized")
BATCHES = (32, 256)

# ---------------------------------------------------------------------------------------------- echo


def _identity(b: bytes) -> bytes:
    return b


def serve_echo() -> int:
    """The transport baseline's server (run in its own process by `--echo-server`)."""
    payloads: dict[int, bytes] = {}

    def up(request: bytes, context) -> bytes:
        return b""

    def down(request: bytes, context) -> bytes:
        n = int.from_bytes(request[:8], "little")
        if n not in payloads:
            payloads[n] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        return payloads[n]

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Up": grpc.unary_unary_rpc_method_handler(up, request_deserializer=_identity, response_serializer=_identity),
        "Down": grpc.unary_unary_rpc_method_handler(down, request_deserializer=_identity,
                                                    response_serializer=_identity),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=grpc_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ECHO_READY port={port}", flush=True)
    sys.stdin.read()   # until the parent closes our stdin
    server.stop(0)
    return 0


class Echo:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ECHO_READY"):
            raise RuntimeError(f"echo server failed to start: {line!r}")
        port = int(line.split("port=")[1])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(DEFAULT_MAX_MESSAGE_BYTES))
        self.up = self.channel.unary_unary("/bench.Echo/Up", request_serializer=_identity,
                                           response_deserializer=_identity)
        self.down = self.channel.unary_unary("/bench.Echo/Down", request_serializer=_identity,
                                             response_deserializer=_identity)
        self._payload = b""

    def rate(self, direction: str, nbytes: int, seconds: float) -> tuple[float, float]:
        """(bytes per second, CPU seconds per call of client + server) moving ``nbytes`` up or down."""
        meter = CpuMeter([self.proc.pid])
        if direction == "up":
            if len(self._payload) != nbytes:
                self._payload = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
                self.up(self._payload, timeout=60)
            payload = self._payload
            calls, cpu = _window(lambda: self.up(payload, timeout=60), seconds, meter)
        else:
            request = nbytes.to_bytes(8, "little")
            self.down(request, timeout=60)   # warm the server's payload cache
            calls, cpu = _window(lambda: self.down(request, timeout=60), seconds, meter)
        return calls * nbytes / seconds, cpu / max(calls, 1)

    def close(self):
        self.channel.close()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ workloads


def cartpole_batches(batch: int, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        obs = rng.standard_normal((batch + 1, 4)).astype(np.float32)
        out.append({"obs": obs[:-1].copy(), "action": rng.integers(0, 2, batch), "reward": np.ones(batch, np.float32),
                    "next_obs": obs[1:].copy(), "discount": np.full(batch, 0.99, np.float32)})
    return out


class AtariStream:
    """Consecutive transitions of one environment: random frames, the 4-frame stack slid by one per step."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.frames = self.rng.integers(0, 256, (4, 84, 84), dtype=np.uint8)   # the current stack

    def batch(self, n: int) -> dict[str, np.ndarray]:
        new = self.rng.integers(0, 256, (n, 84, 84), dtype=np.uint8)
        frames = np.concatenate([self.frames, new])                            # [n + 4, 84, 84]
        windows = np.lib.stride_tricks.sliding_window_view(frames, 4, axis=0)  # [n + 1, 84, 84, 4]
        stacks = np.ascontiguousarray(np.moveaxis(windows, -1, 1))             # [n + 1, 4, 84, 84]
        self.frames = frames[-4:].copy()
        return {"obs": stacks[:-1], "action": self.rng.integers(0, 18, n), "reward": np.zeros(n, np.float32),
                "next_obs": stacks[1:], "discount": np.full(n, 0.99, np.float32)}


def writer_keys(num_shards: int) -> list[str]:
    """One writer key routed to each shard."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < num_shards:
        keys.setdefault(zlib.crc32(f"stream-{i}".encode()) % num_shards, f"stream-{i}")
        i += 1
    return [keys[s] for s in range(num_shards)]


@dataclass
class Row:
    workload: str
    sampler: str
    shards: int
    batch: int
    op: str
    per_s: float                 # transitions per second (best window)
    mb_s: float
    cpu_ms: float                # CPU ms per batch, client process + shard processes (least of the windows)
    transport_mb_s: float
    transport_cpu_ms: float      # CPU ms per message of the same size, client process + echo process
    prio_wall: float | None = None
    prio_cpu: float | None = None

    @property
    def vs_transport(self) -> float:
        return self.mb_s / self.transport_mb_s

    @property
    def vs_transport_cpu(self) -> float:
        return self.transport_cpu_ms / self.cpu_ms


class CpuMeter:
    """CPU seconds used so far by this process (all threads) plus the given processes."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(pid) for pid in pids]

    def read(self) -> float:
        return time.process_time() + sum(t.user + t.system for t in (p.cpu_times() for p in self.procs))


def _window(fn, seconds: float, meter: CpuMeter | None = None) -> tuple[int, float]:
    """(calls of ``fn`` completed in a window of about ``seconds``, CPU seconds the meter saw meanwhile)."""
    cpu0 = meter.read() if meter is not None else 0.0
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return n, (meter.read() - cpu0 if meter is not None else 0.0)


def _measure_batch(*, workload: str, clients: dict, num_shards: int, batch: int, seconds: float, repeats: int,
                   echo: Echo, row_bytes: int, meter: CpuMeter) -> list[Row]:
    keys = writer_keys(num_shards)
    if workload == "cartpole":
        pools = [cartpole_batches(batch, 64, seed=i) for i in range(num_shards)]
    else:
        # Enough distinct frames that cycling the pool rarely re-inserts identical frames.
        count = max(8, 16 * 256 // batch)
        pools = [[stream.batch(batch) for _ in range(count)] for stream in [AtariStream(i) for i in range(num_shards)]]
    priorities = np.random.default_rng(0).uniform(0.1, 2.0, batch)
    position = [0] * num_shards

    def insert_window(sampler: str) -> tuple[float, float]:
        client = clients[sampler]
        calls = [0] * num_shards

        def write(i: int) -> None:
            def one() -> None:
                pool = pools[i]
                client.insert(pool[position[i] % len(pool)], writer_key=keys[i],
                              priorities=priorities if sampler == "prioritized" else None)
                position[i] += 1

            calls[i] = _window(one, seconds)[0]

        cpu0, start = meter.read(), time.perf_counter()
        threads = [threading.Thread(target=write, args=(i,)) for i in range(num_shards)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed, cpu = time.perf_counter() - start, meter.read() - cpu0
        return sum(calls) * batch / elapsed, cpu / max(sum(calls), 1)

    def sample_window(sampler: str) -> tuple[float, float]:
        calls, cpu = _window(lambda: clients[sampler].sample(batch), seconds, meter)
        return calls * batch / seconds, cpu / max(calls, 1)

    rows = []
    for op, window, direction in (("insert", insert_window, "up"), ("sample", sample_window, "down")):
        best = dict.fromkeys(SAMPLERS, 0.0)
        cpu = dict.fromkeys(SAMPLERS, float("inf"))
        transport, transport_cpu = 0.0, float("inf")
        for sampler in SAMPLERS:   # warm-up: connections, flow-control windows, a sampleable table
            if op == "insert":
                window(sampler)
            else:
                clients[sampler].sample(batch)
        for _ in range(repeats):
            for sampler in SAMPLERS:
                rate, cost = window(sampler)
                best[sampler], cpu[sampler] = max(best[sampler], rate), min(cpu[sampler], cost)
            rate, cost = echo.rate(direction, batch * row_bytes, seconds)
            transport, transport_cpu = max(transport, rate), min(transport_cpu, cost)
        for sampler in SAMPLERS:
            rows.append(Row(workload, sampler, num_shards, batch, op, best[sampler], best[sampler] * row_bytes / MB,
                            cpu[sampler] * 1e3, transport / MB, transport_cpu * 1e3))
        rows[-1].prio_wall = best["uniform"] / best["prioritized"]
        rows[-1].prio_cpu = cpu["prioritized"] / cpu["uniform"]
    return rows


def run_group(*, workload: str, num_shards: int, seconds: float, repeats: int, echo: Echo) -> list[Row]:
    """All measurements of one workload and shard count, on one set of shard processes.

    Each shard holds a uniform and a prioritized table; the two samplers and the transport baseline are
    measured in interleaved windows, ``repeats`` times each, and the best window of each counts. On a shared
    machine this keeps the compared numbers under the same background load.
    """
    schema = CARTPOLE if workload == "cartpole" else ATARI
    capacity = 100_000 if workload == "cartpole" else 20_000
    configs = [TableConfig(name=sampler, schema=schema, capacity=capacity, sampler=sampler,
                           storage="ring" if workload == "cartpole" else "atari", priority_exponent=0.6)
               for sampler in SAMPLERS]
    shards = [ShardProcess(configs, shard_index=i) for i in range(num_shards)]
    rows: list[Row] = []
    try:
        clients = {sampler: ReplayClient([s.address for s in shards], table=sampler, timeout=120.0, seed=0)
                   for sampler in SAMPLERS}
        meter = CpuMeter([s.pid for s in shards])
        for batch in BATCHES:
            rows += _measure_batch(workload=workload, clients=clients, num_shards=num_shards, batch=batch,
                                   seconds=seconds, repeats=repeats, echo=echo, row_bytes=schema.row_nbytes(),
                                   meter=meter)
        for client in clients.values():
            client.close()
    finally:
        for s in shards:
            s.stop()
    return rows


@dataclass
class CheckpointRow:
    transitions: int
    seconds: float               # the Checkpoint call, as the client saw it
    pause_ms: float              # longest sample call during it minus the median one before it
    longest_ms: float
    median_before_ms: float
    samples_during: int
    gigabytes: float             # size of the checkpoint on disk


def measure_checkpoint(client: ReplayClient, address: str, directory: str, transitions: int) -> CheckpointRow:
    """Checkpoint the shard while another client samples batches of 32 back to back."""
    sampler = ReplayClient([address], timeout=120.0, seed=1)
    durations: list[tuple[float, float]] = []     # (end time, seconds) of every sample call
    stop = threading.Event()

    def sample_forever():
        while not stop.is_set():
            start = time.perf_counter()
            sampler.sample(32)
            end = time.perf_counter()
            durations.append((end, end - start))

    thread = threading.Thread(target=sample_forever)
    thread.start()
    time.sleep(2.0)
    before = [d for _, d in durations]
    start = time.perf_counter()
    path = client.checkpoint(timeout=600)[0]
    end = time.perf_counter()
    time.sleep(0.2)
    stop.set()
    thread.join()
    sampler.close()
    # Calls that overlapped the checkpoint: they ended after it began and began before it ended.
    during = [d for t, d in durations if t >= start and t - d <= end]
    median = float(np.median(before))
    longest = max(during) if during else float("nan")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return CheckpointRow(transitions, end - start, (longest - median) * 1e3, longest * 1e3, median * 1e3,
                         len(during), size / 1e9)


def measure_memory(*, n: int, checkpoint: bool = True) -> tuple[float, float, int, CheckpointRow | None]:
    """Memory of one Atari shard process filled with ``n`` transitions, per transition, and (with
    ``checkpoint``) :func:`measure_checkpoint` on it.

    Returns (RSS delta / n, marginal RSS per transition between n/2 and n, the table's own nbytes,
    checkpoint row). The delta includes the constant cost of the RPC machinery (buffers kept for reuse);
    the marginal figure is what each further stored transition costs.
    """
    config = TableConfig(name="replay", schema=ATARI, capacity=n, storage="atari")
    directory = tempfile.mkdtemp(prefix="replay-bench-ckpt-")
    shard = ShardProcess([config], checkpoint_dir=directory if checkpoint else None)
    try:
        client = ReplayClient([shard.address], timeout=120.0)
        proc = psutil.Process(shard.pid)
        client.info()
        before = proc.memory_info().rss
        half = None
        streams = [AtariStream(100 + i) for i in range(4)]
        batch, done, i = 256, 0, 0
        while done < n:
            m = min(batch, n - done, n // 2 - done if done < n // 2 else batch)
            client.insert(streams[i % len(streams)].batch(m), writer_key=f"stream-{i % len(streams)}")
            done += m
            i += 1
            if done == n // 2:
                half = proc.memory_info().rss
        info = client.info()[0]
        after = proc.memory_info().rss
        row = measure_checkpoint(client, shard.address, directory, n) if checkpoint else None
        client.close()
        return (after - before) / n, (after - half) / (n - n // 2), info.nbytes, row
    finally:
        shard.kill()          # no final checkpoint: it would only cost time here
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements and a 20k-transition fill")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved windows per measurement")
    parser.add_argument("--fill", type=int, default=None, help="transitions for the memory and checkpoint rows")
    parser.add_argument("--only-storage", action="store_true", help="only the memory and checkpoint rows")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        return serve_echo()
    seconds = args.seconds or (0.4 if args.quick else 1.0)
    repeats = args.repeats or (1 if args.quick else 3)
    fill = args.fill or (20_000 if args.quick else 200_000)
    t0 = time.perf_counter()
    rows: list[Row] = []
    if not args.only_storage:
        echo = Echo()
        try:
            for workload in ("cartpole", "atari"):
                for num_shards in (1, 2):
                    rows += run_group(workload=workload, num_shards=num_shards, seconds=seconds, repeats=repeats,
                                      echo=echo)
        finally:
            echo.close()
    per_transition, marginal, table_nbytes, ckpt_row = measure_memory(n=fill)

    print(f"\n### Replay service benchmark ({'quick' if args.quick else 'full'}: best of {repeats} interleaved "
          f"{seconds:g}-s windows; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print("Client in this process; shards and the transport baseline (bare gRPC moving opaque bytes, same "
          "options) in their own processes. Wall-clock columns: best window; `transport MB/s` is the baseline for "
          "the same payload size and direction (insert = up, sample = down) measured in interleaved windows; "
          "`vs transport` = replay MB/s / transport MB/s. CPU columns: CPU ms per batch of the client process plus "
          "the shard (or echo) processes, least of the windows; `vs transport (CPU)` = transport CPU / replay CPU. "
          "`prio cost` = prioritized / uniform, by wall-clock rate and by CPU per batch.\n")
    print("| workload | sampler | shards | batch | op | transitions/s | MB/s | transport MB/s | vs transport "
          "| CPU ms/batch | transport CPU ms | vs transport (CPU) | prio cost (wall) | prio cost (CPU) |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        prio_wall = f"{r.prio_wall:.2f}x" if r.prio_wall is not None else ""
        prio_cpu = f"{r.prio_cpu:.2f}x" if r.prio_cpu is not None else ""
        print(f"| {r.workload} | {r.sampler} | {r.shards} | {r.batch} | {r.op} | {r.per_s:,.0f} | {r.mb_s:.1f} | "
              f"{r.transport_mb_s:.1f} | {r.vs_transport:.0%} | {r.cpu_ms:.2f} | {r.transport_cpu_ms:.2f} | "
              f"{r.vs_transport_cpu:.0%} | {prio_wall} | {prio_cpu} |")
    print(f"\nAtari memory, {fill} transitions in one shard process: RSS delta / n = {per_transition:.0f} B per "
          f"transition; marginal (n/2 -> n) {marginal:.0f} B; the table's own accounting (Table.info().nbytes) "
          f"{table_nbytes / fill:.0f} B")
    c = ckpt_row
    print(f"\nCheckpoint of the {c.transitions}-transition Atari table while sampling batches of 32:\n")
    print("| transitions | checkpoint s | GB on disk | sampling paused ms | longest sample ms | median sample ms "
          "before | samples during |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {c.transitions:,} | {c.seconds:.2f} | {c.gigabytes:.2f} | {c.pause_ms:.1f} | {c.longest_ms:.1f} | "
          f"{c.median_before_ms:.1f} | {c.samples_during} |")
    print("\nTargets:")
    atari256 = [r for r in rows if r.workload == "atari" and r.batch == 256 and r.op == "sample" and r.shards == 1]
    prio = [r for r in rows if r.prio_cpu is not None and r.op == "sample" and r.workload == "atari"]
    for r in atari256:
        print(f"- Atari batch-256 sampling ({r.sampler}, 1 shard) >= 50% of transport: wall {r.vs_transport:.0%} "
              f"{'PASS' if r.vs_transport >= 0.5 else 'MISS'}; CPU {r.vs_transport_cpu:.0%} "
              f"{'PASS' if r.vs_transport_cpu >= 0.5 else 'MISS'}")
    if prio:
        worst_cpu = max(r.prio_cpu for r in prio)
        worst_wall = max(r.prio_wall for r in prio)
        print(f"- prioritized <= 1.25x uniform Atari sampling cost: worst CPU {worst_cpu:.2f}x "
              f"{'PASS' if worst_cpu <= 1.25 else 'MISS'}; worst wall {worst_wall:.2f}x "
              f"{'PASS' if worst_wall <= 1.25 else 'MISS'}")
    print(f"- Atari storage <= 8 KB per transition (RSS delta / n): {per_transition / 1000:.2f} KB "
          f"{'PASS' if per_transition <= 8000 else 'MISS'}")
    print(f"- sampling paused < 100 ms by a checkpoint of {c.transitions} transitions: {c.pause_ms:.1f} ms "
          f"{'PASS' if c.pause_ms < 100 else 'MISS'}")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
