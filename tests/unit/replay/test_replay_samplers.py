"""Samplers: prioritized frequencies and probabilities, importance weights, FIFO order, priority checks."""

from __future__ import annotations

import numpy as np
import pytest

from replay.errors import DeadlineExceeded, InvalidArgument
from replay.samplers import (
    FifoSampler,
    PrioritizedSampler,
    UniformSampler,
    importance_weights,
    make_sampler,
    validate_priorities,
)
from replay.schema import Schema
from replay.table import Table, TableConfig

SCHEMA = Schema.parse("x:int64")


def _table(sampler="prioritized", capacity=8, **kw) -> Table:
    return Table(TableConfig(name="t", schema=SCHEMA, capacity=capacity, sampler=sampler, **kw))


def _rows(a, b):
    return {"x": np.arange(a, b, dtype=np.int64)}


def test_prioritized_frequencies_match_p_alpha():
    t = _table(capacity=64, priority_exponent=0.5, seed=123)
    t.insert(_rows(0, 4), priorities=np.array([1.0, 4.0, 9.0, 16.0]))
    # p**0.5 = 1, 2, 3, 4 -> P = 0.1, 0.2, 0.3, 0.4
    counts = np.zeros(4)
    for _ in range(500):
        r = t.sample(64)
        np.testing.assert_array_equal(r.keys, r.columns["x"].astype(np.uint64))
        counts += np.bincount(r.columns["x"], minlength=4)
        np.testing.assert_allclose(r.probabilities, (r.columns["x"] + 1) / 10.0, rtol=1e-12)
        assert r.priority_mass == 10.0 and r.table_size == 4
    freq = counts / counts.sum()
    # 32000 draws: the binomial std of each frequency is < 0.003; 0.01 is a generous bound.
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)


def test_new_items_get_max_priority_and_zero_is_never_sampled():
    s = PrioritizedSampler(capacity=8, priority_exponent=1.0)
    s.on_insert(first_key=0, n=2, priorities=np.array([0.0, 3.0]))
    s.on_insert(first_key=2, n=2, priorities=None)  # max seen so far = 3
    assert s.tree.leaves()[:4].tolist() == [0.0, 3.0, 3.0, 3.0]
    keys, probs = s.sample(batch_size=300, oldest=0, size=4, rng=np.random.default_rng(0))
    assert 0 not in keys.tolist() and set(keys.tolist()) == {1, 2, 3}
    np.testing.assert_array_equal(probs, np.full(300, 1 / 3))
    # alpha 0: every positive priority weighs 1, zero stays 0 (not 0**0 = 1)
    s0 = PrioritizedSampler(capacity=4, priority_exponent=0.0)
    s0.on_insert(first_key=0, n=3, priorities=np.array([0.0, 5.0, 0.5]))
    assert s0.tree.leaves().tolist() == [0.0, 1.0, 1.0, 0.0]


def test_all_zero_priorities_fall_back_to_uniform():
    t = _table(capacity=32, priority_exponent=1.0)
    t.insert(_rows(0, 3), priorities=np.zeros(3))
    r = t.sample(30)
    assert set(r.columns["x"].tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(r.probabilities, np.full(30, 1 / 3))
    assert r.priority_mass == 0.0


def test_update_priorities_skips_stale_keys_and_wraps_slots():
    t = _table(capacity=4, priority_exponent=1.0)
    t.insert(_rows(0, 4))
    t.insert(_rows(4, 6))  # keys 0,1 overwritten by 4,5
    n = t.update_priorities(np.array([0, 1, 4, 5, 99], np.uint64), np.array([7.0, 7.0, 2.0, 0.0, 7.0]))
    assert (n.updated, n.stale_generation, n.unknown) == (2, 0, 3)
    # live keys 2,3,4,5 at slots 2,3,0,1 with priorities 1,1,2,0
    assert t._sampler.tree.leaves().tolist() == [2.0, 0.0, 1.0, 1.0]
    r = t.sample(4)
    assert 5 not in r.keys.tolist()
    np.testing.assert_allclose(r.probabilities, np.where(r.keys == 4, 0.5, 0.25))
    assert t.info().priority_mass == 4.0


def test_importance_weights_hand_computed():
    # size * P = [2, 4, 8]: the largest raw weight (2 ** -beta) is not 1, so the normalization matters.
    p = np.array([0.1, 0.2, 0.4])
    w = importance_weights(probabilities=p, size=20, beta=0.5)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [1.0, 2**-0.5, 0.5], rtol=1e-6)          # raw [0.707, 0.5, 0.354]
    np.testing.assert_allclose(importance_weights(probabilities=p, size=20, beta=1.0), [1.0, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(importance_weights(probabilities=p, size=20, beta=0.0), [1.0, 1.0, 1.0])
    # size * P = [0.5, 1.5]: raw weights [2, 0.667] are above and below 1.
    np.testing.assert_allclose(importance_weights(probabilities=np.array([0.125, 0.375]), size=4, beta=1.0),
                               [1.0, 1 / 3], rtol=1e-6)
    with pytest.raises(InvalidArgument, match=r"probabilities\[1\] = 0.0"):
        importance_weights(probabilities=np.array([0.5, 0.0]), size=2, beta=1.0)
    with pytest.raises(InvalidArgument, match="beta 2"):
        importance_weights(probabilities=p, size=10, beta=2)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([1.0, float("nan"), 2.0], r"priority\[1\] = nan"),
        ([1.0, 2.0, -0.5], r"priority\[2\] = -0.5"),
        ([float("inf"), 1.0, 1.0], r"priority\[0\] = inf"),
        ([1.0, 2.0], r"shape \(2,\); expected \(3,\)"),
        (["a", "b", "c"], "dtype <U1"),
    ],
)
def test_bad_priorities_refused(bad, msg):
    with pytest.raises(InvalidArgument, match=msg):
        validate_priorities(np.array(bad), n=3)
    t = _table()
    with pytest.raises(InvalidArgument, match=msg):
        t.insert(_rows(0, 3), priorities=np.array(bad))
    assert t.info().size == 0 and t.info().inserts == 0


def test_fifo_each_item_once_oldest_first():
    t = _table("fifo", capacity=4)
    t.insert(_rows(0, 3))
    r = t.sample(2)
    assert r.keys.tolist() == [0, 1] and r.columns["x"].tolist() == [0, 1]
    np.testing.assert_array_equal(r.probabilities, [1.0, 1.0])
    assert t.info().size == 1
    t.insert(_rows(3, 6))  # 1 waiting + 3 = capacity
    with pytest.raises(DeadlineExceeded, match="insert of 1 rows blocked.*capacity=4"):
        t.insert(_rows(6, 7), timeout=0)
    assert t.sample(4).columns["x"].tolist() == [2, 3, 4, 5]
    with pytest.raises(DeadlineExceeded, match="sample of 1 rows blocked.*size=0"):
        t.sample(1, timeout=0)
    t.insert(_rows(6, 8))
    assert t.sample(1).keys.tolist() == [6]
    info = t.info()
    assert (info.inserts, info.samples, info.size) == (8, 7, 1)


def test_uniform_probabilities_and_range():
    s = UniformSampler(capacity=10)
    keys, probs = s.sample(batch_size=1000, oldest=37, size=5, rng=np.random.default_rng(1))
    assert keys.dtype == np.uint64 and set(keys.tolist()) == {37, 38, 39, 40, 41}
    np.testing.assert_array_equal(probs, np.full(1000, 0.2))
    assert isinstance(make_sampler("fifo", capacity=3, priority_exponent=0.6), FifoSampler)
    with pytest.raises(ValueError, match="sampler 'lifo'"):
        make_sampler("lifo", capacity=3, priority_exponent=0.6)
