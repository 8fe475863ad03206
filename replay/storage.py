"""Storages: where a table keeps its rows. A ring of preallocated arrays, and a frame-deduplicating
Atari storage.

Both keep item ``key`` at slot ``key % capacity`` and are written in two steps so that inserts are
all-or-nothing: :meth:`prepare` (pure, no table state read or written, may run outside the table lock)
validates and precomputes, and :meth:`commit` (under the lock) only mutates. ``commit`` returns
``evict_before``: every live key below it has been overwritten and must leave the table. Both satisfy
:class:`replay.interfaces.Storage` and are registered by kind in :data:`STORAGES`.

For checkpoints written while the table serves, :meth:`snapshot` copies the small per-item arrays and
hands out the large row arrays (ring columns, the Atari frame pool) to be written live: only rows of
items that commits overwrite change meanwhile, and the table drops those items from the checkpoint.
:meth:`compact` keeps a subset of the live items, renumbered to the newest keys (a restored shard drops
rows outside the schema's bounds this way); the Atari frames stay where they are.

Atari storage
-------------
``obs`` and ``next_obs`` are ``uint8 (S, H, W)`` frame stacks. Consecutive transitions share ``S - 1``
frames and an n-step transition's ``next_obs`` frames are a later transition's ``obs`` frames, so the
storage keeps each distinct frame once in a frame pool (a ring of ``frame_capacity`` frames) and each
transition keeps ``2 * S`` int32 indices into it. Frames are deduplicated by content: a 64-bit hash of
every incoming frame is looked up among the frames written in the last ``dedup_window`` pool writes (and
within the batch), and a hit is only used after comparing the bytes, so reconstruction is always
exact, whatever the environment put in a stack (repeated or zero frames at episode starts, any
interleaving of writer streams). Only recent frames are reused so that eviction stays oldest-first:
each frame remembers the largest item key referencing it, and when the pool ring overwrites a frame,
every item up to that key is evicted first. With ``frame_capacity = capacity + dedup_window`` and about
one new frame per transition, the pool wraps no sooner than the transition ring does.

Example::

    import numpy as np
    from replay.schema import Schema
    from replay.storage import AtariStorage

    st = AtariStorage(schema=Schema.parse("obs:uint8:4x84x84,action:int64,next_obs:uint8:4x84x84"), capacity=1000)
    obs = np.zeros((2, 4, 84, 84), np.uint8)
    prep = st.prepare({"obs": obs, "action": np.zeros(2, np.int64), "next_obs": obs}, n=2)
    st.commit(prep, first_key=0)
    assert st.gather(np.array([0, 1], np.uint64))["obs"].shape == (2, 4, 84, 84)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from replay.errors import InvalidArgument
from replay.frames import SharedFrames, distinct_rows, hash_rows
from replay.frames import words as _words
from replay.interfaces import Storage
from replay.schema import Field, Schema

__all__ = ["AtariStorage", "RingStorage", "STACK_FIELDS", "STORAGES", "check_atari_schema", "make_storage"]

STACK_FIELDS = ("obs", "next_obs")
"""The stacked fields of an Atari table (clients send them as shared frames, ``replay.frames``)."""


def _ring_slices(first_key: int, n: int, capacity: int) -> list[tuple[slice, slice]]:
    """(destination slots, source rows) pairs covering keys first_key..first_key+n-1 (at most 2 pieces)."""
    start = first_key % capacity
    head = min(n, capacity - start)
    pieces = [(slice(start, start + head), slice(0, head))]
    if head < n:
        pieces.append((slice(0, n - head), slice(head, n)))
    return pieces


def _check_arrays(saved: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    for name, arr in expected.items():
        if name not in saved:
            raise ValueError(f"saved {what} has no array {name!r}")
        got = np.asarray(saved[name])
        if got.shape != arr.shape or got.dtype != arr.dtype:
            raise ValueError(
                f"saved {what} array {name!r} has shape {got.shape} dtype {got.dtype}; "
                f"expected {arr.shape} {arr.dtype}"
            )


class _Columns:
    """Preallocated ``[capacity, *shape]`` arrays for a list of fields, written as a ring."""

    def __init__(self, fields: tuple[Field, ...], capacity: int) -> None:
        self.capacity = capacity
        self.arrays = {f.name: np.zeros((capacity, *f.shape), dtype=f.np_dtype) for f in fields}

    def write(self, columns: Mapping[str, np.ndarray], first_key: int, n: int) -> None:
        for name, arr in self.arrays.items():
            src = columns[name]
            for dst, rows in _ring_slices(first_key, n, self.capacity):
                arr[dst] = src[rows]

    def gather(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.take(arr, slots, axis=0) for name, arr in self.arrays.items()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def compact(self, keep: np.ndarray, end: int) -> None:
        _compact_rows(list(self.arrays.values()), keep, end, self.capacity)


def _compact_rows(arrays: list[np.ndarray], keep: np.ndarray, end: int, capacity: int) -> None:
    """Move the rows of keys ``keep`` (ascending) to keys ``[end - len(keep), end)``, in place.

    Each row moves to a key >= its own, so moving the newest first never overwrites a row still to be
    moved (a chunk is read whole before it is written, for moves within the chunk)."""
    targets = np.arange(end - keep.size, end, dtype=np.int64)
    chunk = 4096
    for hi in range(keep.size, 0, -chunk):
        lo = max(0, hi - chunk)
        src = keep[lo:hi].astype(np.int64) % capacity
        dst = targets[lo:hi] % capacity
        for array in arrays:
            array[dst] = array[src]


@dataclass
class _RingPrepared:
    columns: Mapping[str, np.ndarray]
    n: int


class RingStorage:
    """Every field in its own preallocated ``[capacity, *shape]`` array; slot = key % capacity."""

    kind = "ring"

    def __init__(self, *, schema: Schema, capacity: int) -> None:
        self.schema = schema
        self.capacity = int(capacity)
        self._cols = _Columns(schema.fields, self.capacity)

    def prepare(self, columns: Mapping[str, np.ndarray], *, n: int) -> _RingPrepared:
        """Columns must already have passed ``schema.validate_batch``; n <= capacity."""
        if n > self.capacity:
            raise InvalidArgument(f"insert of {n} rows exceeds the table capacity {self.capacity}")
        # A column sent as shared frames is stored dense here (only the Atari storage keeps frames).
        dense = {name: c.materialize() if isinstance(c, SharedFrames) else c for name, c in columns.items()}
        return _RingPrepared(dense, n)

    def commit(self, prepared: _RingPrepared, *, first_key: int) -> int:
        self._cols.write(prepared.columns, first_key, prepared.n)
        return first_key + prepared.n - self.capacity

    def gather(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        slots = (keys % np.uint64(self.capacity)).astype(np.intp)
        out = self._cols.gather(slots)
        return {f.name: out[f.name] for f in self.schema.fields}

    @property
    def nbytes(self) -> int:
        return self._cols.nbytes

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {f"field/{k}": v.copy() for k, v in self._cols.arrays.items()}

    def snapshot(self) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
        # Every array is a row column: written live (rows overwritten meanwhile are dropped by the table).
        return {}, {}, {f"field/{k}": v for k, v in self._cols.arrays.items()}

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        self._cols.compact(keep, end)

    def load_state_dict(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
        expected = {f"field/{k}": v for k, v in self._cols.arrays.items()}
        _check_arrays(arrays, expected, "ring storage")
        for k, v in self._cols.arrays.items():
            v[...] = arrays[f"field/{k}"]


def check_atari_schema(schema: Schema) -> tuple[int, int, int]:
    """Return ``(S, H, W)`` if ``schema`` suits the Atari storage, else ValueError saying what is expected."""
    for name in STACK_FIELDS:
        if name not in schema:
            raise ValueError(
                f"atari storage needs fields 'obs' and 'next_obs' of dtype uint8 and shape (stack, H, W); "
                f"schema {schema.spec()!r} has no field {name!r}"
            )
        f = schema.field(name)
        if f.dtype != "uint8" or len(f.shape) != 3:
            raise ValueError(
                f"atari storage: field {name!r} is {f.dtype} {f.shape}; expected uint8 with shape (stack, H, W)"
            )
    o, no = schema.field("obs"), schema.field("next_obs")
    if o.shape != no.shape:
        raise ValueError(
            f"atari storage: obs shape {o.shape} differs from next_obs shape {no.shape}; expected equal"
        )
    return o.shape  # type: ignore[return-value]


# The content hash is module-level here so that a test can replace it (forcing collisions).
_hash_rows = hash_rows


@dataclass
class _AtariPrepared:
    others: Mapping[str, np.ndarray]
    n: int
    rep_frames: np.ndarray  # [U, H*W] distinct frames of the batch
    rep_hash: np.ndarray  # [U] uint64
    frame_rep: np.ndarray  # [n, 2S] index into rep_frames for every stack position (obs then next_obs)


class AtariStorage:
    """Frame-deduplicating storage for ``obs``/``next_obs`` uint8 stacks; other fields as in the ring."""

    kind = "atari"

    def __init__(
        self,
        *,
        schema: Schema,
        capacity: int,
        frame_capacity: int | None = None,
        dedup_window: int | None = None,
    ) -> None:
        self.schema = schema
        self.capacity = int(capacity)
        self.stack, h, w = check_atari_schema(schema)
        self.frame_shape = (h, w)
        self.dedup_window = int(
            dedup_window
            if dedup_window is not None
            # A frame is reused by the same env stream about n + S steps later, i.e. after every other
            # interleaved stream wrote as many frames: the window must cover streams * (n + S) writes.
            # capacity // 16 keeps the pool's slack at ~6% (~440 B per transition); small tables get at
            # least min(capacity, 512) so tests and toy runs still deduplicate well.
            else max(self.capacity // 16, min(self.capacity, 512), 8 * self.stack)
        )
        self.frame_capacity = int(
            frame_capacity if frame_capacity is not None else self.capacity + self.dedup_window
        )
        if not 0 <= self.dedup_window < self.frame_capacity or self.frame_capacity < 2 * self.stack:
            raise ValueError(
                f"atari storage: frame_capacity {self.frame_capacity} must be >= 2 * stack = {2 * self.stack} "
                f"(one transition's frames) and dedup_window {self.dedup_window} in [0, frame_capacity)"
            )
        self.pool = np.zeros((self.frame_capacity, h, w), dtype=np.uint8)
        self.frame_hash = np.zeros(self.frame_capacity, dtype=np.uint64)
        self.frame_maxkey = np.full(self.frame_capacity, -1, dtype=np.int64)
        self.index = np.zeros((self.capacity, 2 * self.stack), dtype=np.int32)
        self.frames_written = 0  # pool write position (monotonic); slot = position % frame_capacity
        self._recent: dict[int, int] = {}  # content hash -> slot, for frames in the dedup window
        self._other_fields = tuple(f for f in schema.fields if f.name not in STACK_FIELDS)
        self._cols = _Columns(self._other_fields, self.capacity)

    # ------------------------------------------------------------------ insert
    def prepare(self, columns: Mapping[str, np.ndarray | SharedFrames], *, n: int) -> _AtariPrepared:
        """Hash and deduplicate the batch's frames (pure; safe outside the table lock).

        ``obs``/``next_obs`` come dense (``[n, S, H, W]``) or as :class:`replay.frames.SharedFrames`
        (the client sent each distinct frame once); either way every frame the rows use is hashed,
        equal frames are confirmed byte for byte, and only the distinct ones go on to ``commit``.
        """
        if n > self.capacity:
            raise InvalidArgument(f"insert of {n} rows exceeds the table capacity {self.capacity}")
        s, (h, w) = self.stack, self.frame_shape
        # Every stack position as an index into one pool of candidate frames [R, H*W].
        pools, indices, offset = [], [], 0
        for name in STACK_FIELDS:
            column = columns[name]
            if isinstance(column, SharedFrames):
                # Columns over the same frames object (obs and next_obs of one request) share its rows.
                same = next((start for src, start in pools if src is column.frames), None)
                if same is None:
                    same = offset
                    pools.append((column.frames, offset))
                    offset += column.frames.shape[0]
                indices.append(column.index.astype(np.int64) + same)
            else:
                frames = np.ascontiguousarray(column).reshape(n * s, h * w)
                pools.append((frames, offset))
                indices.append(np.arange(offset, offset + n * s, dtype=np.int64).reshape(n, s))
                offset += n * s
        rows = [np.ascontiguousarray(src).reshape(-1, h * w) for src, _ in pools]
        starts = np.array([start for _, start in pools], dtype=np.int64)
        # Gathers and byte comparisons run on 64-bit words where the frame size allows (8x fewer elements).
        rows_w = [_words(r) for r in rows]

        def take(js: np.ndarray) -> np.ndarray:      # pool rows js, from whichever array holds each
            out = np.empty((js.size, rows_w[0].shape[1]), dtype=rows_w[0].dtype)
            which = np.searchsorted(starts, js, side="right") - 1
            for i, part in enumerate(rows_w):
                mine = which == i
                out[mine] = part[js[mine] - starts[i]]
            return out

        hashes = np.concatenate([_hash_rows(r) for r in rows])
        rep_of = distinct_rows(hashes, take)
        stack_rows = rep_of[np.concatenate(indices, axis=1)]      # [n, 2S] pool row of each position
        reps, frame_rep = np.unique(stack_rows, return_inverse=True)
        if reps.size > self.frame_capacity:
            raise InvalidArgument(
                f"insert of {n} rows has {reps.size} distinct frames but the frame pool holds at most "
                f"frame_capacity = {self.frame_capacity}; insert fewer rows per call"
            )
        others = {f.name: columns[f.name] for f in self._other_fields}
        return _AtariPrepared(
            others=others,
            n=n,
            rep_frames=take(reps).view(np.uint8),
            rep_hash=hashes[reps],
            frame_rep=frame_rep.reshape(n, 2 * s),
        )

    def commit(self, prepared: _AtariPrepared, *, first_key: int) -> int:
        p, fc = prepared, self.frame_capacity
        n, u = p.n, p.rep_hash.size
        slot_of_rep = np.full(u, -1, dtype=np.int64)
        # Reuse frames from the dedup window, after an exact byte comparison.
        cand_rep, cand_slot = [], []
        recent = self._recent
        for i, hv in enumerate(p.rep_hash.tolist()):
            s = recent.get(hv)
            if s is not None:
                cand_rep.append(i)
                cand_slot.append(s)
        if cand_rep:
            cr, cs = np.asarray(cand_rep), np.asarray(cand_slot)
            ok = (_words(self.pool[cs].reshape(cr.size, -1)) == _words(p.rep_frames[cr])).all(axis=1)
            slot_of_rep[cr[ok]] = cs[ok]
        start = self.frames_written
        # This insert's new frames overwrite pool positions [start - fc, start - fc + m); a reused frame
        # sitting there would be clobbered, so store such frames again instead (only happens when one insert
        # brings more than frame_capacity - dedup_window new frames; each round only grows m, and
        # m <= number of distinct frames <= frame_capacity, so it ends).
        while True:
            new = np.flatnonzero(slot_of_rep < 0)
            m = new.size
            hit = np.flatnonzero(slot_of_rep >= 0)
            if m <= fc - self.dedup_window or not hit.size:
                break
            hit_pos = start - 1 - ((start - 1 - slot_of_rep[hit]) % fc)  # position that last wrote each slot
            clobbered = hit[hit_pos < start - fc + m]
            if not clobbered.size:
                break
            slot_of_rep[clobbered] = -1
        new_slots = (start + np.arange(m, dtype=np.int64)) % fc
        # Items referencing frames about to be overwritten leave first (they are the oldest items).
        evict_before = int(self.frame_maxkey[new_slots].max()) + 1 if m else 0
        # Frames whose positions leave the dedup window are no longer offered for reuse.
        lo, hi = max(0, start - self.dedup_window), max(0, start + m - self.dedup_window)
        if hi > lo:
            leaving = np.arange(lo, hi, dtype=np.int64) % fc
            for s, hv in zip(leaving.tolist(), self.frame_hash[leaving].tolist(), strict=True):
                if recent.get(hv) == s:
                    del recent[hv]
        if m:
            self.pool[new_slots] = p.rep_frames[new].reshape(m, *self.frame_shape)
            self.frame_hash[new_slots] = p.rep_hash[new]
            self.frame_maxkey[new_slots] = -1
            for s, hv in zip(new_slots.tolist(), p.rep_hash[new].tolist(), strict=True):
                recent[hv] = s
            slot_of_rep[new] = new_slots
        self.frames_written = start + m
        frame_slots = slot_of_rep[p.frame_rep]  # [n, 2S]
        keys = np.arange(first_key, first_key + n, dtype=np.int64)
        np.maximum.at(self.frame_maxkey, frame_slots.reshape(-1), np.repeat(keys, 2 * self.stack))
        for dst, rows in _ring_slices(first_key, n, self.capacity):
            self.index[dst] = frame_slots[rows]
        self._cols.write(p.others, first_key, n)
        return max(evict_before, first_key + n - self.capacity)

    # ------------------------------------------------------------------ sample
    def gather(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        slots = (keys % np.uint64(self.capacity)).astype(np.intp)
        idx = self.index[slots]
        s = self.stack
        # One gather per stacked field straight out of the pool: contiguous [b, S, H, W] results.
        out = {
            "obs": np.take(self.pool, idx[:, :s], axis=0),
            "next_obs": np.take(self.pool, idx[:, s:], axis=0),
        }
        out.update(self._cols.gather(slots))
        return {f.name: out[f.name] for f in self.schema.fields}

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        # Frames stay where they are; the items' frame indices and other fields move, and every frame's
        # max key is recomputed from the items left (frames only dropped items used now evict nothing).
        _compact_rows([self.index, *self._cols.arrays.values()], keep, end, self.capacity)
        self.frame_maxkey[:] = -1
        if keep.size:
            keys = np.arange(end - keep.size, end, dtype=np.int64)
            slots = self.index[keys % self.capacity]
            np.maximum.at(self.frame_maxkey, slots.reshape(-1), np.repeat(keys, 2 * self.stack))

    # ------------------------------------------------------------------ accounting / state
    @property
    def nbytes(self) -> int:
        return int(
            self.pool.nbytes
            + self.frame_hash.nbytes
            + self.frame_maxkey.nbytes
            + self.index.nbytes
            + self._cols.nbytes
        )

    @property
    def dedup_entries(self) -> int:
        """Entries in the (Python dict) dedup map; bounded by ``dedup_window``."""
        return len(self._recent)

    def frames_in_use(self) -> int:
        return min(self.frames_written, self.frame_capacity)

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "pool": self.pool,
            "frame_hash": self.frame_hash,
            "frame_maxkey": self.frame_maxkey,
            "index": self.index,
        }
        arrays.update({f"field/{k}": v for k, v in self._cols.arrays.items()})
        return arrays

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, copied, live = self.snapshot()
        return meta, {**copied, **{k: v.copy() for k, v in live.items()}}

    def snapshot(self) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
        # The frame pool and the other fields' columns are written live. The per-frame hashes and max keys
        # and the per-item indices are copied now: a pool position overwritten during the write then still
        # has its old max key (below every kept item, so it evicts nothing after a restore) and its old
        # hash (a dedup hit on it is refused by the byte comparison).
        meta = {
            "frames_written": self.frames_written,
            "frame_capacity": self.frame_capacity,
            "dedup_window": self.dedup_window,
        }
        arrays = self._arrays()
        live_names = {"pool", *(f"field/{k}" for k in self._cols.arrays)}
        copied = {k: v.copy() for k, v in arrays.items() if k not in live_names}
        return meta, copied, {k: v for k, v in arrays.items() if k in live_names}

    def load_state_dict(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
        for key in ("frame_capacity", "dedup_window"):
            if int(meta.get(key, -1)) != getattr(self, key):
                raise ValueError(
                    f"saved atari storage has {key}={meta.get(key)!r}; this table has {getattr(self, key)}"
                )
        written = int(meta["frames_written"])
        if written < 0:
            raise ValueError(f"saved frames_written {written}; expected >= 0")
        _check_arrays(arrays, self._arrays(), "atari storage")
        for k, v in self._arrays().items():
            v[...] = arrays[k]
        self.frames_written = written
        # Rebuild the dedup map in write order so that later frames win, exactly as inserts left it.
        self._recent = {}
        lo = max(0, written - self.dedup_window)
        slots = np.arange(lo, written, dtype=np.int64) % self.frame_capacity
        for s, hv in zip(slots.tolist(), self.frame_hash[slots].tolist(), strict=True):
            self._recent[hv] = s


STORAGES: dict[str, type[Storage]] = {cls.kind: cls for cls in (RingStorage, AtariStorage)}
"""Registered storages by kind; each is built as ``cls(schema=..., capacity=...)``."""


def make_storage(kind: str, *, schema: Schema, capacity: int) -> Storage:
    """Build the storage named ``kind`` (one of :data:`STORAGES`)."""
    if kind not in STORAGES:
        raise ValueError(f"storage {kind!r}: expected one of {list(STORAGES)}")
    return STORAGES[kind](schema=schema, capacity=capacity)
