"""Frame stacks sent once per frame: a column given as distinct frames plus each row's indices into them.

An Atari transition's ``obs`` and ``next_obs`` are ``(S, H, W)`` stacks of the last ``S`` frames, so
the rows of one insert repeat most of their frames: consecutive steps of an env share ``S - 1`` frames
and an n-step ``next_obs`` is a later row's ``obs``. Sent densely, a 64-row Pong insert is ~3.6 MB; as
:class:`SharedFrames` it is the distinct frames (~14 per env instead of 64) and ``2 * S`` int32 indices
per row, about a quarter of the bytes, and the Atari storage hashes only the distinct frames.

    >>> import numpy as np
    >>> from replay.frames import SharedFrames, share_frames
    >>> stacks = np.arange(5, dtype=np.uint8).repeat(4).reshape(5, 1, 2, 2)           # 5 frames of 2x2
    >>> obs = np.stack([stacks[i:i + 2, 0] for i in range(3)])                          # [3, 2, 2, 2]
    >>> nxt = np.stack([stacks[i + 1:i + 3, 0] for i in range(3)])
    >>> shared = share_frames({"obs": obs, "next_obs": nxt, "reward": np.zeros(3, np.float32)},
    ...                       names=("obs", "next_obs"))
    >>> shared["obs"].frames.shape, shared["obs"].index.tolist()     # 5 distinct frames instead of 12
    ((5, 2, 2), [[0, 1], [1, 2], [2, 3]])
    >>> bool((shared["next_obs"].materialize() == nxt).all()), shared["obs"].frames is shared["next_obs"].frames
    (True, True)

On the wire (``replay.codec``) the frames of one request travel once (``InsertRequest.frames``) and each
shared column as its index (``InsertRequest.frame_index``); a table validates a :class:`SharedFrames`
column like a dense one (dtype, per-row shape, bounds, and every index inside the frames) and a ring
storage simply materializes it. Frames are matched by a 64-bit content hash and then compared byte for
byte, so the rows a table stores are exactly the rows the client had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["INDEX_DTYPE", "SharedFrames", "distinct_rows", "hash_rows", "share_frames", "words"]

_HASH_RNG = np.random.default_rng(0x5EED_F4A3)
_HASH_M1 = _HASH_RNG.integers(1, 2**63, size=1 << 14, dtype=np.uint64) | np.uint64(1)
_HASH_M2 = _HASH_RNG.integers(1, 2**63, size=1 << 14, dtype=np.uint64) | np.uint64(1)

INDEX_DTYPE = np.dtype(np.int32)
"""The dtype of :attr:`SharedFrames.index` (on the wire too)."""


def words(rows: np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 ``[N, L]`` array as uint64 words when ``L % 8 == 0`` (a view), else itself."""
    return rows.view(np.uint64) if rows.shape[1] % 8 == 0 else rows


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """64-bit content hash of each row of a uint8 ``[N, L]`` array (vectorized, ~7 GB/s).

    ``sum_i w_i * a_i + sum_i (w_i >> 29) * b_i (mod 2**64)`` over the row's 64-bit words ``w_i`` with
    fixed random odd ``a_i, b_i``: two integer mat-vec products, one pass each. The shifted term carries
    differences confined to a word's top bits down into the middle bits (the plain weighted sum alone
    would leave them in the top byte). A final avalanche spreads entropy into the low bits that the dict
    buckets on. Hits are always verified byte for byte, so the hash only has to make collisions rare.
    """
    length = rows.shape[1]
    if length % 8 == 0:
        w = rows.view(np.uint64)
    elif length % 4 == 0:
        w = rows.view(np.uint32).astype(np.uint64)
    else:
        w = rows.astype(np.uint64)
    pick = np.arange(w.shape[1]) % _HASH_M1.size
    h = w @ _HASH_M1[pick] + (w >> np.uint64(29)) @ _HASH_M2[pick]
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(33)
    return h


def distinct_rows(hashes: np.ndarray, take) -> np.ndarray:
    """For each of ``N`` rows with content ``hashes [N]``, the index of the first row equal to it.

    ``take(indices)`` returns those rows' bytes (as equal-width arrays); rows with equal hashes are
    confirmed with it byte for byte, and a (vanishingly rare) collision keeps its own entry.
    """
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rep_of = first[inverse.reshape(-1)]
    dup = np.flatnonzero(rep_of != np.arange(hashes.shape[0]))
    if dup.size:
        same = (take(dup) == take(rep_of[dup])).all(axis=1)
        rep_of[dup[~same]] = dup[~same]
    return rep_of


@dataclass(frozen=True, eq=False)
class SharedFrames:
    """A stacked column ``[rows, S, *frame]`` given as ``frames [U, *frame]`` and ``index [rows, S]``:
    row ``i``'s stack position ``s`` is ``frames[index[i, s]]``. Several columns of one insert share
    one ``frames`` array (the same object)."""

    frames: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense column's shape."""
        return (*self.index.shape, *self.frames.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.frames.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the index (the frames are counted once per request, see :func:`payload_nbytes`)."""
        return int(self.index.nbytes)

    def materialize(self) -> np.ndarray:
        """The dense column (a new array)."""
        return np.take(self.frames, self.index, axis=0)

    def take(self, rows: np.ndarray) -> SharedFrames:
        """The given rows, over the same frames."""
        return SharedFrames(self.frames, np.ascontiguousarray(self.index[rows]))


def share_frames(columns: Mapping[str, np.ndarray], *, names: Sequence[str]) -> dict[str, np.ndarray | SharedFrames]:
    """``columns`` with the stacked columns ``names`` (equal dtype and frame shape) replaced by
    :class:`SharedFrames` over one array of their distinct frames; other columns are passed through.

    Raises ValueError naming the column if one is missing or not a stack of the others' frames.
    """
    names = list(names)
    if not names:
        return dict(columns)
    stacks = []
    for name in names:
        if name not in columns:
            raise ValueError(f"share_frames: no column {name!r}; columns are {sorted(columns)}")
        array = np.ascontiguousarray(columns[name])
        if array.ndim < 3:
            raise ValueError(f"share_frames: column {name!r} has shape {array.shape}; expected [rows, stack, *frame]")
        stacks.append(array)
    first = stacks[0]
    for name, array in zip(names, stacks, strict=True):
        if array.dtype != first.dtype or array.shape[2:] != first.shape[2:] or array.shape[0] != first.shape[0]:
            raise ValueError(f"share_frames: column {name!r} is {array.dtype} {array.shape}; expected "
                             f"{first.dtype} [{first.shape[0]}, stack, *{first.shape[2:]}] like {names[0]!r}")
    frame_shape = first.shape[2:]
    flat = [a.reshape(-1, *frame_shape) for a in stacks]
    pool = np.concatenate(flat) if len(flat) > 1 else flat[0]
    pool_bytes = pool.reshape(pool.shape[0], -1).view(np.uint8)
    pool_words = words(pool_bytes)
    rep_of = distinct_rows(hash_rows(pool_bytes), lambda js: pool_words[js])
    reps, inverse = np.unique(rep_of, return_inverse=True)
    frames = pool[reps]
    out: dict[str, np.ndarray | SharedFrames] = dict(columns)
    offset = 0
    for name, array in zip(names, stacks, strict=True):
        count = array.shape[0] * array.shape[1]
        index = inverse[offset:offset + count].reshape(array.shape[:2]).astype(INDEX_DTYPE)
        out[name] = SharedFrames(frames, index)
        offset += count
    return out
