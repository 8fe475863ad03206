"""One replay shard: a gRPC server holding one or more tables.

    from replay.server import ReplayServer
    from replay.table import TableConfig
    from replay.schema import Schema

    config = TableConfig(name="replay", schema=Schema.parse("obs:float32:4,action:int64"), capacity=100_000)
    server = ReplayServer(tables=[config], port=0, metrics_port=None, checkpoint_dir=None)
    port = server.start()                     # port 0 picks a free port; the real one is returned
    ...                                       # ReplayClient([f"127.0.0.1:{port}"]) talks to it
    server.stop()

From the command line (``evergreen replay serve`` or ``python -m replay.server``)::

    python -m replay.server --port 0 --table "name=replay,capacity=100000,schema=obs:float32:4;action:int64" \
        [--checkpoint-dir D] [--metrics-port M] [--host 127.0.0.1] [--shard-index I]

prints one line ``REPLAY_SERVER_READY port=<p> metrics_port=<m|none>`` once it serves, and on SIGTERM or
SIGINT stops accepting requests, wakes blocked callers, checkpoints (when a checkpoint directory is set)
and exits 0 (with ``--exit-with-parent`` it does the same when its parent process exits). With a checkpoint directory that holds a checkpoint, the tables are restored before serving;
a checkpoint whose tables or schemas differ from the configuration is refused (exit status 1, message on
stderr).

Errors raised by a table (``replay.errors.ReplayError``) become the gRPC status named by their ``code``
with the error's message; an unknown table is NOT_FOUND; a sample whose response would exceed the message
limit is refused with RESOURCE_EXHAUSTED before anything is sampled.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from replay import checkpoint as ckpt
from replay.codec import InsertRequestView, decode_array, encode_array, encode_sample_response
from replay.errors import FailedPrecondition, NotFound, ReplayError, ResourceExhausted
from replay.metrics import ShardMetrics
from replay.proto import replay_pb2, replay_pb2_grpc
from replay.table import Table, TableConfig

log = logging.getLogger("replay.server")

SERVICE_NAME = replay_pb2.DESCRIPTOR.services_by_name["ReplayService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# Room for everything in a SampleResponse besides the column bytes (keys, probabilities, framing).
_RESPONSE_OVERHEAD_PER_ROW = 8 + 8 + 16
_RESPONSE_OVERHEAD = 64 * 1024
READY_PREFIX = "REPLAY_SERVER_READY"


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by the server, the client and the benchmark's echo service."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def _rpc(method: str):
    """Time the handler, and turn replay errors into a gRPC status carrying their message."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(self, request, context):
            start = time.perf_counter()
            try:
                return handler(self, request, context)
            except ReplayError as e:
                context.abort(_status(e.code), str(e))
            except ValueError as e:
                # Configuration-level checks inside the table (e.g. numpy casting) that are not ReplayErrors
                # are still the caller's bad input.
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
            finally:
                self._server.metrics_observe(method, time.perf_counter() - start)

        return run

    return wrap


class _Servicer(replay_pb2_grpc.ReplayServiceServicer):
    def __init__(self, server: ReplayServer):
        self._server = server

    @_rpc("Insert")
    def Insert(self, request: bytes, context):
        # Parsed here rather than by gRPC's deserializer so that a malformed message becomes INVALID_ARGUMENT;
        # the arrays are views into the request bytes (the table copies them into its storage).
        request = InsertRequestView(request)
        table = self._server.table(request.table)
        keys = table.insert(request.columns, priorities=request.priorities, timeout=request.timeout_s)
        info = table.info()
        response = replay_pb2.InsertResponse(table_size=info.size, priority_mass=info.priority_mass)
        encode_array(np.asarray(keys, dtype=np.uint64), name="keys", out=response.keys)
        return response

    @_rpc("Sample")
    def Sample(self, request, context):
        table = self._server.table(request.table)
        batch_size = int(request.batch_size)
        row_nbytes = table.config.schema.row_nbytes() + _RESPONSE_OVERHEAD_PER_ROW
        limit = self._server.max_message_bytes
        if batch_size > 0 and batch_size * row_nbytes + _RESPONSE_OVERHEAD > limit:
            raise ResourceExhausted(
                f"sample of batch_size={batch_size} from table {request.table!r} would be a "
                f"{batch_size * row_nbytes + _RESPONSE_OVERHEAD}-byte response, over the {limit}-byte message "
                f"limit; request at most {(limit - _RESPONSE_OVERHEAD) // row_nbytes} rows per call"
            )
        timeout = request.timeout_s if request.HasField("timeout_s") else None
        result = table.sample(batch_size, timeout=timeout)
        # Already serialized (see replay.codec): the generic handler's serializer passes bytes through.
        return encode_sample_response(columns=result.columns, keys=result.keys, probabilities=result.probabilities,
                                      table_size=result.table_size, priority_mass=result.priority_mass)

    @_rpc("UpdatePriorities")
    def UpdatePriorities(self, request, context):
        table = self._server.table(request.table)
        keys = decode_array(request.keys, name="keys")
        priorities = decode_array(request.priorities, name="priorities")
        updated = table.update_priorities(keys, priorities)
        info = table.info()
        return replay_pb2.UpdatePrioritiesResponse(updated=int(updated), table_size=info.size,
                                                   priority_mass=info.priority_mass)

    @_rpc("Info")
    def Info(self, request, context):
        response = replay_pb2.InfoResponse(shard_index=self._server.shard_index,
                                           max_message_bytes=self._server.max_message_bytes)
        for name, table in self._server.tables.items():
            info = table.info()
            response.tables.add(
                name=name, size=info.size, capacity=info.capacity, inserts=info.inserts, samples=info.samples,
                insert_blocked_s=info.insert_blocked_s, sample_blocked_s=info.sample_blocked_s,
                nbytes=info.nbytes, priority_mass=info.priority_mass, storage=info.storage,
                sampler=info.sampler, config_json=json.dumps(table.config.to_json(), sort_keys=True),
            )
        return response

    @_rpc("Checkpoint")
    def Checkpoint(self, request, context):
        return replay_pb2.CheckpointResponse(path=str(self._server.checkpoint()))


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _identity(data: bytes) -> bytes:
    return data


_REQUESTS = {
    "Insert": None,   # raw bytes, parsed by replay.codec.InsertRequestView in the handler
    "Sample": replay_pb2.SampleRequest,
    "UpdatePriorities": replay_pb2.UpdatePrioritiesRequest,
    "Info": replay_pb2.InfoRequest,
    "Checkpoint": replay_pb2.CheckpointRequest,
}


def _service_handler(servicer: _Servicer) -> grpc.GenericRpcHandler:
    """The ReplayService handlers, wire-compatible with replay_pb2_grpc but accepting pre-serialized responses."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=_identity if request is None else request.FromString,
            response_serializer=_serialize)
        for method, request in _REQUESTS.items()
    })


class ReplayServer:
    """A replay shard: tables behind a synchronous gRPC server with a thread pool (see module docstring).

    ``max_workers`` bounds concurrent RPCs; callers blocked by a rate limiter hold a worker, so it should
    exceed the number of writers and samplers that may block at once.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        checkpoint_dir: str | Path | None = None,
        checkpoint_keep: int = 2,
        shard_index: int = 0,
        max_workers: int = 32,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        configs = list(tables)
        if not configs:
            raise ValueError("tables is empty; a replay server needs at least one TableConfig")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"table names {duplicates} are configured more than once; names must be unique")
        if not 0 <= port <= 65535:
            raise ValueError(f"port={port} is not in 0..65535")
        if max_message_bytes <= _RESPONSE_OVERHEAD:
            raise ValueError(f"max_message_bytes={max_message_bytes} must exceed {_RESPONSE_OVERHEAD}")
        for config in configs:
            config.validate()
        self._configs = configs
        self.tables: dict[str, Table] = {c.name: Table(c) for c in configs}
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.metrics_port_requested = metrics_port
        self.metrics_host = metrics_host
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_keep = checkpoint_keep
        self.shard_index = int(shard_index)
        self.max_workers = max_workers
        self.max_message_bytes = int(max_message_bytes)
        self.metrics = ShardMetrics(tables=self.tables, shard_index=self.shard_index)
        self.restored_from: Path | None = None
        self._checkpoint_lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._stopped = False

    # -- used by the servicer -------------------------------------------------------------------------
    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise NotFound(f"unknown table {name!r}; this shard serves {sorted(self.tables)}") from None

    def metrics_observe(self, method: str, seconds: float) -> None:
        self.metrics.observe(method, seconds)

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started; call start() first")
        return f"{self.host}:{self.port}"

    def restore(self) -> Path | None:
        """Load the newest checkpoint in ``checkpoint_dir`` into the tables; return its path (None if none).

        ``FailedPrecondition`` if the checkpoint's tables or schemas differ from the configured ones; no
        table is modified in that case.
        """
        if self.checkpoint_dir is None:
            return None
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        try:
            states = ckpt.read_checkpoint(path)
        except (OSError, ValueError, KeyError) as e:
            raise FailedPrecondition(f"cannot read replay checkpoint {path}: {e}") from e
        if set(states) != set(self.tables):
            raise FailedPrecondition(
                f"checkpoint {path} holds tables {sorted(states)} but this server is configured with tables "
                f"{sorted(self.tables)}; start with the same tables or another --checkpoint-dir"
            )
        # Load into fresh tables first so that a mismatch in the second table leaves the first untouched.
        loaded = {}
        for name, (meta, arrays) in states.items():
            fresh = Table(self.tables[name].config)
            try:
                fresh.load_state_dict(meta, arrays)
            except ReplayError as e:
                raise FailedPrecondition(f"checkpoint {path}, table {name!r}: {e}") from e
            loaded[name] = fresh
        self.tables.update(loaded)
        self.restored_from = path
        return path

    def start(self) -> int:
        """Restore (if a checkpoint exists), bind, start serving and the metrics endpoint; return the port."""
        if self._grpc is not None:
            raise RuntimeError(f"server already started on port {self.port}")
        restored = self.restore()
        if restored is not None:
            log.info("restored tables %s from %s", sorted(self.tables), restored)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="replay-rpc"),
            # so_reuseport=0: a restarted shard must fail to bind rather than share its port with a stale one.
            options=[*grpc_options(self.max_message_bytes), ("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((_service_handler(_Servicer(self)),))
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = server.add_insecure_port(f"{self.host}:{self._requested_port}")
        except RuntimeError as e:
            raise RuntimeError(f"cannot bind replay server to {self.host}:{self._requested_port}: {e}") from e
        if port == 0:
            raise RuntimeError(f"cannot bind replay server to {self.host}:{self._requested_port} (in use?)")
        server.start()
        self._grpc = server
        self.port = port
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port_requested is not None:
            self.metrics.start_http_server(port=self.metrics_port_requested, host=self.metrics_host)
        return port

    def checkpoint(self) -> Path:
        """Write every table's state to a new checkpoint in ``checkpoint_dir``; return its directory."""
        if self.checkpoint_dir is None:
            raise FailedPrecondition("this replay server has no checkpoint directory (start it with --checkpoint-dir)")
        with self._checkpoint_lock:
            states = {name: table.state_dict() for name, table in self.tables.items()}
            return ckpt.write_checkpoint(self.checkpoint_dir, states, keep=self.checkpoint_keep)

    def stop(self, *, grace: float = 2.0, checkpoint: bool = False) -> Path | None:
        """Stop serving; with ``checkpoint=True`` (and a checkpoint dir) write a final checkpoint and return it.

        New RPCs are refused at once; callers blocked in a rate limiter are woken with CANCELLED; in-flight
        requests get ``grace`` seconds to finish.
        """
        if self._stopped:
            return None
        self._stopped = True
        written = None
        if self._grpc is not None:
            self._health.enter_graceful_shutdown()
            done = self._grpc.stop(grace)
            # Closing the tables wakes callers blocked by the rate limiter, so the grace period is not
            # spent waiting for samples that cannot be satisfied.
            for table in self.tables.values():
                table.close()
            done.wait()
        else:
            for table in self.tables.values():
                table.close()
        if checkpoint and self.checkpoint_dir is not None:
            written = self.checkpoint()
        self.metrics.stop()
        return written

    def __enter__(self) -> ReplayServer:
        if self._grpc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tune_malloc() -> bool:
    """Tune glibc malloc for a shard's traffic: many-MB buffers allocated and freed on every request.

    glibc's defaults serve such a buffer from fresh pages each time (its dynamic mmap threshold, or the heap
    trimmed after the free), so every request pays a page fault per 4 KiB: joining a 14 MB response took
    ~9 ms instead of ~1 ms. Here buffers up to 32 MiB (glibc's maximum threshold) come from the heap, freed
    memory is kept for reuse (trim threshold 256 MiB), and one arena serves all RPC threads so that what is
    kept is bounded by the peak of concurrent requests rather than multiplied by the number of threads
    (with per-thread arenas a 20k-transition Atari fill carried ~6 KiB of extra RSS per transition).
    Returns False (and changes nothing) where glibc's ``mallopt`` is not available.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8   # from <malloc.h>
    return all(bool(mallopt(option, value)) for option, value in (
        (m_arena_max, 1), (m_mmap_threshold, 32 << 20), (m_trim_threshold, 256 << 20)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evergreen replay serve", description="Run one replay shard.")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 = a free one, printed when ready)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--table", action="append", default=[], metavar="SPEC",
                        help="table spec for TableConfig.parse, e.g. "
                             "'name=replay,capacity=100000,sampler=prioritized,schema=obs:float32:4;action:int64'")
    parser.add_argument("--table-json", action="append", default=[], metavar="JSON",
                        help="table as TableConfig.to_json() (used by replay.launch)")
    parser.add_argument("--checkpoint-dir", default=None, help="restore from / checkpoint to this directory")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0 = a free one)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--shard-index", type=int, default=0, help="value of the `shard` metrics label")
    parser.add_argument("--max-workers", type=int, default=32, help="RPC worker threads")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop (checkpointing) when the parent process exits, e.g. a launcher killed with -9")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``evergreen replay serve ...``: serve until SIGTERM/SIGINT; 0 on a clean stop, 1/2 on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    tune_malloc()
    try:
        configs = [TableConfig.parse(spec) for spec in args.table]
        configs += [TableConfig.from_json(json.loads(text)) for text in args.table_json]
    except (ValueError, KeyError, TypeError, ReplayError) as e:
        print(f"evergreen replay serve: error: bad table spec: {e}", file=sys.stderr)
        return 2
    if not configs:
        print("evergreen replay serve: error: at least one --table is required", file=sys.stderr)
        return 2
    try:
        server = ReplayServer(
            configs, port=args.port, host=args.host, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            checkpoint_dir=args.checkpoint_dir, shard_index=args.shard_index, max_workers=args.max_workers,
            max_message_bytes=args.max_message_bytes,
        )
        port = server.start()
    except (ReplayError, ValueError, RuntimeError, OSError) as e:
        print(f"evergreen replay serve: error: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    metrics = server.metrics_port if server.metrics_port is not None else "none"
    if server.restored_from is not None:
        log.info("restored from %s", server.restored_from)
    print(f"{READY_PREFIX} port={port} metrics_port={metrics}", flush=True)
    while not stop.wait(0.5):
        # A launcher that dies without stopping us (SIGKILL, crash) re-parents us; a shard in its own
        # session would otherwise run on forever.
        if args.exit_with_parent and os.getppid() != parent:
            log.info("parent process %d exited: stopping", parent)
            break
    if received:
        log.info("signal %s: stopping", received[0])
    try:
        written = server.stop(checkpoint=True)
    except (ReplayError, OSError) as e:
        print(f"evergreen replay serve: error: final checkpoint failed: {e}", file=sys.stderr)
        return 1
    if written is not None:
        log.info("final checkpoint %s", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
