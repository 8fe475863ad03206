"""The replay client's surface over an in-process :class:`replay.table.Table`: no server, no network.

For single-process harnesses (the lockstep continual benchmark, unit tests of the learner) that want
the real table (storage, sampler, rate limiter) behind the same calls the learner and the actors make
on :class:`replay.client.ReplayClient`::

    table = Table(TableConfig(name="replay", schema=Schema.parse("obs:float32:4,reward:float32"), capacity=1000))
    replay = LocalReplayClient(table)
    replay.insert({"obs": np.zeros((8, 4), np.float32), "reward": np.ones(8, np.float32)})
    batch = replay.sample(4, beta=0.4, timeout=0)      # SampleBatch(keys, columns, probabilities, weights)
    replay.update_priorities(batch.keys, np.ones(4))
    replay.clear()                                      # every item removed, the rate limiter restarted

Keys are the table's own (one table, so there are no shard bits). A call the rate limiter holds back
past ``timeout`` raises :class:`replay.errors.DeadlineExceeded`, as the remote client does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from replay.client import SampleBatch
from replay.samplers import importance_weights
from replay.table import Table

__all__ = ["LocalReplayClient"]


class LocalReplayClient:
    """See the module docstring."""

    def __init__(self, table: Table):
        if not isinstance(table, Table):
            raise ValueError(f"LocalReplayClient needs a replay.table.Table, got {type(table).__name__}")
        self.table = table

    def insert(self, columns: dict[str, np.ndarray], *, writer_key: str = "", priorities: Any = None,
               timeout: float | None = None) -> np.ndarray:
        return self.table.insert(columns, priorities=priorities, timeout=timeout)

    def sample(self, batch_size: int, *, beta: float = 1.0, timeout: float | None = None) -> SampleBatch:
        result = self.table.sample(batch_size, timeout=timeout)
        weights = importance_weights(probabilities=result.probabilities, size=max(result.table_size, 1), beta=beta)
        return SampleBatch(keys=result.keys, columns=result.columns, probabilities=result.probabilities,
                           weights=weights, table=self.table.config.name)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray, *, table: str | None = None) -> Any:
        if table is not None and table != self.table.config.name:
            raise ValueError(f"priority updates for table {table!r} sent to the client of table "
                             f"{self.table.config.name!r}")
        return self.table.update_priorities(np.asarray(keys, dtype=np.uint64), np.asarray(priorities))

    def clear(self) -> int:
        return self.table.clear()

    def release_inserts(self, released: bool = True) -> str:
        return self.table.release_inserts(released)

    @property
    def size(self) -> int:
        return self.table.info().size
