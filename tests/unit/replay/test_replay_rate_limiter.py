"""Rate limiter arithmetic (exact sequences of allowed/blocked calls), timeouts, blocking, cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from replay.errors import Cancelled, DeadlineExceeded, FailedPrecondition
from replay.rate_limiter import RateLimiter
from replay.schema import Schema
from replay.table import Table, TableConfig

SCHEMA = Schema.parse("x:int64")


def _rows(n, start=0):
    return {"x": np.arange(start, start + n, dtype=np.int64)}


def _table(**kw) -> Table:
    kw.setdefault("capacity", 1000)
    return Table(TableConfig(name="t", schema=SCHEMA, **kw))


def _wait_until_blocked(table: Table, waiters: int = 1) -> None:
    """Wait until ``waiters`` threads sit in the table's Condition (so blocked time is really counted)."""
    ev = threading.Event()
    for _ in range(3000):
        if len(table._cond._waiters) >= waiters:
            return
        ev.wait(0.01)
    raise AssertionError("caller never blocked")


def test_limiter_arithmetic_exact():
    rl = RateLimiter(min_size_to_sample=10, samples_per_insert=1.0, error_buffer=1.0)
    assert (rl.min_diff, rl.max_diff) == (9.0, 11.0)
    assert rl.can_insert(9, size=0)
    rl.record_insert(9)
    assert not rl.can_sample(1, size=9)  # below min size
    assert rl.can_insert(5, size=9)  # size < min size: never blocked, even past max_diff
    rl.record_insert(5)  # inserts=14, diff=14
    assert not rl.can_insert(1, size=14)  # 15 > 11
    assert rl.can_sample(5, size=14) and not rl.can_sample(6, size=14)  # 14-5 = 9 >= 9; 14-6 < 9
    rl.record_sample(5)  # diff 9
    assert not rl.can_sample(1, size=14)
    assert rl.can_insert(2, size=14) and not rl.can_insert(3, size=14)  # 16-5 = 11 <= 11; 17-5 > 11
    assert rl.diff == 9.0


def test_limiter_fractional_ratio():
    rl = RateLimiter(min_size_to_sample=4, samples_per_insert=0.5, error_buffer=1.0)
    assert (rl.min_diff, rl.max_diff) == (1.0, 3.0)
    rl.record_insert(4)  # diff 2
    assert rl.can_sample(1, size=4) and not rl.can_sample(2, size=4)
    assert rl.can_insert(2, size=4) and not rl.can_insert(3, size=4)  # 3.0 <= 3; 3.5 > 3


def test_no_ratio_only_min_size():
    rl = RateLimiter(min_size_to_sample=3)
    assert rl.can_insert(10**6, size=10**6)
    assert not rl.can_sample(1, size=2) and rl.can_sample(1000, size=3)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(min_size_to_sample=0), "min_size_to_sample 0"),
        (dict(min_size_to_sample=1, samples_per_insert=0.0), "samples_per_insert 0.0"),
        (dict(min_size_to_sample=1, samples_per_insert=float("nan")), "samples_per_insert nan"),
        (dict(min_size_to_sample=1, samples_per_insert=4.0, error_buffer=3.0), r"error_buffer 3.0 is smaller than"),
        (dict(min_size_to_sample=1, samples_per_insert=0.5, error_buffer=0.5), r"max\(1, samples_per_insert\) = 1.0"),
    ],
)
def test_bad_configs_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RateLimiter(**kw)


def test_table_sequence_which_calls_block():
    t = _table(min_size_to_sample=10, samples_per_insert=1.0, error_buffer=1.0)
    t.insert(_rows(9))
    with pytest.raises(DeadlineExceeded, match=r"sample of 1 rows blocked .*size=9, min_size_to_sample=10"):
        t.sample(1, timeout=0)
    t.insert(_rows(5, 9))
    with pytest.raises(DeadlineExceeded, match=r"insert of 1 rows blocked .*inserts=14, samples=0.*max_diff=11"):
        t.insert(_rows(1, 14), timeout=0)
    assert t.sample(5).table_size == 14
    with pytest.raises(DeadlineExceeded, match=r"sample of 1 rows blocked .*diff=inserts\*spi-samples=9"):
        t.sample(1, timeout=0.01)
    t.insert(_rows(2, 14))
    with pytest.raises(DeadlineExceeded):
        t.insert(_rows(1, 16), timeout=0)
    info = t.info()
    assert (info.inserts, info.samples, info.size) == (16, 5, 16)
    # timeout=0 calls fail without waiting (bound generous for a loaded machine); the 0.01 s sample waited
    assert info.insert_blocked_s < 0.25 and 0.01 <= info.sample_blocked_s < 0.5


def test_calls_that_can_never_proceed_are_refused():
    t = _table(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=2.0)  # band [0, 4]
    t.insert(_rows(3))  # diff 3
    with pytest.raises(FailedPrecondition, match=r"insert of 5 rows can never proceed.*2\*error_buffer = 4"):
        t.insert(_rows(5, 3))
    with pytest.raises(FailedPrecondition, match=r"sample of 5 rows can never proceed.*max_diff 4"):
        t.sample(5)
    assert t.info().size == 3  # nothing written
    # A batch that fits the band but must wait is a timeout, not a refusal.
    with pytest.raises(DeadlineExceeded):
        t.sample(4, timeout=0)


def test_blocked_sample_unblocked_by_insert_counts_blocked_time():
    t = _table(min_size_to_sample=4)
    t.insert(_rows(2))
    out = {}

    def sampler():
        out["r"] = t.sample(3, timeout=30)

    th = threading.Thread(target=sampler)
    th.start()
    _wait_until_blocked(t)
    assert th.is_alive()  # still blocked: size 2 < 4
    t.insert(_rows(2, 2))
    th.join(30)
    assert not th.is_alive() and out["r"].table_size == 4
    info = t.info()
    assert info.sample_blocked_s > 0.0 and info.insert_blocked_s == 0.0
    assert (info.inserts, info.samples) == (4, 3)


def test_blocked_insert_unblocked_by_sample():
    t = _table(min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1.0)  # band [0, 2]
    t.insert(_rows(2))  # diff 2
    done = threading.Event()

    def inserter():
        t.insert(_rows(1, 2), timeout=30)
        done.set()

    th = threading.Thread(target=inserter)
    th.start()
    _wait_until_blocked(t)
    assert not done.is_set()
    t.sample(1)  # diff 1 -> insert of 1 brings it to 2 <= 2
    th.join(30)
    assert done.is_set()
    info = t.info()
    assert info.insert_blocked_s > 0.0 and (info.inserts, info.samples) == (3, 1)


def test_close_cancels_blocked_callers():
    t = _table(min_size_to_sample=5)
    errors = []

    def sampler():
        try:
            t.sample(1)
        except Cancelled as err:
            errors.append(str(err))

    th = threading.Thread(target=sampler)
    th.start()
    _wait_until_blocked(t)
    t.close()
    th.join(30)
    assert errors == ["sample of 1 rows: table closed while the call was blocked"]
    with pytest.raises(Cancelled, match="table is closed"):
        t.insert(_rows(1))
