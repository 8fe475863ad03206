"""The two seams of a replay table: where rows are kept (:class:`Storage`) and which are handed out
(:class:`Sampler`).

Both are ``typing.Protocol``s listing exactly what :class:`replay.table.Table` calls. A new storage or
sampler is a class with these members, registered by name in :data:`replay.storage.STORAGES` or
:data:`replay.samplers.SAMPLERS`; the table builds registered classes as
``cls(schema=..., capacity=...)`` and ``cls(capacity=..., priority_exponent=...)``, and the contract
suite (``tests/contract/test_table_contract.py``) runs every registered storage x sampler through it.

Shared conventions: the table's live items are the contiguous key range ``[oldest, oldest + size)``
(keys are insert indices, never reused, and items leave oldest-first), item ``key`` lives at slot
``key % capacity``, and ``state_dict`` returns ``(json-able metadata, named numpy arrays)`` that
``load_state_dict`` restores exactly (ValueError if they do not fit this instance).

Example::

    import numpy as np
    from replay.interfaces import Sampler, Storage
    from replay.samplers import SAMPLERS, make_sampler
    from replay.schema import Schema
    from replay.storage import make_storage

    storage = make_storage("ring", schema=Schema.parse("x:int64"), capacity=8)
    sampler = make_sampler("uniform", capacity=8, priority_exponent=0.6)
    assert isinstance(storage, Storage) and isinstance(sampler, Sampler)   # members present
    evict_before = storage.commit(storage.prepare({"x": np.arange(3)}, n=3), first_key=0)
    sampler.on_insert(first_key=0, n=3, priorities=None)
    keys, probs = sampler.sample(batch_size=2, oldest=0, size=3, rng=np.random.default_rng(0))
    rows = storage.gather(keys)                                            # {"x": int64 [2]}
    assert list(SAMPLERS) == ["uniform", "prioritized", "fifo"]            # name -> class

``isinstance`` with a runtime-checkable Protocol only checks that the members exist; the contract
suite also compares the methods' parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Sampler", "Storage"]


@runtime_checkable
class Storage(Protocol):
    """Keeps a table's rows; writes happen in two steps so that an insert is all-or-nothing.

    (``Table.info()`` additionally reports ``frames_in_use()``, ``frame_capacity`` and ``dedup_entries``
    of a storage whose ``kind`` is ``"atari"``; other storages need not have them.)
    """

    kind: str
    """Registry name, also reported by ``Table.info()``."""

    def prepare(self, columns: Mapping[str, np.ndarray], *, n: int) -> Any:
        """Validate and precompute an insert of ``n`` rows (already checked against the schema).

        Must not read or write mutable storage state: the table calls it outside its lock. Raises
        InvalidArgument for a batch this storage can never hold (e.g. ``n > capacity``).
        """

    def commit(self, prepared: Any, *, first_key: int) -> int:
        """Write a prepared batch as keys ``first_key..first_key+n-1`` (under the table lock; must not
        fail). Returns ``evict_before``: every live key below it was overwritten and leaves the table."""

    def gather(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of the live uint64 ``keys``: each field ``[len(keys), *shape]``, in schema order."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage's arrays."""

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(json-able metadata, named arrays) capturing the storage exactly."""

    def snapshot(self) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(meta, copied, live)`` for a checkpoint written while the table keeps serving (under the
        table lock; must be fast). ``copied`` are copies taken now; ``live`` are the storage's own arrays,
        written to disk later outside the lock. Together they are :meth:`state_dict`. Only the rows of
        items that commits overwrite (``evict_before``) may change in live arrays before the write ends;
        the table drops those items from the checkpoint, so a live array must hold nothing else that
        commits rewrite."""

    def load_state_dict(self, meta: dict, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; ValueError naming what does not fit."""

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        """Keep only the live items ``keep`` (ascending keys), renumbered ``[end - len(keep), end)`` in
        the same order (a restored shard drops rows that violate the schema's bounds this way)."""


@runtime_checkable
class Sampler(Protocol):
    """Decides which live items a sample draws; told which key ranges appear and disappear."""

    name: str
    """Registry name."""
    consumes: bool
    """True if sampled items leave the table (FIFO). The table then advances ``oldest`` past each
    sample and blocks with a queue rate limiter, so unread items are never overwritten."""

    def on_insert(self, *, first_key: int, n: int, priorities: np.ndarray | None) -> None:
        """Keys ``first_key..first_key+n-1`` were inserted, with validated priorities or None."""

    def on_remove(self, *, first_key: int, end_key: int) -> None:
        """Keys ``[first_key, end_key)`` (the oldest) left the table."""

    def sample(
        self, *, batch_size: int, oldest: int, size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(uint64 keys, float64 probabilities)`` of ``batch_size`` draws among the live items."""

    def update(self, *, keys: np.ndarray, priorities: np.ndarray, oldest: int, end: int) -> int:
        """Set priorities of the keys still live in ``[oldest, end)``; returns how many were."""

    def mass(self, *, size: int) -> float:
        """Total sampling mass (sum of p**alpha, or ``size`` for uniform-like samplers)."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the sampler's arrays."""

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(json-able metadata, named arrays) capturing the sampler exactly."""

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; ValueError naming what does not fit."""

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        """As :meth:`Storage.compact`: the items ``keep`` now live at keys ``[end - len(keep), end)``."""
