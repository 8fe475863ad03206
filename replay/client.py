"""Client of a sharded replay table: routes inserts by writer key, samples across shards.

    from replay.auth import read_token_file
    from replay.client import ReplayClient

    client = ReplayClient(["10.0.0.5:7000", "10.0.0.6:7000"], table="replay", timeout=30.0,
                          token=read_token_file("runs/r1/replay.token"))
    keys = client.insert({"obs": obs, "action": act, ...}, writer_key="actor-3", priorities=p)
    batch = client.sample(256, beta=0.4)        # SampleBatch(keys, columns, probabilities, weights)
    client.update_priorities(batch.keys, new_priorities)      # -> rows updated
    client.priority_update_counts                # {"updated": ..., "stale_generation": ..., "unknown": ...}
    client.info()                                # [TableInfo of shard 0, TableInfo of shard 1]
    client.rebase_rate_limiter()                 # after a resume: neither side stays blocked
    client.clear()                               # empty the table on every shard (a scenario's flush)

Authentication. With ``token`` every call carries ``authorization: Bearer <token>`` (``replay.auth``);
a shard started with a token refuses calls without it (``errors.Unauthenticated``). ``tls``
(``replay.auth.ClientTls``) makes the channels TLS. Both travel with the pickled client.

Routing and keys. An insert goes to shard ``crc32(writer_key) % n`` (stable for a given shard count, so one
writer's transitions stay together). Keys returned to callers are global uint64s (``replay.keys``)::

    | shard: 16 bits | generation: 8 bits | index: 40 bits |

the owning shard's index in the top 16 bits (added here), below it the table key the shard handed out:
the shard's key generation (a new one every time a shard starts, so that a key issued before a crash is
never taken for the row that reuses its index after the restore) and the insert index.
``update_priorities`` sends each key back to its owner (by the top 16 bits) with the shard bits cleared;
the shard ignores keys of another generation and says how many (``priority_update_counts``).

Idempotent inserts. Each insert carries this client's writer id for its writer key (a random session id
plus a number: a restarted actor never shares one) and a sequence number that grows by one per call;
every retry of a call resends the same pair, so a shard that applied an insert whose response was lost
acknowledges the retry without storing the rows again (``duplicate_inserts`` counts such acks). Inserts
with one writer key are therefore sent one at a time (a per-writer lock). An insert that raised after
all retries (``ShardUnavailable``, or no response before the deadline) may or may not have been stored;
calling ``insert`` again sends a new sequence number.

Sampling. A batch is split across shards in proportion to their sizes (uniform, fifo) or priority masses
(prioritized), taken from the latest responses (every response carries the shard's size and mass; shards
not heard from for ``refresh_interval_s`` are asked with Info). The split is stratified: each shard gets
``floor(B * share)`` rows plus one more with probability equal to the fractional part (systematic
sampling), so the expected count is exactly ``B * share``. Per-shard probabilities become global ones as
``P = share_s * p_s`` and importance weights are ``replay.samplers.importance_weights(P, N, beta)`` with
``N`` the total size. Shard requests run concurrently.

Failures. Table errors come back as the ``replay.errors`` class named by the gRPC status, with the shard's
message. A shard that is UNAVAILABLE (restarting), that refuses a call because too many callers already
wait on its rate limiter (RESOURCE_EXHAUSTED marked retryable), or that has another insert of the same
writer in progress (ABORTED) is retried with exponential backoff until the call's timeout, then
``ShardUnavailable`` names the shard. Requests over the message limit are refused here, naming the size
and the limit, before anything is sent.

The client is thread-safe and picklable by address (channels are re-created lazily after unpickling), so
it can be handed to Ray actors.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import secrets
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np

from replay import errors
from replay.auth import ClientTls, metadata
from replay.codec import InsertRequestParts, SampleResponseView, decode_array, encode_array, payload_nbytes
from replay.frames import SharedFrames, share_frames
from replay.keys import SHARD_BITS, TABLE_KEY_BITS
from replay.limits import MAX_TIMEOUT_S, MAX_WRITER_KEY_CHARS
from replay.proto import replay_pb2
from replay.samplers import importance_weights
from replay.storage import STACK_FIELDS
from replay.table import TableConfig, TableInfo

LOCAL_BITS = TABLE_KEY_BITS
LOCAL_MASK = np.uint64((1 << LOCAL_BITS) - 1)
MAX_SHARDS = 1 << SHARD_BITS
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RETRY_METADATA_KEY = "evergreen-retry"
"""Trailing metadata with which a shard marks a refusal as transient (too many blocked callers)."""
# Bytes of a request besides the array payload (field tags, names, dtype strings, shapes).
_REQUEST_OVERHEAD = 64 * 1024
_RESPONSE_OVERHEAD_PER_ROW = 8 + 8 + 16


#: How long sampling waits for a shard it has not heard from lately before leaving it out (it is down).
PROBE_TIMEOUT_S = 1.0
#: Default timeout of a priority update: best effort, so a shard that is down costs the learner little.
PRIORITY_TIMEOUT_S = 2.0


class ShardUnavailable(errors.ReplayError):
    """A shard stayed unreachable for the whole call timeout."""

    code = "UNAVAILABLE"


_ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (errors.InvalidArgument, errors.FailedPrecondition, errors.ResourceExhausted,
                errors.DeadlineExceeded, errors.NotFound, errors.Cancelled, errors.Aborted,
                errors.Unauthenticated, ShardUnavailable)
}


@dataclass
class SampleBatch:
    keys: np.ndarray                  # uint64 [B], global keys (shard | generation | index, see replay.keys)
    columns: dict[str, np.ndarray]    # each [B, *field.shape], writable, contiguous
    probabilities: np.ndarray         # float64 [B], probability of each draw across all shards
    weights: np.ndarray               # float32 [B], importance weights (max 1)
    table: str = ""                   # the table sampled: where the batch's priority updates must go


def shard_of_writer(writer_key: str, num_shards: int) -> int:
    """The shard that ``writer_key``'s inserts go to: ``crc32(utf-8 key) % num_shards``."""
    return zlib.crc32(writer_key.encode("utf-8")) % num_shards


def global_keys(local_keys: np.ndarray, shard: int) -> np.ndarray:
    """Table keys of ``shard`` as global keys (shard index in the top 16 bits)."""
    local = np.asarray(local_keys, dtype=np.uint64)
    if local.size and int(local.max()) >> LOCAL_BITS:
        raise ValueError(f"shard {shard} returned key {int(local.max())} >= 2**{LOCAL_BITS}; it cannot be tagged")
    return local | np.uint64(shard << LOCAL_BITS)


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, table key) arrays of global keys."""
    keys = np.asarray(keys, dtype=np.uint64)
    return (keys >> np.uint64(LOCAL_BITS)).astype(np.int64), keys & LOCAL_MASK


def allocate(batch_size: int, weights: Sequence[float], *, u: float) -> np.ndarray:
    """Rows per shard: ``floor(B*share)`` plus one for a systematic draw over the fractional parts.

    ``u`` in [0, 1) is the systematic offset; shard s gets an extra row when a point ``u + k`` falls in its
    interval of the cumulative fractional parts, so ``E[count_s] = B * share_s`` exactly.

    >>> allocate(8, [30, 10], u=0.5).tolist()
    [6, 2]
    """
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not total > 0:
        raise ValueError(f"weights {w.tolist()} have no positive mass")
    ideal = batch_size * (w / total)
    base = np.floor(ideal)
    frac = ideal - base
    cumulative = np.concatenate([[0.0], np.cumsum(frac)])
    extra = np.ceil(cumulative[1:] - u - 1e-12) - np.ceil(cumulative[:-1] - u - 1e-12)
    counts = (base + extra).astype(np.int64)
    # Floating-point slack can leave the total one off; fix it on the shard with the largest remainder.
    diff = batch_size - int(counts.sum())
    if diff:
        counts[int(np.argmax(frac if diff > 0 else counts))] += diff
    return counts


SERVICE_NAME = replay_pb2.DESCRIPTOR.services_by_name["ReplayService"].full_name
_RESPONSES = {
    "Insert": replay_pb2.InsertResponse,
    "Sample": SampleResponseView,       # zero-copy views into the response bytes
    "UpdatePriorities": replay_pb2.UpdatePrioritiesResponse,
    "Info": replay_pb2.InfoResponse,
    "Checkpoint": replay_pb2.CheckpointResponse,
    "RebaseRateLimiter": replay_pb2.RebaseRateLimiterResponse,
    "Clear": replay_pb2.ClearResponse,
    "ReleaseInserts": replay_pb2.ReleaseInsertsResponse,
}


def _serialize(request) -> bytes:
    # Insert requests arrive pre-serialized (replay.codec.InsertRequestParts); the rest are messages.
    return request if isinstance(request, bytes) else request.SerializeToString()


class _Stub:
    """ReplayService callables (like replay_pb2_grpc.ReplayServiceStub) that also send pre-serialized bytes."""

    def __init__(self, channel: grpc.Channel):
        for method, response in _RESPONSES.items():
            parse = response if response is SampleResponseView else response.FromString
            setattr(self, method, channel.unary_unary(f"/{SERVICE_NAME}/{method}", request_serializer=_serialize,
                                                      response_deserializer=parse))


class _Shard:
    __slots__ = ("index", "address", "channel", "stub", "size", "mass", "seen", "down_until")

    def __init__(self, index: int, address: str, options, credentials):
        self.index = index
        self.address = address
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = _Stub(self.channel)
        self.size = 0
        self.mass = 0.0
        self.seen = -math.inf   # time.monotonic() of the latest size/mass
        self.down_until = -math.inf   # unreachable at the last try: left out of samples until then


class ReplayClient:
    """Sharded client of one replay table (see the module docstring)."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        table: str = "replay",
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        refresh_interval_s: float = 1.0,
        seed: int | None = None,
        token: str | None = None,
        tls: ClientTls | None = None,
        share_frames: bool = True,
    ):
        if isinstance(addresses, str):
            addresses = [addresses]
        addresses = [str(a) for a in addresses]
        if not addresses:
            raise ValueError("addresses is empty; expected at least one 'host:port'")
        if len(addresses) > MAX_SHARDS:
            raise ValueError(f"{len(addresses)} shards exceed the {MAX_SHARDS} that 16-bit key tags can address")
        for a in addresses:
            if ":" not in a:
                raise ValueError(f"address {a!r} is not 'host:port'")
        if not 0 < timeout <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout={timeout} must be > 0 and at most {MAX_TIMEOUT_S:g} seconds")
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be a str (see replay.auth.read_token_file)")
        if tls is not None and not isinstance(tls, ClientTls):
            raise TypeError(f"tls={tls!r} must be a replay.auth.ClientTls")
        self.addresses = tuple(addresses)
        self.table = table
        self.timeout = float(timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.refresh_interval_s = float(refresh_interval_s)
        self.seed = seed
        self._token = token
        self.tls = tls
        if not isinstance(share_frames, bool):
            raise TypeError(f"share_frames={share_frames!r} must be a bool")
        self.share_frames = share_frames
        self._init_runtime()

    def __repr__(self) -> str:   # never the token
        return (f"ReplayClient({list(self.addresses)!r}, table={self.table!r}, "
                f"authenticated={self._token is not None}, tls={self.tls is not None})")

    # -- pickling by address ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # The token travels with the client (Ray hands clients to actors on other nodes); it is never
        # printed (see __repr__).
        return {"addresses": self.addresses, "table": self.table, "timeout": self.timeout,
                "max_message_bytes": self.max_message_bytes, "refresh_interval_s": self.refresh_interval_s,
                "seed": self.seed, "_token": self._token, "tls": self.tls, "share_frames": self.share_frames}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._shards: list[_Shard] | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._config: TableConfig | None = None
        self._rng = random.Random(self.seed)
        self._metadata = metadata(self._token)
        # A fresh session per client object (and per unpickled copy): writer ids are never shared, so
        # two clients' independent sequence numbers can never be taken for repeats of each other.
        self._session = secrets.token_hex(8)
        self._writers: dict[str, tuple[str, threading.Lock]] = {}
        self._sequences: dict[str, int] = {}
        self._acked_rows: dict[str, int] = {}   # per writer key: rows the shard acknowledged, in total
        self.duplicate_inserts = 0
        self.lost_rows = 0
        """Rows a shard acknowledged and later no longer held: it was restored from a checkpoint older than
        those inserts (a crash). Found at the writer's next insert (``InsertResponse.writer_rows``)."""
        """Inserts a shard acknowledged as already stored (a retry whose first attempt was applied)."""
        self.priority_update_counts = {"updated": 0, "stale_generation": 0, "unknown": 0, "unavailable": 0}
        """Totals over this client's ``update_priorities`` calls: applied, ignored as another generation's,
        skipped as not live."""

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    def _channel_options(self):
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # A restarted shard should be found within ~a second, not after grpc's default 1-120 s backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            *(self.tls.options() if self.tls is not None else []),
        ]

    def _get_shards(self) -> list[_Shard]:
        shards = self._shards
        if shards is None:
            with self._lock:
                if self._shards is None:
                    options = self._channel_options()
                    credentials = self.tls.credentials() if self.tls is not None else None
                    self._shards = [_Shard(i, a, options, credentials) for i, a in enumerate(self.addresses)]
                    if len(self._shards) > 1:
                        # Persistent threads for concurrent per-shard calls (a gRPC future would start a
                        # thread per call on a synchronous channel).
                        self._pool = futures.ThreadPoolExecutor(max_workers=2 * len(self._shards),
                                                                thread_name_prefix="replay-client")
                shards = self._shards
        return shards

    def close(self) -> None:
        """Close the channels (a later call reopens them)."""
        with self._lock:
            shards, self._shards = self._shards, None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for shard in shards or ():
            shard.channel.close()

    def __enter__(self) -> ReplayClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls with retry ----------------------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else float(timeout)
        if not 0 <= t <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout={timeout} must be >= 0 and at most {MAX_TIMEOUT_S:g} seconds")
        return time.monotonic() + t

    def _error(self, shard: _Shard, e: grpc.RpcError, method: str) -> errors.ReplayError:
        code = e.code()
        details = e.details() or ""
        name = code.name if code is not None else "UNKNOWN"
        prefix = f"replay shard {shard.index} ({shard.address}) {method}"
        if name == "DEADLINE_EXCEEDED" and not details.strip():
            details = "no response before the call's deadline"
        if name == "RESOURCE_EXHAUSTED" and "message larger than max" in details:
            details += (f" (client max_message_bytes={self.max_message_bytes}; split the batch or raise the "
                        "limit on both client and server)")
        cls = _ERRORS_BY_CODE.get(name, errors.ReplayError)
        err = cls(f"{prefix}: {name}: {details}")
        if cls is errors.ReplayError:
            err.code = name
        return err

    @staticmethod
    def _retryable(e: grpc.RpcError, method: str) -> bool:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        if code == grpc.StatusCode.ABORTED and method == "Insert":
            return True   # another attempt of the same insert is still in progress on the shard
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
            return any(key == RETRY_METADATA_KEY for key, _ in trailers or ())
        return False

    def _call(self, shard: _Shard, method: str, make_request, deadline: float, *, rpc_margin_s: float = 5.0):
        """Call ``method`` on ``shard``; retry transient refusals (see the module docstring) with backoff
        until ``deadline``.

        ``make_request(remaining_s)`` builds the request (so that server-side waits use the time left);
        the gRPC deadline is ``remaining + rpc_margin_s`` so that the server's own, clearer
        DEADLINE_EXCEEDED arrives first.
        """
        delay = 0.05
        attempts = 0
        start = time.monotonic()
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            attempts += 1
            try:
                return getattr(shard.stub, method)(make_request(remaining), timeout=remaining + rpc_margin_s,
                                                   metadata=self._metadata)
            except grpc.RpcError as e:
                if not self._retryable(e, method):
                    raise self._error(shard, e, method) from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ShardUnavailable(
                        f"replay shard {shard.index} ({shard.address}) {method}: unavailable for "
                        f"{time.monotonic() - start:.1f} s over {attempts} attempts; last error: {e.details()}"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    def _note(self, shard: _Shard, size: int, mass: float) -> None:
        shard.size, shard.mass, shard.seen = int(size), float(mass), time.monotonic()

    # -- table metadata ------------------------------------------------------------------------------
    def _info_one(self, shard: _Shard, deadline: float) -> TableInfo:
        response = self._call(shard, "Info", lambda _r: replay_pb2.InfoRequest(), deadline)
        for t in response.tables:
            if t.name == self.table:
                if self._config is None:
                    self._config = TableConfig.from_json(json.loads(t.config_json))
                self._note(shard, t.size, t.priority_mass)
                return TableInfo(name=t.name, size=t.size, capacity=t.capacity, inserts=t.inserts,
                                 samples=t.samples, insert_blocked_s=t.insert_blocked_s,
                                 sample_blocked_s=t.sample_blocked_s, nbytes=t.nbytes,
                                 priority_mass=t.priority_mass, storage=t.storage, sampler=t.sampler,
                                 generation=t.generation, stale_generation_updates=t.stale_generation_updates,
                                 unknown_key_updates=t.unknown_key_updates, duplicate_inserts=t.duplicate_inserts,
                                 refused_inserts=t.refused_inserts, dropped_invalid_rows=t.dropped_invalid_rows)
        raise errors.NotFound(f"replay shard {shard.index} ({shard.address}) has no table {self.table!r}; "
                              f"it serves {sorted(t.name for t in response.tables)}")

    def info(self, *, timeout: float | None = None) -> list[TableInfo]:
        """This table's ``TableInfo`` on every shard, in shard order."""
        deadline = self._deadline(timeout)
        return self._each_shard(lambda shard: self._info_one(shard, deadline), self._get_shards())

    def _each_shard(self, fn, shards):
        """``[fn(shard) for shard in shards]``, concurrently when there are several; the first error is raised."""
        if len(shards) == 1 or self._pool is None:
            return [fn(shard) for shard in shards]
        pending = [self._pool.submit(fn, shard) for shard in shards]
        return [f.result() for f in pending]

    def config(self, *, timeout: float | None = None) -> TableConfig:
        """The table's configuration as the shards report it (fetched once)."""
        if self._config is None:
            self._info_one(self._get_shards()[0], self._deadline(timeout))
        return self._config

    # -- insert --------------------------------------------------------------------------------------
    def _writer(self, writer_key: str) -> tuple[str, threading.Lock]:
        with self._lock:
            writer = self._writers.get(writer_key)
            if writer is None:
                writer = self._writers[writer_key] = (f"{self._session}.{len(self._writers)}", threading.Lock())
            return writer

    def insert(self, columns: Mapping[str, np.ndarray], *, writer_key: str, priorities: np.ndarray | None = None,
               timeout: float | None = None) -> np.ndarray:
        """Insert a batch of rows (all-or-nothing, stored once) on ``writer_key``'s shard; return their
        global keys (for a repeat the shard acknowledged: the keys the rows were stored under)."""
        if not isinstance(writer_key, str):
            raise TypeError(f"writer_key={writer_key!r} must be a str")
        if len(writer_key) > MAX_WRITER_KEY_CHARS:
            raise errors.InvalidArgument(f"writer_key of {len(writer_key)} chars; expected at most "
                                         f"{MAX_WRITER_KEY_CHARS}")
        deadline = self._deadline(timeout)
        shard = self._get_shards()[shard_of_writer(writer_key, self.num_shards)]
        if self.share_frames and not any(isinstance(c, SharedFrames) for c in columns.values()):
            if self._config is None:
                # The writer's own shard (another one may be down); no such table: the Insert below says so.
                with contextlib.suppress(errors.NotFound):
                    self._info_one(shard, deadline)
            if self._config is not None and self._config.storage == "atari":
                # The shard keeps each distinct frame once anyway: send each once too (~4x fewer bytes).
                # Columns that are not the stacks the table expects go as they are: the shard says what is wrong.
                with contextlib.suppress(ValueError):
                    columns = share_frames(columns, names=STACK_FIELDS)
        nbytes = payload_nbytes(columns) + (0 if priorities is None else np.asarray(priorities).nbytes)
        if nbytes + _REQUEST_OVERHEAD > self.max_message_bytes:
            raise errors.ResourceExhausted(
                f"insert of {nbytes} bytes (+{_REQUEST_OVERHEAD} framing) exceeds the {self.max_message_bytes}-byte "
                f"message limit; insert in smaller batches"
            )
        writer_id, writer_lock = self._writer(writer_key)
        # One insert per writer at a time, so that sequence numbers reach the shard in order.
        if not writer_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise errors.DeadlineExceeded(f"insert of writer {writer_key!r}: another insert of the same writer "
                                          "kept this client busy for the whole timeout")
        try:
            sequence = self._sequences.get(writer_key, 0) + 1
            self._sequences[writer_key] = sequence
            request = InsertRequestParts(table=self.table, writer_key=writer_key, columns=columns,
                                         priorities=None if priorities is None else np.asarray(priorities),
                                         writer_id=writer_id, sequence=sequence)
            response = self._call(shard, "Insert", request.to_bytes, deadline)
            # A duplicate acknowledges the first attempt, whose response was lost: the rows count either way.
            rows = len(next(iter(columns.values()))) if columns else 0
            acked = self._acked_rows.get(writer_key, 0) + rows
            if response.writer_rows >= 0:
                # The shard's total for this writer (kept in its checkpoints) against what it acknowledged
                # to us: fewer means acknowledged rows went with a crash. Either way, go on from its count.
                lost = acked - int(response.writer_rows)
                if lost > 0:
                    with self._lock:
                        self.lost_rows += lost
                acked = int(response.writer_rows)
            self._acked_rows[writer_key] = acked
        finally:
            writer_lock.release()
        if response.duplicate:
            with self._lock:
                self.duplicate_inserts += 1
        self._note(shard, response.table_size, response.priority_mass)
        return global_keys(decode_array(response.keys, name="keys"), shard.index)

    # -- sample --------------------------------------------------------------------------------------
    def _mark_down(self, shard: _Shard) -> None:
        shard.down_until = time.monotonic() + max(self.refresh_interval_s, 0.5)

    def _weights(self, shards: list[_Shard], config: TableConfig, deadline: float) -> np.ndarray:
        now = time.monotonic()
        stale = [s for s in shards if now - s.seen > self.refresh_interval_s and s.down_until <= now]

        def probe(shard: _Shard) -> None:
            # A short look: a shard that is down (restarting) must not hold up sampling from the others.
            try:
                self._info_one(shard, min(deadline, time.monotonic() + PROBE_TIMEOUT_S))
            except ShardUnavailable:
                self._mark_down(shard)

        if stale:
            self._each_shard(probe, stale)
        prioritized = config.sampler == "prioritized"
        now = time.monotonic()
        return np.array([
            (s.mass if prioritized else s.size) if s.size >= max(1, config.min_size_to_sample) and s.down_until <= now
            else 0.0
            for s in shards
        ])

    def sample(self, batch_size: int, *, beta: float = 0.4, timeout: float | None = None) -> SampleBatch:
        """Sample ``batch_size`` rows across shards (see the module docstring for the split and weights).

        While no shard holds enough items to sample, waits (polling Info with backoff) until the timeout,
        then raises ``DeadlineExceeded``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size={batch_size!r} must be an int")
        batch_size = int(batch_size)
        if batch_size < 1:
            raise errors.InvalidArgument(f"batch_size={batch_size} must be >= 1")
        deadline = self._deadline(timeout)
        shards = self._get_shards()
        config = self.config(timeout=max(0.0, deadline - time.monotonic()))
        weights = self._weights(shards, config, deadline)
        delay = 0.05
        while not weights.sum() > 0:
            if time.monotonic() >= deadline:
                raise errors.DeadlineExceeded(
                    f"table {self.table!r}: no shard has min_size_to_sample={config.min_size_to_sample} items "
                    f"(sizes {[s.size for s in shards]}"
                    + "".join(f", shard {s.index} unreachable" for s in shards if s.down_until > time.monotonic())
                    + ") after waiting for the call's timeout"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
            for s in shards:
                s.seen = -math.inf
                s.down_until = min(s.down_until, time.monotonic() + 0.5)
            weights = self._weights(shards, config, deadline)
        shares = weights / weights.sum()
        with self._lock:
            u = self._rng.random()
        counts = allocate(batch_size, weights, u=u)
        row_nbytes = config.schema.row_nbytes() + _RESPONSE_OVERHEAD_PER_ROW
        for s, n in zip(shards, counts, strict=True):
            if n * row_nbytes + _REQUEST_OVERHEAD > self.max_message_bytes:
                raise errors.ResourceExhausted(
                    f"sample of {n} rows x {row_nbytes} bytes = {n * row_nbytes} bytes from shard {s.index} "
                    f"exceeds the {self.max_message_bytes}-byte message limit; sample smaller batches"
                )
        chosen = [(s, int(n)) for s, n in zip(shards, counts, strict=True) if n > 0]
        shard_rows = {s.index: n for s, n in chosen}

        def request(n):
            return lambda remaining: replay_pb2.SampleRequest(table=self.table, batch_size=n, timeout_s=remaining)

        def sample_one(shard: _Shard):
            try:
                return self._call(shard, "Sample", request(shard_rows[shard.index]), deadline)
            except ShardUnavailable:
                self._mark_down(shard)   # the next call samples the shards that are up
                raise

        responses = self._each_shard(sample_one, [s for s, _ in chosen])
        return self._assemble(chosen, responses, shares, config, beta)

    def _assemble(self, chosen, responses, shares, config: TableConfig, beta: float) -> SampleBatch:
        total = sum(n for _, n in chosen)
        columns = {f.name: np.empty((total, *f.shape), dtype=np.dtype(f.dtype)) for f in config.schema.fields}
        keys = np.empty(total, dtype=np.uint64)
        probabilities = np.empty(total, dtype=np.float64)
        row = 0
        for (s, n), response in zip(chosen, responses, strict=True):
            self._note(s, response.table_size, response.priority_mass)
            end = row + n
            if response.columns.keys() != columns.keys():
                raise errors.ReplayError(f"replay shard {s.index} ({s.address}) returned columns "
                                         f"{sorted(response.columns)}; expected {sorted(columns)}")
            for name, array in response.columns.items():
                columns[name][row:end] = array
            keys[row:end] = global_keys(response.keys, s.index)
            probabilities[row:end] = shares[s.index] * response.probabilities
            row = end
        size = sum(s.size for s in self._get_shards())
        # A shard's share times its own probability can underflow for masses far apart; the smallest
        # normal float keeps the weight finite (it is then the batch's largest, so it normalizes to 1).
        weights = importance_weights(probabilities=np.maximum(probabilities, np.finfo(np.float64).tiny),
                                     size=max(size, 1), beta=beta)
        return SampleBatch(keys=keys, columns=columns, probabilities=probabilities, weights=weights,
                           table=self.table)

    # -- priorities and checkpoints ------------------------------------------------------------------
    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray, *, table: str | None = None,
                          timeout: float | None = PRIORITY_TIMEOUT_S) -> int:
        """Send each (global key, priority) to its owning shard; return how many items were updated.

        Keys of another generation (issued before the shard last started) and keys no longer live are
        skipped by the shards; ``priority_update_counts`` adds up all three outcomes. ``table`` (a
        batch's ``SampleBatch.table``) must be this client's table: keys of another table would land
        on whatever item of this table has the same number."""
        if table is not None and table != self.table:
            raise ValueError(f"priority updates for table {table!r} sent to the client of table {self.table!r}")
        result = self.update_priorities_result(keys, priorities, timeout=timeout)
        return result["updated"]

    def update_priorities_result(self, keys: np.ndarray, priorities: np.ndarray, *,
                                 timeout: float | None = None) -> dict[str, int]:
        """:meth:`update_priorities`, returning ``{"updated", "stale_generation", "unknown", "unavailable"}`` of
        this call. Keys of a shard that is unreachable (restarting) are dropped and counted as unavailable:
        after its restore they would be another generation's anyway."""
        keys = np.asarray(keys)
        priorities = np.asarray(priorities)
        if keys.ndim != 1 or priorities.shape != keys.shape:
            raise errors.InvalidArgument(
                f"keys shape {keys.shape} and priorities shape {priorities.shape} must be equal and 1-D")
        if keys.dtype != np.uint64:
            raise errors.InvalidArgument(f"keys dtype {keys.dtype} must be uint64 (the keys sample() returned)")
        shard_index, local = split_keys(keys)
        shards = self._get_shards()
        if shard_index.size and int(shard_index.max()) >= len(shards):
            raise errors.InvalidArgument(
                f"key {int(keys[int(np.argmax(shard_index))])} names shard {int(shard_index.max())} but this client "
                f"has {len(shards)} shards")
        deadline = self._deadline(timeout)
        targets = [s for s in shards if np.any(shard_index == s.index)]

        def send(shard: _Shard) -> tuple[int, int, int, int]:
            mask = shard_index == shard.index
            if shard.down_until > time.monotonic():
                return 0, 0, 0, int(mask.sum())
            request = replay_pb2.UpdatePrioritiesRequest(table=self.table)
            encode_array(local[mask], name="keys", out=request.keys)
            encode_array(priorities[mask], name="priorities", out=request.priorities)
            try:
                response = self._call(shard, "UpdatePriorities", lambda _r: request, deadline)
            except ShardUnavailable:
                self._mark_down(shard)
                return 0, 0, 0, int(mask.sum())
            self._note(shard, response.table_size, response.priority_mass)
            return int(response.updated), int(response.stale_generation), int(response.unknown), 0

        totals = np.sum(self._each_shard(send, targets), axis=0) if targets else np.zeros(4, np.int64)
        result = dict(zip(("updated", "stale_generation", "unknown", "unavailable"), (int(t) for t in totals),
                          strict=True))
        with self._lock:
            for k, v in result.items():
                self.priority_update_counts[k] += v
        return result

    def checkpoint(self, *, timeout: float | None = None) -> list[str]:
        """Ask every shard to checkpoint; return the directories written, in shard order."""
        deadline = self._deadline(timeout)
        return self._each_shard(
            lambda s: self._call(s, "Checkpoint", lambda _r: replay_pb2.CheckpointRequest(), deadline).path,
            self._get_shards())

    def clear(self, *, timeout: float | None = None) -> int:
        """Empty this table on every shard (``Table.clear``: the items go, the rate limiter starts over);
        returns the items removed in all. A continual scenario's ``replay_at_switch: "flush"``."""
        deadline = self._deadline(timeout)
        request = replay_pb2.ClearRequest(table=self.table)
        removed = self._each_shard(lambda s: int(self._call(s, "Clear", lambda _r: request, deadline).removed),
                                   self._get_shards())
        for shard in self._get_shards():
            self._note(shard, 0, 0.0)
        return int(sum(removed))

    def release_inserts(self, released: bool = True, *, timeout: float | None = None) -> list[str]:
        """Let this table's inserts stop waiting for samples on every shard (``released=True``: the learner
        left the table), or tie them to samples again with a rebased band (``False``: it came back);
        returns each shard's limiter counts after it. See ``RateLimiter.release_inserts``."""
        deadline = self._deadline(timeout)
        request = replay_pb2.ReleaseInsertsRequest(table=self.table, released=bool(released))
        return self._each_shard(lambda s: self._call(s, "ReleaseInserts", lambda _r: request, deadline).limiter,
                                self._get_shards())

    def rebase_rate_limiter(self, *, timeout: float | None = None) -> list[str]:
        """Re-centre this table's rate-limiter band on every shard (``RateLimiter.rebase``), so that after
        a resume neither the actors' inserts nor the learner's samples stay blocked; returns each shard's
        limiter counts after it. Call it once the learner restored and before the actors start."""
        deadline = self._deadline(timeout)
        request = replay_pb2.RebaseRateLimiterRequest(table=self.table)
        return self._each_shard(
            lambda s: "; ".join(self._call(s, "RebaseRateLimiter", lambda _r: request, deadline).limiters),
            self._get_shards())
