"""A replay table: storage + sampler + rate limiter under one lock.

Example::

    import numpy as np
    from replay.schema import Schema
    from replay.table import Table, TableConfig

    table = Table(TableConfig(name="replay", schema=Schema.parse("obs:float32:4,reward:float32"), capacity=1000))
    keys = table.insert({"obs": np.zeros((8, 4), np.float32), "reward": np.ones(8, np.float32)})
    batch = table.sample(4)                 # SampleResult: keys, columns, probabilities, table_size, priority_mass
    table.update_priorities(batch.keys, np.ones(4))     # PriorityUpdateResult(updated=4, ...)
    meta, arrays = table.state_dict()       # json-able metadata + named arrays; load_state_dict restores exactly
    table.start_generation(1)               # what a shard does after restoring: keys of generation 0 go stale

    # An insert with a writer id and sequence number is stored once, however often it is retried:
    first = table.write(rows, writer="actor-3.a1b2", sequence=1)     # InsertResult(keys, duplicate=False)
    again = table.write(rows, writer="actor-3.a1b2", sequence=1)     # duplicate=True, same keys, not stored

    TableConfig.parse("name=replay,capacity=100000,sampler=prioritized,min_size=100,spi=8,"
                      "schema=obs:float32:4;action:int64::0..1;reward:float32::finite")

Keys. Items are numbered by insert index, and live items are always the contiguous index range
``[oldest, next_index)``: indices are never reused and items only ever leave oldest-first (ring
overwrite, Atari frame-pool eviction, FIFO consumption). The keys the table hands out carry its
``generation`` above the index (layout in :mod:`replay.keys`); a priority update for a key of another
generation is ignored and counted (``TableInfo.stale_generation_updates``), because after a restore the
same index names a different row. Keys with bits the table never sets (forged) and keys no longer live
are skipped and counted too (``unknown_key_updates``).

Inserts are all-or-nothing: the batch (including the fields' value bounds), its priorities and the
storage's own checks are validated before the table is touched. Batch validation and the Atari frame
hashing run outside the lock; limiter waits, writes and sample gathers run under it.

Idempotent inserts. :meth:`Table.write` with ``writer`` and ``sequence`` (>= 1, increasing per writer)
remembers the last sequence of the most recent ``MAX_WRITERS`` writers (checkpointed with the rows): a
repeat of the last sequence is acknowledged with the keys it was stored under, an older one with no
keys, and neither is stored again nor counted by the rate limiter. While one insert of a writer waits
in the rate limiter, another insert of the same writer is refused with ``Aborted`` (retry later), so a
retry that overtakes its original cannot be stored next to it.

A FIFO table blocks inserts while ``capacity`` unsampled items are waiting, so the ring never overwrites
an unread item: its sampler consumes what it samples, so :func:`make_rate_limiter` gives it a
:class:`~replay.rate_limiter.QueueRateLimiter`. (With the Atari storage the frame pool can still evict
the oldest unread items if the stream needs more than ``frame_capacity`` distinct frames for ``capacity``
transitions, e.g. very short episodes; the pool has ``capacity // 16`` frames of slack for this.)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replay.errors import Aborted, FailedPrecondition, InvalidArgument
from replay.interfaces import Sampler
from replay.keys import MAX_INDEX, TABLE_KEY_BITS, key_generation, key_index, table_key
from replay.limits import MAX_NAME_CHARS, MAX_WRITER_KEY_CHARS, clip
from replay.rate_limiter import QueueRateLimiter, RateLimiter, WaitGuard
from replay.samplers import SAMPLERS, make_sampler, validate_priorities
from replay.schema import Schema
from replay.storage import STORAGES, check_atari_schema, make_storage

__all__ = [
    "MAX_WRITERS",
    "InsertResult",
    "PriorityUpdateResult",
    "SampleResult",
    "Table",
    "TableConfig",
    "TableInfo",
    "TableSnapshot",
    "make_rate_limiter",
]

_STATE_VERSION = 1
_TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
MAX_WRITERS = 4096
"""Writers whose last insert sequence a table remembers (least recently used forgotten first)."""


@dataclass(frozen=True)
class TableConfig:
    """Everything that defines a table."""

    name: str
    """Table name, unique within a shard (letters, digits, ``_ . -``)."""
    schema: Schema
    """Declared fields; every insert must match it exactly."""
    capacity: int
    """Maximum number of items held; the oldest are overwritten beyond it (FIFO: inserts block instead)."""
    storage: str = "ring"
    """``ring`` or ``atari`` (fields obs and next_obs of shape (stack, H, W) uint8 are frame-deduplicated)."""
    sampler: str = "uniform"
    """``uniform`` | ``prioritized`` | ``fifo``."""
    priority_exponent: float = 0.6
    """alpha: prioritized sampling probability is proportional to priority**alpha."""
    min_size_to_sample: int = 1
    """Samples block until the table holds at least this many items."""
    samples_per_insert: float | None = None
    """Target ratio of sampled rows to inserted rows; None disables ratio limiting."""
    error_buffer: float = 100.0
    """Allowed deviation, in sampled rows, from the target ratio on either side (Reverb SampleToInsertRatio)."""
    seed: int = 0
    """Seed of the table's sampling RNG (its state is checkpointed)."""

    def validate(self) -> None:
        """ValueError naming the first bad value; refuses configs that can deadlock or never sample."""
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_CHARS or not _TABLE_NAME_RE.match(self.name):
            raise ValueError(
                f"table name {self.name!r}: expected a non-empty name of letters, digits, '_', '.', '-'"
            )
        if not isinstance(self.schema, Schema):
            raise ValueError(f"table {self.name!r}: schema {self.schema!r} is not a replay.schema.Schema")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"table {self.name!r}: capacity {self.capacity!r}; expected an int >= 1")
        if self.storage not in STORAGES:
            raise ValueError(
                f"table {self.name!r}: storage {self.storage!r}; expected one of {list(STORAGES)}"
            )
        if self.storage == "atari":
            check_atari_schema(self.schema)
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"table {self.name!r}: sampler {self.sampler!r}; expected one of {list(SAMPLERS)}"
            )
        a = self.priority_exponent
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ValueError(f"table {self.name!r}: priority_exponent {a!r}; expected a finite number >= 0")
        RateLimiter.validate_config(
            min_size_to_sample=self.min_size_to_sample,
            samples_per_insert=self.samples_per_insert,
            error_buffer=self.error_buffer,
        )
        if self.sampler == "fifo" and self.samples_per_insert not in (None, 1, 1.0):
            # FIFO hands each item out once, so over time samples == inserts: any other target ratio drifts
            # until both sides block for good (queue full for inserts, ratio band for samples).
            raise ValueError(
                f"table {self.name!r}: samples_per_insert {self.samples_per_insert!r} with sampler 'fifo' would "
                "deadlock (a queue samples each item exactly once); expected None or 1"
            )
        if self.min_size_to_sample > self.capacity:
            raise ValueError(
                f"table {self.name!r}: min_size_to_sample {self.min_size_to_sample} > capacity {self.capacity}; "
                "the table could never be sampled"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"table {self.name!r}: seed {self.seed!r}; expected an int >= 0")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "schema": self.schema.to_json(),
            "capacity": self.capacity,
            "storage": self.storage,
            "sampler": self.sampler,
            "priority_exponent": self.priority_exponent,
            "min_size_to_sample": self.min_size_to_sample,
            "samples_per_insert": self.samples_per_insert,
            "error_buffer": self.error_buffer,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"table config json must be a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"table config json has unknown keys {unknown}; expected a subset of {sorted(known)}"
            )
        for required in ("name", "schema", "capacity"):
            if required not in d:
                raise ValueError(f"table config json is missing {required!r}")
        kwargs = dict(d)
        kwargs["schema"] = Schema.from_json(d["schema"])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    _ALIASES = {
        "min_size": "min_size_to_sample",
        "spi": "samples_per_insert",
        "alpha": "priority_exponent",
    }

    @classmethod
    def parse(cls, spec: str) -> TableConfig:
        """Parse ``"name=replay,capacity=100000,sampler=prioritized,storage=ring,min_size=100,spi=8,
        schema=obs:float32:4;action:int64;reward:float32"`` (aliases: min_size, spi, alpha; spi=none)."""
        if not isinstance(spec, str) or "=" not in spec:
            raise ValueError(f"table spec {spec!r}: expected 'name=...,capacity=...,schema=...'")
        raw: dict[str, str] = {}
        last = None
        for part in spec.split(","):
            if "=" not in part:
                # Schema fields may also be separated by ',' when schema= comes last.
                if last == "schema" and part.strip():
                    raw["schema"] += ";" + part.strip()
                    continue
                raise ValueError(f"table spec item {part!r}: expected key=value")
            k, v = part.split("=", 1)
            k = cls._ALIASES.get(k.strip(), k.strip())
            if k not in cls.__dataclass_fields__:
                raise ValueError(
                    f"table spec key {k!r}: expected one of {sorted(cls.__dataclass_fields__)} "
                    f"(aliases {sorted(cls._ALIASES)})"
                )
            if k in raw:
                raise ValueError(f"table spec key {k!r} given twice")
            raw[k], last = v.strip(), k
        for required in ("name", "schema", "capacity"):
            if required not in raw:
                raise ValueError(f"table spec {spec!r} is missing {required}=")
        kwargs: dict[str, Any] = {"name": raw["name"], "schema": Schema.parse(raw["schema"])}
        try:
            for k in ("capacity", "min_size_to_sample", "seed"):
                if k in raw:
                    kwargs[k] = int(raw[k])
            for k in ("priority_exponent", "error_buffer"):
                if k in raw:
                    kwargs[k] = float(raw[k])
            if "samples_per_insert" in raw:
                v = raw["samples_per_insert"]
                kwargs["samples_per_insert"] = None if v.lower() in ("none", "") else float(v)
        except ValueError as err:
            raise ValueError(f"table spec {spec!r}: {err}") from err
        for k in ("storage", "sampler"):
            if k in raw:
                kwargs[k] = raw[k]
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg


@dataclass
class SampleResult:
    keys: np.ndarray
    """uint64 table keys (generation and insert index, see :mod:`replay.keys`)."""
    columns: dict[str, np.ndarray]
    """Each ``[batch, *field.shape]`` in the field's dtype, contiguous."""
    probabilities: np.ndarray
    """float64 probability of drawing each item under the table's sampler at sample time."""
    table_size: int
    priority_mass: float
    """Sum of p**alpha over items (prioritized) or the table size (uniform/fifo)."""


@dataclass
class TableInfo:
    name: str
    size: int
    capacity: int
    inserts: int
    samples: int
    insert_blocked_s: float
    sample_blocked_s: float
    nbytes: int
    """Bytes held by the table's arrays: storage (fields, Atari frame pool and indices) plus sampler (sum tree)."""
    priority_mass: float
    storage: str
    sampler: str
    extra: dict = field(default_factory=dict)
    """Storage-specific numbers (Atari: frames_in_use, frame_capacity, dedup_entries), oldest/next index."""
    generation: int = 0
    """The generation in this table's keys (a shard starts a new one every time it starts)."""
    stale_generation_updates: int = 0
    """Priority updates ignored because their key is of another generation (since the process started)."""
    unknown_key_updates: int = 0
    """Priority updates skipped because their key is not live (evicted, never issued, forged)."""
    duplicate_inserts: int = 0
    """Inserts acknowledged as repeats of an earlier (writer, sequence) and not stored again."""
    refused_inserts: int = 0
    """Inserts refused as invalid (schema, bounds, priorities)."""
    dropped_invalid_rows: int = 0
    """Rows removed by :meth:`Table.drop_invalid_rows` (restored rows outside the schema's bounds)."""


@dataclass
class InsertResult:
    keys: np.ndarray
    """uint64 table keys of the rows (for a duplicate: the keys the original was stored under, or none)."""
    duplicate: bool = False
    """True if the (writer, sequence) was stored before and this call stored nothing."""
    writer_rows: int = -1
    """Rows of this writer the table holds a record of, in total, after the call (-1: no writer given,
    or a checkpoint too old to say). A client that was acknowledged more rows than this lost the
    difference: a shard restored from a checkpoint older than its last acknowledged inserts."""


@dataclass
class PriorityUpdateResult:
    updated: int
    """Keys of this generation still live, whose priorities were set."""
    stale_generation: int = 0
    """Keys of another generation: ignored (the index may name another row now)."""
    unknown: int = 0
    """Keys of this generation that are not live (evicted or never issued), or with bits a table never sets."""


class TableSnapshot:
    """A table's state as of :meth:`Table.snapshot`, for a checkpoint written while the table serves.

    ``live`` arrays are the storage's own (large) arrays: write them to disk first, outside the table
    lock, while inserts and samples go on. Then :meth:`finish` (a moment under the lock) drops from the
    state every item that a commit overwrote meanwhile (its rows in the live arrays may hold newer
    data) and returns ``(meta, arrays)``: the metadata and the small arrays copied at the snapshot. The
    checkpoint is then exactly the table as it was at the snapshot, minus those oldest items.

    Example::

        snap = table.snapshot()
        for name, array in snap.live.items():
            write(name, array)                 # the table keeps serving
        meta, arrays = snap.finish()
        for name, array in arrays.items():
            write(name, array)
    """

    def __init__(self, table: Table, meta: dict, arrays: dict[str, np.ndarray], live: dict[str, np.ndarray],
                 *, storage: Any):
        self._table, self._storage = table, storage
        self.meta, self.arrays, self.live = meta, arrays, live
        self.dropped = 0
        """Items dropped by :meth:`finish` because they were overwritten during the write."""

    def finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, arrays = dict(self.meta), dict(self.arrays)
        oldest, end = int(meta["oldest_key"]), int(meta["next_key"])
        keep_from = max(oldest, min(self._table._overwritten_since(self._storage), end))
        if keep_from > oldest:
            # Remove the overwritten items from a copy of the sampler's state, through the Sampler interface.
            config = self._table.config
            sampler = make_sampler(config.sampler, capacity=config.capacity, priority_exponent=config.priority_exponent)
            sampler.load_state_dict(meta["sampler"], {k[8:]: v for k, v in arrays.items() if k.startswith("sampler/")})
            sampler.on_remove(first_key=oldest, end_key=keep_from)
            sa_meta, sa_arrays = sampler.state_dict()
            meta["sampler"] = sa_meta
            arrays = {k: v for k, v in arrays.items() if not k.startswith("sampler/")}
            arrays.update({f"sampler/{k}": v for k, v in sa_arrays.items()})
            meta["oldest_key"] = keep_from
            self.dropped = keep_from - oldest
        return meta, arrays


def make_rate_limiter(config: TableConfig, sampler: Sampler) -> RateLimiter:
    """The limiter of a table: a queue limiter when the sampler consumes what it samples (FIFO), so that
    inserts wait instead of overwriting unread items; otherwise the samples-per-insert limiter."""
    ratio = dict(
        min_size_to_sample=config.min_size_to_sample,
        samples_per_insert=config.samples_per_insert,
        error_buffer=config.error_buffer,
    )
    if sampler.consumes:
        return QueueRateLimiter(capacity=config.capacity, **ratio)
    return RateLimiter(**ratio)


def _check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
            or not math.isfinite(timeout)):
        raise InvalidArgument(f"timeout {clip(timeout)}: expected None (block forever) or finite seconds >= 0")


class Table:
    """Thread-safe replay table (see module docstring)."""

    def __init__(self, config: TableConfig, *, generation: int = 0) -> None:
        config.validate()
        self.config = config
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._build()
        self.generation = 0
        self.start_generation(generation)
        # Counters of this process (not checkpointed): Prometheus counters restart with the process.
        self._stale_generation_updates = 0
        self._unknown_key_updates = 0
        self._duplicate_inserts = 0
        self._refused_inserts = 0
        self._dropped_invalid_rows = 0

    def _build(self) -> None:
        c = self.config
        self._storage = make_storage(c.storage, schema=c.schema, capacity=c.capacity)
        self._sampler = make_sampler(c.sampler, capacity=c.capacity, priority_exponent=c.priority_exponent)
        self._limiter = make_rate_limiter(c, self._sampler)
        self._rng = np.random.default_rng(c.seed)
        self._next_key = 0
        self._oldest = 0
        # Every index below this was overwritten by a commit (its rows in the storage may hold newer data).
        self._overwritten_before = 0
        # writer id -> (last sequence, first index, rows, generation) of its last stored insert, and the
        # writer's rows stored in total (-1: unknown, restored from a checkpoint that did not record it)
        self._writers: OrderedDict[str, tuple[int, int, int, int, int]] = OrderedDict()
        self._inflight: set[str] = set()

    @property
    def _size(self) -> int:
        return self._next_key - self._oldest

    def start_generation(self, generation: int) -> None:
        """Hand out keys of ``generation`` from now on (see the module docstring); it must not decrease."""
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < self.generation:
            raise ValueError(f"generation {generation!r}: expected an int >= the current {self.generation}")
        with self._cond:
            self.generation = generation

    # ------------------------------------------------------------------ insert
    def insert(
        self,
        columns: Mapping[str, np.ndarray],
        *,
        priorities: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Insert a batch (all-or-nothing) and return its uint64 keys; blocks per the rate limiter."""
        return self.write(columns, priorities=priorities, timeout=timeout).keys

    def write(
        self,
        columns: Mapping[str, np.ndarray],
        *,
        priorities: np.ndarray | None = None,
        timeout: float | None = None,
        writer: str = "",
        sequence: int = 0,
        guard: WaitGuard | None = None,
    ) -> InsertResult:
        """:meth:`insert`, stored at most once per (``writer``, ``sequence``) when a writer is given, with
        the blocked wait bounded by ``guard`` (see the module docstring and ``RateLimiter.wait``)."""
        try:
            n = self.config.schema.validate_batch(columns)
            pr = None if priorities is None else validate_priorities(
                priorities, n=n, exponent=self.config.priority_exponent)
            _check_timeout(timeout)
            if writer:
                if not isinstance(writer, str) or len(writer) > MAX_WRITER_KEY_CHARS:
                    raise InvalidArgument(f"writer id {clip(writer)}: expected at most {MAX_WRITER_KEY_CHARS} chars")
                if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
                    raise InvalidArgument(f"sequence {clip(sequence)}: expected an int >= 1 with a writer id")
            # prepare() reads only config-derived attributes, so its result stays valid even if
            # load_state_dict rebuilds the storage while this call waits for the lock.
            prepared = self._storage.prepare(columns, n=n)
        except InvalidArgument:
            with self._cond:
                self._refused_inserts += 1
            raise
        with self._cond:
            if writer:
                last = self._writers.get(writer)
                if last is not None and sequence <= last[0]:
                    self._duplicate_inserts += 1
                    self._writers.move_to_end(writer)
                    if sequence == last[0]:
                        keys = table_key(index=np.arange(last[1], last[1] + last[2], dtype=np.uint64),
                                         generation=last[3])
                    else:
                        keys = np.zeros(0, np.uint64)
                    return InsertResult(keys=keys, duplicate=True, writer_rows=last[4])
                if writer in self._inflight:
                    raise Aborted(f"an insert of writer {clip(writer)} is already waiting in the rate limiter; "
                                  "retry once it finished")
                self._inflight.add(writer)
            try:
                if self._next_key + n > MAX_INDEX + 1:
                    raise FailedPrecondition(
                        f"table {self.config.name!r} has issued {self._next_key} keys; {n} more would pass the "
                        f"2**40 indices a key can hold")
                # Lambdas read self._limiter each time: load_state_dict may swap it while this call waits.
                self._limiter.wait(
                    self._cond,
                    side="insert",
                    rows=n,
                    ready=lambda: self._limiter.can_insert(n, size=self._size),
                    never=lambda: self._limiter.insert_never_possible(n, size=self._size),
                    closed=lambda: self._closed,
                    describe=lambda: self._limiter.describe(size=self._size),
                    timeout=timeout,
                    guard=guard,
                )
                first = self._next_key
                evict_before = self._storage.commit(prepared, first_key=first)
                self._overwritten_before = max(self._overwritten_before, evict_before)
                new_oldest = max(self._oldest, min(evict_before, first))
                if new_oldest > self._oldest:
                    self._sampler.on_remove(first_key=self._oldest, end_key=new_oldest)
                    self._oldest = new_oldest
                self._sampler.on_insert(first_key=first, n=n, priorities=pr)
                self._next_key = first + n
                self._limiter.record_insert(n)
                writer_rows = -1
                if writer:
                    before = self._writers.get(writer)
                    total = 0 if before is None else before[4]
                    writer_rows = total + n if total >= 0 else -1
                    self._writers[writer] = (sequence, first, n, self.generation, writer_rows)
                    self._writers.move_to_end(writer)
                    while len(self._writers) > MAX_WRITERS:
                        self._writers.popitem(last=False)
                start = table_key(index=first, generation=self.generation)
                self._cond.notify_all()
            finally:
                if writer:
                    self._inflight.discard(writer)
        # The generation bits sit above every index, so the keys are one contiguous range.
        return InsertResult(keys=np.arange(start, start + n, dtype=np.uint64), writer_rows=writer_rows)

    # ------------------------------------------------------------------ sample
    def sample(self, batch_size: int, *, timeout: float | None = None,
               guard: WaitGuard | None = None) -> SampleResult:
        """Sample ``batch_size`` items (with replacement; FIFO: the oldest unread, each once)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidArgument(f"batch_size {batch_size!r}: expected an int >= 1")
        b = int(batch_size)
        if b > self.config.capacity:
            raise InvalidArgument(
                f"batch_size {b} exceeds table {self.config.name!r} capacity {self.config.capacity}"
            )
        _check_timeout(timeout)
        with self._cond:
            self._limiter.wait(
                self._cond,
                side="sample",
                rows=b,
                ready=lambda: self._limiter.can_sample(b, size=self._size),
                never=lambda: self._limiter.sample_never_possible(b, size=self._size),
                closed=lambda: self._closed,
                describe=lambda: self._limiter.describe(size=self._size),
                timeout=timeout,
                guard=guard,
            )
            size = self._size
            index, probs = self._sampler.sample(batch_size=b, oldest=self._oldest, size=size, rng=self._rng)
            cols = self._storage.gather(index)
            mass = self._sampler.mass(size=size)
            self._limiter.record_sample(b)
            if self._sampler.consumes:  # sampled items leave the table (FIFO)
                self._sampler.on_remove(first_key=self._oldest, end_key=self._oldest + b)
                self._oldest += b
            keys = index if self.generation % 256 == 0 else table_key(index=index, generation=self.generation)
            self._cond.notify_all()
        return SampleResult(keys=keys, columns=cols, probabilities=probs, table_size=size, priority_mass=mass)

    # ------------------------------------------------------------------ priorities
    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> PriorityUpdateResult:
        """Set priorities of live items of this generation; the others are skipped and counted."""
        k = np.asarray(keys)
        if k.ndim != 1 or (k.size and k.dtype.kind not in "iu"):
            raise InvalidArgument(f"keys have shape {k.shape} dtype {k.dtype}; expected a 1-D uint64 array")
        if k.dtype.kind == "i" and k.size and k.min() < 0:
            raise InvalidArgument(f"key {int(k.min())} is negative; expected uint64 item keys")
        pr = validate_priorities(priorities, n=k.shape[0], exponent=self.config.priority_exponent)
        k = k.astype(np.uint64, copy=False)
        forged = (k >> np.uint64(TABLE_KEY_BITS)) != 0
        with self._cond:
            other = ~forged & (key_generation(k) != self.generation % 256)
            mine = ~(forged | other)
            index = key_index(k[mine])
            updated = self._sampler.update(keys=index, priorities=pr[mine], oldest=self._oldest, end=self._next_key)
            stale = int(other.sum())
            unknown = int(mine.sum()) - updated + int(forged.sum())
            self._stale_generation_updates += stale
            self._unknown_key_updates += unknown
        return PriorityUpdateResult(updated=updated, stale_generation=stale, unknown=unknown)

    # ------------------------------------------------------------------ rate limiter
    def rebase_rate_limiter(self) -> str:
        """Re-centre the rate limiter's band (``RateLimiter.rebase``); wakes blocked callers; returns the
        limiter's counts after it."""
        with self._cond:
            self._limiter.rebase()
            self._cond.notify_all()
            return self._limiter.describe(size=self._size)

    def release_inserts(self, released: bool = True) -> str:
        """Let inserts stop waiting for samples, or tie them to samples again (``RateLimiter.release_inserts``):
        for a table its sampler has left, e.g. an old task's per-task table. Wakes blocked callers;
        returns the limiter's counts after it. ValueError for a queue table."""
        with self._cond:
            self._limiter.release_inserts(released)
            self._cond.notify_all()
            return self._limiter.describe(size=self._size)

    def clear(self) -> int:
        """Remove every item (a scenario's replay flush at a task switch); returns how many were removed.

        Keys are never reused, so a priority update for a removed item is skipped as unknown, and the
        rate limiter starts over as a fresh one (``RateLimiter.restart``): sampling waits until
        ``min_size_to_sample`` new items arrived. The storage's arrays are kept and overwritten by
        later inserts; writer sequences are kept too (a retried insert is still stored once).
        """
        with self._cond:
            removed = self._size
            if removed:
                self._sampler.on_remove(first_key=self._oldest, end_key=self._next_key)
                self._oldest = self._next_key
            self._limiter.restart()
            self._cond.notify_all()
            return removed

    # ------------------------------------------------------------------ info
    def info(self) -> TableInfo:
        with self._cond:
            st = self._storage
            extra: dict[str, Any] = {"oldest_key": self._oldest, "next_key": self._next_key}
            if st.kind == "atari":
                extra.update(
                    frames_in_use=st.frames_in_use(),
                    frame_capacity=st.frame_capacity,
                    dedup_entries=st.dedup_entries,
                )
            return TableInfo(
                name=self.config.name,
                size=self._size,
                capacity=self.config.capacity,
                inserts=self._limiter.inserts,
                samples=self._limiter.samples,
                insert_blocked_s=self._limiter.insert_blocked_s,
                sample_blocked_s=self._limiter.sample_blocked_s,
                nbytes=int(st.nbytes + self._sampler.nbytes),
                priority_mass=float(self._sampler.mass(size=self._size)),
                storage=self.config.storage,
                sampler=self.config.sampler,
                extra=extra,
                generation=self.generation,
                stale_generation_updates=self._stale_generation_updates,
                unknown_key_updates=self._unknown_key_updates,
                duplicate_inserts=self._duplicate_inserts,
                refused_inserts=self._refused_inserts,
                dropped_invalid_rows=self._dropped_invalid_rows,
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(json-able metadata, named arrays) capturing the table exactly, RNG state included."""
        with self._cond:
            st_meta, st_arrays = self._storage.state_dict()
            sa_meta, sa_arrays = self._sampler.state_dict()
            meta = {
                "version": _STATE_VERSION,
                "config": self.config.to_json(),
                "next_key": self._next_key,
                "oldest_key": self._oldest,
                "limiter": self._limiter.state_dict(),
                "sampler": sa_meta,
                "storage": st_meta,
                # As a JSON string: PCG64 state words are 128-bit ints that generic JSON carriers round.
                "rng": json.dumps(self._rng.bit_generator.state),
                "generation": self.generation,
                "writers": [[w, *rec] for w, rec in self._writers.items()],
            }
            arrays = {f"storage/{k}": v for k, v in st_arrays.items()}
            arrays.update({f"sampler/{k}": v for k, v in sa_arrays.items()})
        return meta, arrays

    def snapshot(self) -> TableSnapshot:
        """Start a checkpoint that does not stop the table for its whole write (see :class:`TableSnapshot`)."""
        with self._cond:
            meta, copied, live = self._storage.snapshot()
            sa_meta, sa_arrays = self._sampler.state_dict()
            state = {
                "version": _STATE_VERSION,
                "config": self.config.to_json(),
                "next_key": self._next_key,
                "oldest_key": self._oldest,
                "limiter": self._limiter.state_dict(),
                "sampler": sa_meta,
                "storage": meta,
                "rng": json.dumps(self._rng.bit_generator.state),
                "generation": self.generation,
                "writers": [[w, *rec] for w, rec in self._writers.items()],
            }
            arrays = {f"storage/{k}": v for k, v in copied.items()}
            arrays.update({f"sampler/{k}": v for k, v in sa_arrays.items()})
            return TableSnapshot(self, state, arrays, {f"storage/{k}": v for k, v in live.items()},
                                 storage=self._storage)

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; FailedPrecondition if schema/storage/sampler/capacity differ.

        The schema is compared by layout (names, dtypes, shapes): bounds decide what may be inserted,
        not how rows are stored, so a table may be restored with other bounds. The restored table keeps
        the saved generation; a shard then starts a new one (:meth:`start_generation`).
        """
        if not isinstance(meta, Mapping) or "config" not in meta:
            raise FailedPrecondition(
                "table state has no 'config'; expected the metadata from Table.state_dict()"
            )
        if meta.get("version") != _STATE_VERSION:
            raise FailedPrecondition(
                f"table state version {meta.get('version')!r}; expected {_STATE_VERSION}"
            )
        saved = dict(meta["config"]) if isinstance(meta["config"], Mapping) else {}
        mine = self.config.to_json()
        mine["schema"] = self.config.schema.layout()
        if isinstance(saved.get("schema"), list):
            saved["schema"] = [{k: f.get(k) for k in ("name", "dtype", "shape")} if isinstance(f, Mapping) else f
                               for f in saved["schema"]]
        for key in ("schema", "storage", "sampler", "capacity", "priority_exponent"):
            if saved.get(key) != mine[key]:
                got, want = saved.get(key), mine[key]
                if key == "schema":  # the compact spec form names the fields readably
                    want = self.config.schema.spec()
                    with contextlib.suppress(ValueError, TypeError):
                        got = Schema.from_json(got).spec()
                raise FailedPrecondition(
                    f"table {self.config.name!r}: saved state has {key}={got!r} but this table has "
                    f"{key}={want!r}; restore into a table with the same {key}"
                )
        old = (self._storage, self._sampler, self._limiter, self._rng, self._next_key, self._oldest,
               self._writers, self._inflight, self.generation)
        try:
            with self._cond:
                self._build()
                next_key, oldest = int(meta["next_key"]), int(meta["oldest_key"])
                if not 0 <= oldest <= next_key <= MAX_INDEX + 1 or next_key - oldest > self.config.capacity:
                    raise ValueError(f"saved keys oldest={oldest}, next={next_key} are inconsistent")
                generation = int(meta.get("generation", 0))
                if generation < 0:
                    raise ValueError(f"saved generation {generation}; expected >= 0")
                writers = OrderedDict()
                for entry in meta.get("writers", []):
                    w, seq, first, n, gen, *rest = entry   # checkpoints before the total have 5 fields
                    writers[str(w)] = (int(seq), int(first), int(n), int(gen), int(rest[0]) if rest else -1)
                self._storage.load_state_dict(
                    meta["storage"], {k[8:]: v for k, v in arrays.items() if k.startswith("storage/")}
                )
                self._sampler.load_state_dict(
                    meta["sampler"], {k[8:]: v for k, v in arrays.items() if k.startswith("sampler/")}
                )
                self._limiter.load_state_dict(meta["limiter"])
                self._rng.bit_generator.state = json.loads(meta["rng"])
                self._next_key, self._oldest = next_key, oldest
                self._writers, self.generation = writers, generation
                self._cond.notify_all()
        except (KeyError, ValueError, TypeError) as err:
            with self._cond:
                (self._storage, self._sampler, self._limiter, self._rng, self._next_key, self._oldest,
                 self._writers, self._inflight, self.generation) = old
            raise FailedPrecondition(
                f"table {self.config.name!r}: saved state is inconsistent: {err}"
            ) from err

    def drop_invalid_rows(self) -> tuple[int, str]:
        """Remove live rows whose values violate the schema's bounds (keeping the others, in order, at
        the newest indices); return ``(rows dropped, the first violation's message)``.

        A shard calls it after restoring a checkpoint: rows stored before the schema declared bounds (or
        by an older, unchecked version) then never reach a learner, and a resume is never blocked by them.
        """
        bounded = [f for f in self.config.schema.fields if f.bounds is not None]
        if not bounded:
            return 0, ""
        with self._cond:
            index = np.arange(self._oldest, self._next_key, dtype=np.int64)
            valid = np.ones(index.size, dtype=bool)
            first_error = ""
            step = max(1, (64 << 20) // max(1, self.config.schema.row_nbytes()))   # ~64 MB per gather
            for lo in range(0, index.size, step):
                cols = self._storage.gather(index[lo:lo + step].astype(np.uint64))
                for f in bounded:
                    bad = f.bounds.invalid_rows(cols[f.name])
                    if bad.any() and not first_error:
                        try:
                            f.bounds.check(cols[f.name][bad][:1], field=f.name)
                        except InvalidArgument as err:
                            first_error = f"index {int(index[lo + int(np.argmax(bad))])}: {err}"
                    valid[lo:lo + step] &= ~bad
            dropped = int((~valid).sum())
            if dropped:
                keep = index[valid]
                self._storage.compact(keep=keep, end=self._next_key)
                self._sampler.compact(keep=keep, end=self._next_key)
                self._oldest = self._next_key - keep.size
                self._dropped_invalid_rows += dropped
            return dropped, first_error

    def _overwritten_since(self, storage: Any) -> int:
        with self._cond:
            if storage is not self._storage:   # rebuilt by load_state_dict: nothing of the old one is valid
                return 1 << 62
            return self._overwritten_before

    def close(self) -> None:
        """Wake every blocked caller with Cancelled; later inserts and samples are refused the same way."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
