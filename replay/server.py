"""One replay shard: a gRPC server holding one or more tables.

    from replay.auth import ensure_token_file
    from replay.server import ReplayServer
    from replay.table import TableConfig
    from replay.schema import Schema

    config = TableConfig(name="replay", schema=Schema.parse("obs:float32:4,action:int64::0..1"), capacity=100_000)
    token = ensure_token_file("runs/r1/replay.token")
    server = ReplayServer(tables=[config], port=0, metrics_port=None, checkpoint_dir=None, token=token)
    port = server.start()                     # port 0 picks a free port; the real one is returned
    ...                                       # ReplayClient([f"127.0.0.1:{port}"], token=token) talks to it
    server.stop()

From the command line (``evergreen replay serve`` or ``python -m replay.server``)::

    python -m replay.server --port 0 --table "name=replay,capacity=100000,schema=obs:float32:4;action:int64" \
        --token-file runs/r1/replay.token [--checkpoint-dir D] [--metrics-port M] [--host 127.0.0.1] \
        [--shard-index I] [--tls-cert-file C --tls-key-file K [--tls-client-ca-file CA]] \
        [--max-blocked-calls B] [--rebase-limiter-on-restore]

prints one line ``REPLAY_SERVER_READY port=<p> metrics_port=<m|none>`` once it serves, and on SIGTERM or
SIGINT stops accepting requests, wakes blocked callers, checkpoints (when a checkpoint directory is set)
and exits 0 (with ``--exit-with-parent`` it does the same when its parent process exits). The command
line requires either ``--token-file`` (the shard then refuses calls without that token, see
``replay.auth``) or an explicit ``--insecure-no-auth``. Both listeners, gRPC and ``/metrics``, bind
127.0.0.1 unless ``--host`` (and ``--metrics-host``, which defaults to ``--host``) says otherwise.

Starting. Temporary directories that crashed checkpoint writers left are removed; the newest checkpoint,
if any, is restored (one whose tables or schemas differ from the configuration is refused: exit status 1,
message on stderr); restored rows that violate the schema's bounds are dropped (counted in
``TableInfo.dropped_invalid_rows`` and logged); every table starts a new key generation (``replay.keys``;
``checkpoint.next_generation``); with ``--rebase-limiter-on-restore`` the rate limiters of restored tables
are re-centred (``RateLimiter.rebase``).

Hostile input. Every request is parsed here, bounded (``replay.limits``), with any malformed bytes
answered INVALID_ARGUMENT; errors raised by a table (``replay.errors.ReplayError``) become the gRPC
status named by their ``code`` with the error's message (cut to ``MAX_DETAIL_CHARS``); an unknown table
is NOT_FOUND; a sample whose response would exceed the message limit is refused with RESOURCE_EXHAUSTED
before anything is sampled; a call without the token is UNAUTHENTICATED. Anything else is a bug in the
shard: INTERNAL, logged with its traceback.

Blocking. Calls the rate limiter holds back wait at most until their client's deadline or cancellation
(they are woken at once when the RPC ends). At most ``max_blocked_calls`` calls may wait at a time,
on worker threads of their own (the pool has ``max_workers + max_blocked_calls`` threads), so that Info,
Checkpoint and unblocked inserts and samples are always served; a call that would wait beyond that bound
is refused with RESOURCE_EXHAUSTED marked retryable (trailing metadata ``evergreen-retry: 1``), which
``ReplayClient`` retries with backoff.

Checkpoints are written while the shard serves (``Table.snapshot``): the table lock is held only to copy
small arrays and metadata, the large arrays are written from the table's memory outside it.
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
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from replay import checkpoint as ckpt
from replay.auth import ServerTls, TokenInterceptor, read_token_file
from replay.codec import InsertRequestView, UpdatePrioritiesRequestView, encode_array, encode_sample_response
from replay.errors import FailedPrecondition, InvalidArgument, NotFound, ReplayError, ResourceExhausted
from replay.limits import MAX_NAME_CHARS, MAX_SMALL_REQUEST_BYTES, MAX_TIMEOUT_S, clip, clip_detail
from replay.metrics import ShardMetrics
from replay.proto import replay_pb2
from replay.table import Table, TableConfig

log = logging.getLogger("replay.server")

SERVICE_NAME = replay_pb2.DESCRIPTOR.services_by_name["ReplayService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_BLOCKED_CALLS = 64
# Room for everything in a SampleResponse besides the column bytes (keys, probabilities, framing).
_RESPONSE_OVERHEAD_PER_ROW = 8 + 8 + 16
_RESPONSE_OVERHEAD = 64 * 1024
READY_PREFIX = "REPLAY_SERVER_READY"
RETRY_METADATA = (("evergreen-retry", "1"),)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by the server, the client and the benchmark's echo service."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def _parse(parse, data: bytes, what: str):
    """``parse(data)``; any failure is the caller's malformed request (INVALID_ARGUMENT)."""
    try:
        return parse(data)
    except ReplayError:
        raise
    except (DecodeError, ValueError, TypeError, IndexError, OverflowError, KeyError) as e:
        raise InvalidArgument(f"malformed {what}: {clip(str(e), 120)}") from None


def _small(data: bytes, message_class, what: str):
    if len(data) > MAX_SMALL_REQUEST_BYTES:
        raise InvalidArgument(f"{what} of {len(data)} bytes; expected at most {MAX_SMALL_REQUEST_BYTES}")
    return _parse(message_class.FromString, data, what)


def _timeout(value: float | None) -> float | None:
    if value is None:
        return None
    if not 0 <= value <= MAX_TIMEOUT_S:   # also refuses NaN
        raise InvalidArgument(f"timeout_s {value!r}: expected seconds in [0, {MAX_TIMEOUT_S:g}] (or none at all)")
    return float(value)


def _table_name(name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"table name of {len(name)} chars; expected at most {MAX_NAME_CHARS}")
    return name


def _rpc(method: str):
    """Time the handler, and turn replay errors into a gRPC status carrying their (cut) message."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(self, request, context):
            start = time.perf_counter()
            code = "OK"
            try:
                return handler(self, request, context)
            except ReplayError as e:
                code = e.code
                if getattr(e, "retryable", False):
                    context.set_trailing_metadata(RETRY_METADATA)
                context.abort(_status(e.code), clip_detail(str(e)))
            except ValueError as e:
                # Configuration-level checks inside the table (e.g. numpy casting) that are not ReplayErrors
                # are still the caller's bad input.
                code = "INVALID_ARGUMENT"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip_detail(f"{type(e).__name__}: {e}"))
            except Exception:
                # Not the caller's input (every input path raises ReplayErrors): a bug in the shard.
                code = "INTERNAL"
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"replay shard internal error in {method}; see the shard's log")
            finally:
                self._server.metrics_observe(method, time.perf_counter() - start, code)

        return run

    return wrap


class _CallGuard:
    """The ``replay.rate_limiter.WaitGuard`` of one RPC: bounds the number of waiting calls, and ends a
    wait when the RPC is cancelled or its deadline passes."""

    __slots__ = ("_context", "_server", "_entered", "_gone")

    def __init__(self, context, server: ReplayServer):
        self._context, self._server = context, server
        self._entered = False
        self._gone = False

    def enter(self, wake) -> None:
        self._server._enter_blocked()     # raises ResourceExhausted (retryable) when all slots are taken
        self._entered = True

        def on_done():
            self._gone = True
            wake()

        # Called when the RPC terminates for any reason; False if it already has (the client is gone).
        if not self._context.add_callback(on_done):
            self._gone = True

    def exit(self) -> None:
        if self._entered:
            self._entered = False
            self._server._exit_blocked()

    def cancelled(self) -> bool:
        return self._gone or not self._context.is_active()

    def time_left(self) -> float | None:
        return self._context.time_remaining()


class _Servicer:
    def __init__(self, server: ReplayServer):
        self._server = server

    @_rpc("Insert")
    def Insert(self, request: bytes, context):
        # The arrays are views into the request bytes (the table copies them into its storage).
        request = _parse(InsertRequestView, request, "InsertRequest")
        table = self._server.table(request.table)
        result = table.write(request.columns, priorities=request.priorities, timeout=_timeout(request.timeout_s),
                             writer=request.writer_id, sequence=request.sequence,
                             guard=_CallGuard(context, self._server))
        info = table.info()
        response = replay_pb2.InsertResponse(table_size=info.size, priority_mass=info.priority_mass,
                                             duplicate=result.duplicate, writer_rows=result.writer_rows)
        encode_array(np.asarray(result.keys, dtype=np.uint64), name="keys", out=response.keys)
        return response

    @_rpc("Sample")
    def Sample(self, request: bytes, context):
        request = _small(request, replay_pb2.SampleRequest, "SampleRequest")
        table = self._server.table(_table_name(request.table))
        batch_size = int(request.batch_size)
        row_nbytes = table.config.schema.row_nbytes() + _RESPONSE_OVERHEAD_PER_ROW
        limit = self._server.max_message_bytes
        if batch_size > 0 and batch_size * row_nbytes + _RESPONSE_OVERHEAD > limit:
            raise ResourceExhausted(
                f"sample of batch_size={batch_size} from table {request.table!r} would be a "
                f"{batch_size * row_nbytes + _RESPONSE_OVERHEAD}-byte response, over the {limit}-byte message "
                f"limit; request at most {(limit - _RESPONSE_OVERHEAD) // row_nbytes} rows per call"
            )
        timeout = _timeout(request.timeout_s if request.HasField("timeout_s") else None)
        result = table.sample(batch_size, timeout=timeout, guard=_CallGuard(context, self._server))
        # Already serialized (see replay.codec): the generic handler's serializer passes bytes through.
        return encode_sample_response(columns=result.columns, keys=result.keys, probabilities=result.probabilities,
                                      table_size=result.table_size, priority_mass=result.priority_mass)

    @_rpc("UpdatePriorities")
    def UpdatePriorities(self, request: bytes, context):
        request = _parse(UpdatePrioritiesRequestView, request, "UpdatePrioritiesRequest")
        table = self._server.table(request.table)
        result = table.update_priorities(request.keys, request.priorities)
        info = table.info()
        return replay_pb2.UpdatePrioritiesResponse(
            updated=result.updated, stale_generation=result.stale_generation, unknown=result.unknown,
            table_size=info.size, priority_mass=info.priority_mass)

    @_rpc("Info")
    def Info(self, request: bytes, context):
        _small(request, replay_pb2.InfoRequest, "InfoRequest")
        response = replay_pb2.InfoResponse(shard_index=self._server.shard_index,
                                           max_message_bytes=self._server.max_message_bytes)
        for name, table in self._server.tables.items():
            info = table.info()
            response.tables.add(
                name=name, size=info.size, capacity=info.capacity, inserts=info.inserts, samples=info.samples,
                insert_blocked_s=info.insert_blocked_s, sample_blocked_s=info.sample_blocked_s,
                nbytes=info.nbytes, priority_mass=info.priority_mass, storage=info.storage,
                sampler=info.sampler, config_json=json.dumps(table.config.to_json(), sort_keys=True),
                generation=info.generation, stale_generation_updates=info.stale_generation_updates,
                unknown_key_updates=info.unknown_key_updates, duplicate_inserts=info.duplicate_inserts,
                refused_inserts=info.refused_inserts, dropped_invalid_rows=info.dropped_invalid_rows,
            )
        return response

    @_rpc("Checkpoint")
    def Checkpoint(self, request: bytes, context):
        _small(request, replay_pb2.CheckpointRequest, "CheckpointRequest")
        return replay_pb2.CheckpointResponse(path=str(self._server.checkpoint()))

    @_rpc("RebaseRateLimiter")
    def RebaseRateLimiter(self, request: bytes, context):
        request = _small(request, replay_pb2.RebaseRateLimiterRequest, "RebaseRateLimiterRequest")
        names = [self._server.table(_table_name(request.table)).config.name] if request.table else list(
            self._server.tables)
        limiters = []
        for name in names:
            counts = self._server.tables[name].rebase_rate_limiter()
            log.info("table %r: rate limiter rebased: %s", name, counts)
            limiters.append(f"{name}: {counts}")
        return replay_pb2.RebaseRateLimiterResponse(limiters=limiters)


    @_rpc("Clear")
    def Clear(self, request: bytes, context):
        request = _small(request, replay_pb2.ClearRequest, "ClearRequest")
        names = [self._server.table(_table_name(request.table)).config.name] if request.table else list(
            self._server.tables)
        removed = 0
        for name in names:
            count = self._server.tables[name].clear()
            log.info("table %r: cleared (%d items removed)", name, count)
            removed += count
        return replay_pb2.ClearResponse(tables=names, removed=removed)

    @_rpc("ReleaseInserts")
    def ReleaseInserts(self, request: bytes, context):
        request = _small(request, replay_pb2.ReleaseInsertsRequest, "ReleaseInsertsRequest")
        if not request.table:
            raise InvalidArgument("ReleaseInserts needs a table name; expected one of "
                                  f"{sorted(self._server.tables)}")
        table = self._server.table(_table_name(request.table))
        counts = table.release_inserts(request.released)
        log.info("table %r: inserts %s: %s", table.config.name, "released" if request.released else "tied to samples",
                 counts)
        return replay_pb2.ReleaseInsertsResponse(limiter=counts)


METHODS = ("Insert", "Sample", "UpdatePriorities", "Info", "Checkpoint", "RebaseRateLimiter", "Clear", "ReleaseInserts")


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _identity(data: bytes) -> bytes:
    return data


def _service_handler(servicer: _Servicer) -> grpc.GenericRpcHandler:
    """The ReplayService handlers, wire-compatible with replay_pb2_grpc. Requests arrive as raw bytes and
    are parsed in the handlers (so that malformed ones are INVALID_ARGUMENT, not gRPC's INTERNAL from a
    failing deserializer); responses may be pre-serialized bytes."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=_identity, response_serializer=_serialize)
        for method in METHODS
    })


class ReplayServer:
    """A replay shard: tables behind a synchronous gRPC server with a thread pool (see module docstring).

    ``max_workers`` threads serve calls that do not wait; ``max_blocked_calls`` more are reserved for
    calls the rate limiter holds back, and calls beyond that bound are refused (retryable) rather than
    left to take every worker. ``token`` (see ``replay.auth``) makes every call but the health service
    require it; ``tls`` serves TLS instead of plain TCP.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_keep: int = 2,
        shard_index: int = 0,
        max_workers: int = 32,
        max_blocked_calls: int = DEFAULT_MAX_BLOCKED_CALLS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: str | None = None,
        tls: ServerTls | None = None,
        rebase_limiter_on_restore: bool = False,
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
        if max_workers < 1 or max_blocked_calls < 1:
            raise ValueError(f"max_workers={max_workers} and max_blocked_calls={max_blocked_calls} must be >= 1")
        for config in configs:
            config.validate()
        self._configs = configs
        self.tables: dict[str, Table] = {c.name: Table(c) for c in configs}
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.metrics_port_requested = metrics_port
        self.metrics_host = host if metrics_host is None else metrics_host
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_keep = checkpoint_keep
        self.shard_index = int(shard_index)
        self.max_workers = max_workers
        self.max_blocked_calls = max_blocked_calls
        self.max_message_bytes = int(max_message_bytes)
        self._token = token
        self.tls = tls
        self.rebase_limiter_on_restore = rebase_limiter_on_restore
        self.metrics = ShardMetrics(tables=lambda: self.tables, shard_index=self.shard_index)
        self.restored_from: Path | None = None
        self.generation = 0
        self._checkpoint_lock = threading.Lock()
        self._blocked_lock = threading.Lock()
        self._blocked = 0
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._stopped = False

    def __repr__(self) -> str:   # never the token
        return (f"ReplayServer(tables={sorted(self.tables)}, address={self.host}:{self.port}, "
                f"authenticated={self._token is not None}, tls={self.tls is not None})")

    # -- used by the servicer -------------------------------------------------------------------------
    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise NotFound(f"unknown table {clip(name)}; this shard serves {sorted(self.tables)}") from None

    def metrics_observe(self, method: str, seconds: float, code: str = "OK") -> None:
        self.metrics.observe(method, seconds, code)

    def _enter_blocked(self) -> None:
        with self._blocked_lock:
            if self._blocked >= self.max_blocked_calls:
                err = ResourceExhausted(
                    f"{self._blocked} calls already wait on this shard's rate limiters (max_blocked_calls="
                    f"{self.max_blocked_calls}); retry later")
                err.retryable = True
                raise err
            self._blocked += 1

    def _exit_blocked(self) -> None:
        with self._blocked_lock:
            self._blocked -= 1

    @property
    def blocked_calls(self) -> int:
        """Calls waiting on a rate limiter now."""
        return self._blocked

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
        table is modified in that case. Restored rows outside the schema's bounds are dropped and logged.
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
            dropped, first = fresh.drop_invalid_rows()
            if dropped:
                log.warning("checkpoint %s, table %r: dropped %d restored rows outside the schema's bounds "
                            "(first: %s)", path, name, dropped, first)
            loaded[name] = fresh
        self.tables.update(loaded)
        self.restored_from = path
        return path

    def _start_generation(self) -> None:
        """Every start over a checkpoint directory is a new key generation (see ``replay.keys``)."""
        if self.checkpoint_dir is None:
            return
        saved = max(t.generation for t in self.tables.values())
        self.generation = ckpt.next_generation(self.checkpoint_dir,
                                               at_least=saved + 1 if self.restored_from is not None else 0)
        for table in self.tables.values():
            table.start_generation(self.generation)

    def start(self) -> int:
        """Restore (if a checkpoint exists), bind, start serving and the metrics endpoint; return the port."""
        if self._grpc is not None:
            raise RuntimeError(f"server already started on port {self.port}")
        if self.checkpoint_dir is not None:
            removed = ckpt.remove_stale_temporaries(self.checkpoint_dir)
            if removed:
                log.info("removed %d stale checkpoint temporaries in %s: %s", len(removed), self.checkpoint_dir,
                         ", ".join(removed[:5]))
        restored = self.restore()
        if restored is not None:
            log.info("restored tables %s from %s", sorted(self.tables), restored)
            if self.rebase_limiter_on_restore:
                for name, table in self.tables.items():
                    log.info("table %r: rate limiter rebased after the restore: %s", name,
                             table.rebase_rate_limiter())
        self._start_generation()
        interceptors = []
        if self._token is not None:
            interceptors.append(TokenInterceptor(self._token, on_reject=self.metrics.count_unauthenticated))
        else:
            log.warning("replay shard %d serves WITHOUT authentication (no token)", self.shard_index)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers + self.max_blocked_calls,
                                       thread_name_prefix="replay-rpc"),
            interceptors=interceptors,
            # so_reuseport=0: a restarted shard must fail to bind rather than share its port with a stale one.
            options=[*grpc_options(self.max_message_bytes), ("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((_service_handler(_Servicer(self)),))
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.host}:{self._requested_port}"
        try:
            if self.tls is not None:
                port = server.add_secure_port(address, self.tls.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot bind replay server to {address}: {e}") from e
        if port == 0:
            raise RuntimeError(f"cannot bind replay server to {address} (in use?)")
        server.start()
        self._grpc = server
        self.port = port
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port_requested is not None:
            self.metrics.start_http_server(port=self.metrics_port_requested, host=self.metrics_host)
        return port

    def checkpoint(self) -> Path:
        """Write every table's state to a new checkpoint in ``checkpoint_dir``; return its directory.

        Each table's large arrays are written while it keeps serving (see ``Table.snapshot``)."""
        if self.checkpoint_dir is None:
            raise FailedPrecondition("this replay server has no checkpoint directory (start it with --checkpoint-dir)")
        with self._checkpoint_lock, ckpt.CheckpointWriter(self.checkpoint_dir, keep=self.checkpoint_keep) as writer:
            for name, table in sorted(self.tables.items()):
                snapshot = table.snapshot()
                for array_name, array in sorted(snapshot.live.items()):
                    writer.add_array(name, array_name, array)
                meta, arrays = snapshot.finish()
                for array_name, array in sorted(arrays.items()):
                    writer.add_array(name, array_name, array)
                writer.add_table(name, meta)
                if snapshot.dropped:
                    log.info("checkpoint of table %r: %d oldest items were overwritten while it was written and "
                             "are not in it", name, snapshot.dropped)
            return writer.commit()

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
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (a cluster node's own address for other nodes to reach it)")
    parser.add_argument("--table", action="append", default=[], metavar="SPEC",
                        help="table spec for TableConfig.parse, e.g. "
                             "'name=replay,capacity=100000,sampler=prioritized,schema=obs:float32:4;action:int64'")
    parser.add_argument("--table-json", action="append", default=[], metavar="JSON",
                        help="table as TableConfig.to_json() (used by replay.launch)")
    parser.add_argument("--checkpoint-dir", default=None, help="restore from / checkpoint to this directory")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0 = a free one)")
    parser.add_argument("--metrics-host", default=None, help="address /metrics binds (default: --host)")
    parser.add_argument("--shard-index", type=int, default=0, help="value of the `shard` metrics label")
    parser.add_argument("--max-workers", type=int, default=32, help="RPC worker threads for calls that do not wait")
    parser.add_argument("--max-blocked-calls", type=int, default=DEFAULT_MAX_BLOCKED_CALLS,
                        help="calls that may wait on a rate limiter at once (more are refused, retryable)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token-file", default=None,
                      help="file (mode 0600) holding the run's token; calls without it are refused")
    auth.add_argument("--insecure-no-auth", action="store_true",
                      help="serve without a token: anyone who can reach the port can read and write the tables")
    parser.add_argument("--tls-cert-file", default=None, help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key-file", default=None, help="private key of --tls-cert-file (PEM)")
    parser.add_argument("--tls-client-ca-file", default=None,
                        help="require client certificates signed by this CA (PEM)")
    parser.add_argument("--rebase-limiter-on-restore", action="store_true",
                        help="re-centre restored rate limiters (so that neither side stays blocked after a resume)")
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
    if args.token_file is None and not args.insecure_no_auth:
        print("evergreen replay serve: error: --token-file FILE is required (or --insecure-no-auth to serve "
              "without authentication)", file=sys.stderr)
        return 2
    if (args.tls_cert_file is None) != (args.tls_key_file is None) or (
            args.tls_client_ca_file is not None and args.tls_cert_file is None):
        print("evergreen replay serve: error: TLS needs both --tls-cert-file and --tls-key-file "
              "(--tls-client-ca-file only with them)", file=sys.stderr)
        return 2
    try:
        token = read_token_file(args.token_file) if args.token_file is not None else None
        tls = (ServerTls.from_files(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
               if args.tls_cert_file is not None else None)
    except (ValueError, OSError) as e:
        print(f"evergreen replay serve: error: {e}", file=sys.stderr)
        return 2
    try:
        server = ReplayServer(
            configs, port=args.port, host=args.host, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            checkpoint_dir=args.checkpoint_dir, shard_index=args.shard_index, max_workers=args.max_workers,
            max_blocked_calls=args.max_blocked_calls, max_message_bytes=args.max_message_bytes, token=token,
            tls=tls, rebase_limiter_on_restore=args.rebase_limiter_on_restore,
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
