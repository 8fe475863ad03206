"""The layout of replay item keys: shard, generation and insert index in one uint64.

::

    bit 63 ........ 48 47 ...... 40 39 ........................... 0
        |   shard (16) | generation (8) |        index (40)          |
        '--- set by the client -------' '--- set by the table ------'

* ``index`` is the table's insert counter (item ``index`` is the ``index``-th row ever inserted); it is
  never reused within a table's life, and the table refuses inserts once it would pass ``2**40``
  (about 10^12 rows: 3.5 years at 10k inserts/s per shard).
* ``generation`` changes every time a shard starts (a restore or a fresh start over a checkpoint
  directory): rows inserted after the last checkpoint are lost in a crash and their indices are
  issued again after the restore, so an index alone would let a late priority update for a lost row
  change the new row with the same index. The table compares the generation of every key it is given
  with its own and ignores (and counts) keys of another generation. Only ``generation % 256`` is in
  the key; a stale key would have to survive 256 restarts to be mistaken for a current one.
* ``shard`` is added by :class:`replay.client.ReplayClient` so that a key names its owner; tables
  and servers only ever see the lower 48 bits ("table keys").

Example::

    from replay.keys import table_key, key_generation, key_index

    k = table_key(index=7, generation=3)        # what a table hands out
    assert (key_generation(k), key_index(k)) == (3, 7)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GENERATION_BITS",
    "INDEX_BITS",
    "MAX_INDEX",
    "SHARD_BITS",
    "TABLE_KEY_BITS",
    "key_generation",
    "key_index",
    "table_key",
]

SHARD_BITS = 16
GENERATION_BITS = 8
INDEX_BITS = 40
TABLE_KEY_BITS = GENERATION_BITS + INDEX_BITS          # 48: what a shard's keys may use
MAX_INDEX = (1 << INDEX_BITS) - 1
_INDEX_MASK = np.uint64(MAX_INDEX)
_GENERATION_MASK = np.uint64((1 << GENERATION_BITS) - 1)


def table_key(*, index, generation: int):
    """Table key(s) of insert ``index`` (int or uint64 array) in ``generation`` (any int >= 0)."""
    tag = (int(generation) % (1 << GENERATION_BITS)) << INDEX_BITS
    if isinstance(index, np.ndarray):
        return index.astype(np.uint64, copy=False) | np.uint64(tag)
    return int(index) | tag      # plain ints: no numpy scalar arithmetic on the insert path


def key_generation(keys):
    """``generation % 256`` of table keys (the bits above the index; shard bits must be cleared)."""
    if isinstance(keys, np.ndarray):
        return ((keys.astype(np.uint64, copy=False) >> np.uint64(INDEX_BITS)) & _GENERATION_MASK).astype(np.int64)
    return (int(keys) >> INDEX_BITS) & int(_GENERATION_MASK)


def key_index(keys):
    """The insert index of table keys."""
    if isinstance(keys, np.ndarray):
        return (keys.astype(np.uint64, copy=False) & _INDEX_MASK).astype(np.int64)
    return int(keys) & MAX_INDEX
