"""LocalReplayClient: the replay client's calls over an in-process table."""

from __future__ import annotations

import numpy as np
import pytest

from replay.errors import DeadlineExceeded
from replay.local import LocalReplayClient
from replay.schema import Schema
from replay.table import Table, TableConfig


def _client(**kw) -> LocalReplayClient:
    schema = Schema.parse("obs:float32:2,action:int64")
    return LocalReplayClient(Table(TableConfig(name="replay", schema=schema, capacity=16, **kw)))


def _rows(first: int, n: int) -> dict[str, np.ndarray]:
    k = np.arange(first, first + n)
    return {"obs": np.stack([k, -k], axis=1).astype(np.float32), "action": k.astype(np.int64)}


def test_insert_sample_priorities_and_clear_as_the_remote_client():
    replay = _client(sampler="prioritized", priority_exponent=1.0)
    assert replay.insert(_rows(0, 4), writer_key="actor-0").tolist() == [0, 1, 2, 3]
    replay.update_priorities(np.array([0, 1, 2, 3], np.uint64), np.array([1.0, 1.0, 1.0, 5.0]))
    batch = replay.sample(16, beta=1.0, timeout=0)
    assert batch.columns["obs"].shape == (16, 2) and batch.weights.dtype == np.float32
    # Importance weights (N * P)^-beta / max: the heavy item (P = 5/8) gets the smallest weight.
    heavy = batch.keys == 3
    assert heavy.any() and np.allclose(batch.weights[heavy], 0.2) and np.allclose(batch.weights[~heavy], 1.0)
    assert replay.size == 4 and replay.clear() == 4 and replay.size == 0
    with pytest.raises(DeadlineExceeded):
        replay.sample(1, timeout=0)


def test_a_non_table_is_refused():
    with pytest.raises(ValueError, match="needs a replay.table.Table, got dict"):
        LocalReplayClient({})
