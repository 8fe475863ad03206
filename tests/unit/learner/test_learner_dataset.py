"""ReplayDataset against a fake replay client: what one sample call asks for and how it becomes batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.dataset import ReplayDataset
from learner.loop import Prefetcher
from replay.client import SampleBatch
from replay.errors import DeadlineExceeded


class _Client:
    """Answers sample(n) with rows grouped by shard as the real client returns them: the first half of
    the rows from shard 0 (keys 0..), the second from shard 1 (keys 1000..); obs row i holds key i."""

    def __init__(self, *, fail_with: BaseException | None = None):
        self.calls: list[tuple[int, float]] = []
        self.fail_with = fail_with

    def sample(self, n, *, beta, timeout):
        self.calls.append((n, beta))
        if self.fail_with is not None:
            raise self.fail_with
        half = n // 2
        keys = np.concatenate([np.arange(half), 1000 + np.arange(n - half)]).astype(np.uint64)
        weights = np.linspace(0.1, 1.0, n).astype(np.float32)  # one maximum over the whole call
        columns = {"obs": np.stack([keys, keys], axis=1).astype(np.float32),
                   "action": (keys % 2).astype(np.int64),
                   "policy_version": (keys // 10).astype(np.int64)}
        return SampleBatch(keys=keys, columns=columns, probabilities=np.full(n, 1 / n), weights=weights)


def test_one_batch_per_call_by_default_with_metadata_apart_and_beta_annealed():
    client = _Client()
    dataset = ReplayDataset(client, batch_size=4, prioritized=True, beta_start=0.4, total_env_steps=100)
    dataset.progress(env_steps=50)
    [batch] = dataset.sample(timeout=0.1)
    assert client.calls == [(4, pytest.approx(0.7))]
    assert set(batch.tensors) == {"obs", "action"} and batch.tensors["obs"].dtype == torch.float32
    assert batch.keys.tolist() == [0, 1, 1000, 1001] and batch.policy_version.tolist() == [0, 0, 100, 100]
    assert batch.weights.tolist() == pytest.approx([0.1, 0.4, 0.7, 1.0])  # the call's own weights, untouched
    assert ReplayDataset(client, batch_size=4, prioritized=False).sample(timeout=0.1)[0].weights is None


def test_several_batches_per_call_are_shuffled_across_shards_and_normalized_each():
    client = _Client()
    dataset = ReplayDataset(client, batch_size=16, prioritized=True, batches_per_sample=4, seed=3)
    batches = dataset.sample(timeout=0.1)
    assert client.calls == [(64, pytest.approx(0.4))] and len(batches) == 4
    all_keys = np.concatenate([b.keys for b in batches])
    assert sorted(all_keys.tolist()) == list(range(32)) + list(range(1000, 1032))  # every row once
    for b in batches:
        keys = b.keys.astype(np.int64)
        # the columns of a row stay together through the shuffle
        assert b.tensors["obs"][:, 0].long().tolist() == keys.tolist()
        assert b.tensors["action"].tolist() == (keys % 2).tolist() and b.policy_version.tolist() == (keys // 10).tolist()
        # not one shard's rows per batch, as an unshuffled split would give
        assert (keys < 1000).any() and (keys >= 1000).any()
        # each batch normalized by its own maximum, ratios within it kept
        assert float(b.weights.max()) == pytest.approx(1.0)
    expected = np.linspace(0.1, 1.0, 64)
    first = batches[0]
    position = {k: i for i, k in enumerate(np.concatenate([np.arange(32), 1000 + np.arange(32)]).tolist())}
    raw = expected[[position[int(k)] for k in first.keys]]
    assert first.weights.numpy() == pytest.approx(raw / raw.max(), rel=1e-6)
    # the same seed draws the same split
    again = ReplayDataset(_Client(), batch_size=16, prioritized=True, batches_per_sample=4, seed=3).sample(timeout=0.1)
    assert [b.keys.tolist() for b in again] == [b.keys.tolist() for b in batches]


def test_a_call_that_times_out_is_none_and_other_errors_propagate():
    assert ReplayDataset(_Client(fail_with=DeadlineExceeded("held back")), batch_size=4,
                         prioritized=False).sample(timeout=0.01) is None
    with pytest.raises(ConnectionError, match="gone"):
        ReplayDataset(_Client(fail_with=ConnectionError("gone")), batch_size=4, prioritized=False).sample(timeout=0.01)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "8"])
def test_bad_batches_per_sample_is_refused(value):
    with pytest.raises(ValueError, match=f"batches_per_sample must be an integer >= 1, got {value!r}"):
        ReplayDataset(_Client(), batch_size=4, prioritized=False, batches_per_sample=value)


def test_prefetcher_hands_out_a_calls_batches_in_order_from_one_queue_item():
    dataset = ReplayDataset(_Client(), batch_size=2, prioritized=False, batches_per_sample=3, seed=0)
    calls = []

    def sample(timeout):
        calls.append(timeout)
        return dataset.sample(timeout)

    pre = Prefetcher(sample=sample, depth=1, poll_timeout_s=0.01).start()
    try:
        got = [pre.get(timeout=5) for _ in range(6)]
    finally:
        pre.stop()
    assert all(len(b.keys) == 2 for b in got)
    first_call = sorted(k for b in got[:3] for k in b.keys.tolist())
    assert first_call == [0, 1, 2, 1000, 1001, 1002]  # one call's 6 rows, then the next call's
    assert len(calls) >= 2
