"""Rate limiters (samples-per-insert and FIFO queue): exact sequences of allowed/blocked calls, timeouts,
blocking, cancellation, state, and which one a table picks."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from replay.errors import Cancelled, DeadlineExceeded, FailedPrecondition
from replay.rate_limiter import QueueRateLimiter, RateLimiter
from replay.samplers import make_sampler
from replay.schema import Schema
from replay.table import Table, TableConfig, make_rate_limiter

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


# ---------------------------------------------------------------------------------------- queue limiter
def test_queue_full_blocks_inserts_exactly_at_capacity():
    q = QueueRateLimiter(capacity=4)
    assert q.can_insert(4, size=0) and not q.can_insert(5, size=0)
    assert q.can_insert(2, size=2) and not q.can_insert(3, size=2)
    assert not q.can_insert(1, size=4)
    assert q.insert_never_possible(1, size=4) is None  # a sample frees room: the insert waits


def test_queue_refuses_an_insert_larger_than_capacity():
    q = QueueRateLimiter(capacity=4)
    assert q.insert_never_possible(5, size=0) == (
        "an insert of 5 rows is larger than the queue capacity 4, so even an empty queue could not take it; "
        "insert at most 4 rows per call"
    )
    with pytest.raises(FailedPrecondition) as err:
        q.wait(threading.Condition(), side="insert", rows=5, ready=lambda: q.can_insert(5, size=0),
               never=lambda: q.insert_never_possible(5, size=0), closed=lambda: False,
               describe=lambda: q.describe(size=0), timeout=None)
    assert str(err.value).startswith("insert of 5 rows can never proceed: an insert of 5 rows is larger than "
                                     "the queue capacity 4")
    assert q.insert_blocked_s == 0.0  # refused before blocking


def test_queue_sample_waits_for_enough_unread_items():
    q = QueueRateLimiter(capacity=8, min_size_to_sample=3)
    assert not q.can_sample(1, size=2)  # below min size
    assert q.can_sample(3, size=3) and not q.can_sample(4, size=3)  # needs 4 unread items
    assert q.sample_never_possible(8, size=0) is None  # inserts can still bring 8 unread items
    assert q.sample_never_possible(9, size=8) == (
        "a sample of 9 rows needs 9 unread items but the queue holds at most capacity 8; "
        "sample at most 8 rows per call"
    )


def test_queue_keeps_the_ratio_band_of_samples_per_insert_one():
    q = QueueRateLimiter(capacity=10, min_size_to_sample=2, samples_per_insert=1, error_buffer=1.0)
    assert (q.min_diff, q.max_diff) == (1.0, 3.0)
    q.record_insert(3)  # diff 3
    assert not q.can_insert(1, size=3)  # room for 7 more, but 4 > max_diff 3
    assert q.can_sample(2, size=3) and not q.can_sample(3, size=3)  # 3 - 3 < min_diff 1


def test_queue_describe_names_capacity():
    q = QueueRateLimiter(capacity=4)
    q.record_insert(4)
    assert q.describe(size=4) == (
        "size=4, min_size_to_sample=1, inserts=4, samples=0, capacity=4 "
        "(queue: inserts wait for room, samples for batch_size unread items)"
    )


def test_queue_blocked_insert_is_woken_when_a_sample_frees_room():
    q = QueueRateLimiter(capacity=2)
    cond = threading.Condition()
    state = {"size": 2}
    done = threading.Event()

    def inserter():
        with cond:
            q.wait(cond, side="insert", rows=1, ready=lambda: q.can_insert(1, size=state["size"]),
                   never=lambda: q.insert_never_possible(1, size=state["size"]), closed=lambda: False,
                   describe=lambda: q.describe(size=state["size"]), timeout=30)
        done.set()

    th = threading.Thread(target=inserter)
    th.start()
    for _ in range(3000):
        with cond:
            if cond._waiters:
                break
        threading.Event().wait(0.01)
    assert not done.is_set()
    with cond:
        state["size"] = 1  # one item consumed
        cond.notify_all()
    th.join(30)
    assert done.is_set() and q.insert_blocked_s > 0.0 and q.sample_blocked_s == 0.0


def test_queue_state_round_trip():
    q = QueueRateLimiter(capacity=4)
    q.record_insert(7)
    q.record_sample(5)
    q.insert_blocked_s = 1.5
    state = q.state_dict()
    assert state == {"inserts": 7, "samples": 5, "insert_blocked_s": 1.5, "sample_blocked_s": 0.0, "shift": "0",
                     "inserts_released": False}
    r = QueueRateLimiter(capacity=4)
    r.load_state_dict(state)
    assert (r.inserts, r.samples, r.insert_blocked_s, r.sample_blocked_s, r.capacity) == (7, 5, 1.5, 0.0, 4)
    with pytest.raises(ValueError, match="inserts=-1, samples=0; expected >= 0"):
        r.load_state_dict({"inserts": -1, "samples": 0})
    assert (r.inserts, r.samples) == (7, 5)  # a refused state changes nothing


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(capacity=0), "queue capacity 0: expected an int >= 1"),
        (dict(capacity=-3), "queue capacity -3: expected an int >= 1"),
        (dict(capacity=2.5), "queue capacity 2.5: expected an int >= 1"),
        (dict(capacity=True), "queue capacity True: expected an int >= 1"),
        (dict(capacity=4, samples_per_insert=2.0, error_buffer=2.0), r"samples_per_insert 2.0: a queue samples"),
        (dict(capacity=4, samples_per_insert=0.5), r"samples_per_insert 0.5: .*expected None or 1"),
        (dict(capacity=4, min_size_to_sample=5), r"min_size_to_sample 5 > queue capacity 4"),
        (dict(capacity=4, min_size_to_sample=0), "min_size_to_sample 0: expected an int >= 1"),
    ],
)
def test_queue_bad_configs_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QueueRateLimiter(**kw)


@pytest.mark.parametrize("sampler, limiter", [("fifo", QueueRateLimiter), ("uniform", RateLimiter),
                                              ("prioritized", RateLimiter)])
def test_table_picks_the_limiter_by_sampler(sampler, limiter):
    cfg = TableConfig(name="t", schema=SCHEMA, capacity=6, sampler=sampler, min_size_to_sample=2)
    rl = make_rate_limiter(cfg, make_sampler(sampler, capacity=6, priority_exponent=0.6))
    assert type(rl) is limiter and rl.min_size_to_sample == 2
    assert type(Table(cfg)._limiter) is limiter
    if limiter is QueueRateLimiter:
        assert rl.capacity == 6


def test_fifo_table_blocks_through_the_queue_limiter():
    t = _table(sampler="fifo", capacity=4)
    t.insert(_rows(4))
    with pytest.raises(DeadlineExceeded, match=r"insert of 1 rows blocked .*size=4, .*capacity=4 \(queue: "):
        t.insert(_rows(1, 4), timeout=0)
    out = {}

    def sampler():
        out["keys"] = t.sample(3, timeout=30).keys.tolist()

    assert t.sample(2).keys.tolist() == [0, 1]
    th = threading.Thread(target=sampler)
    th.start()
    _wait_until_blocked(t)  # 2 unread items, the sample needs 3
    t.insert(_rows(1, 4))
    th.join(30)
    assert out["keys"] == [2, 3, 4]
    info = t.info()
    assert (info.inserts, info.samples, info.size) == (5, 5, 0) and info.sample_blocked_s > 0.0


# ------------------------------------------------------------------------- band boundary and rebase
# (samples_per_insert, error_buffer, min_size_to_sample, rows) with rows * spi == 2 * error_buffer exactly, and
# offset - error_buffer an integer, so that single-row samples can bring diff down to min_diff exactly. In
# floats 30 * 0.1 is 3.0000000000000004 > 3.0, which made the insert look like it could never fit.
BOUNDARY = [(1.0, 2.0, 1, 4), (0.1, 1.5, 5, 30), (1 / 3, 2.0, 3, 12)]


@pytest.mark.parametrize(("spi", "error_buffer", "min_size", "rows"), BOUNDARY, ids=["integers", "tenths", "thirds"])
def test_an_insert_that_exactly_fills_the_band_waits_and_is_not_refused(spi, error_buffer, min_size, rows):
    rl = RateLimiter(min_size_to_sample=min_size, samples_per_insert=spi, error_buffer=error_buffer)
    rl.record_insert(rows)                                  # diff = rows * spi = 2 * error_buffer
    assert rl.diff == pytest.approx(2 * error_buffer)
    assert not rl.can_insert(rows, size=rows)
    assert rl.insert_never_possible(rows, size=rows) is None          # waits for samples ...
    assert rl.insert_never_possible(rows + 1, size=rows) is not None  # ... one row more could never fit
    samples = 0
    while rl.can_sample(1, size=rows):
        rl.record_sample(1)
        samples += 1
    assert samples == round(2 * error_buffer - rl.min_diff) and rl.diff == pytest.approx(rl.min_diff)
    assert rl.can_insert(rows, size=rows)                  # exactly fills the band: min_diff + 2 eb = max_diff


def test_a_blocked_insert_that_exactly_fills_the_band_proceeds_after_samples():
    t = _table(min_size_to_sample=5, samples_per_insert=0.1, error_buffer=1.5)   # band [-1, 2]
    t.insert(_rows(30))                                                           # diff 3
    done = threading.Event()
    errors = []

    def inserter():
        try:
            t.insert(_rows(30, 30), timeout=30)
            done.set()
        except Exception as err:   # the bug: FailedPrecondition "can never proceed"
            errors.append(err)

    th = threading.Thread(target=inserter)
    th.start()
    _wait_until_blocked(t)
    assert not done.is_set() and errors == []
    for _ in range(4):                                     # diff 3 -> -1 = min_diff: 3 more fit exactly
        t.sample(1)
    th.join(30)
    assert errors == [] and done.is_set()
    assert (t.info().inserts, t.info().samples) == (60, 4)


def test_rebase_recentres_the_band_and_keeps_the_totals():
    rl = RateLimiter(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=3.0)   # offset 2, band [-1, 5]
    rl.record_insert(10)
    rl.record_sample(3)                             # diff 7: above max_diff, inserts blocked
    assert not rl.can_insert(1, size=10) and rl.can_sample(8, size=10) and not rl.can_sample(9, size=10)
    rl.rebase()
    assert (rl.inserts, rl.samples, rl.diff, rl.min_diff, rl.max_diff) == (10, 3, 2.0, -1.0, 5.0)
    assert rl.can_insert(3, size=10) and not rl.can_insert(4, size=10)
    assert rl.can_sample(3, size=10) and not rl.can_sample(4, size=10)
    state = rl.state_dict()
    assert state["shift"] == "5"
    other = RateLimiter(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=3.0)
    other.load_state_dict(state)
    assert other.diff == 2.0 and other.can_insert(3, size=10) and not other.can_insert(4, size=10)


def test_rebase_with_a_fractional_ratio_is_exact():
    rl = RateLimiter(min_size_to_sample=3, samples_per_insert=1 / 3, error_buffer=1.0)   # offset 1, band [0, 2]
    rl.record_insert(7)
    rl.record_sample(1)                                    # diff 7/3 - 1 = 4/3
    rl.rebase()
    assert rl.diff == 1.0 and rl.state_dict()["shift"] == "1/3"
    assert rl.can_insert(3, size=7) and not rl.can_insert(4, size=7)     # 1 + 3/3 = 2 = max_diff


class _Guard:
    def __init__(self, *, refuse=False, left=None):
        self.refuse, self.left = refuse, left
        self.gone = False
        self.wake = None
        self.entered = self.exited = 0

    def enter(self, wake):
        if self.refuse:
            raise FailedPrecondition("no slot")
        self.entered += 1
        self.wake = wake

    def exit(self):
        self.exited += 1

    def cancelled(self):
        return self.gone

    def time_left(self):
        return self.left


def test_a_guard_ends_a_wait_when_its_caller_goes_away():
    t = _table(min_size_to_sample=5)
    guard = _Guard()
    out = []

    def sampler():
        try:
            t.sample(1, guard=guard)
        except Cancelled as err:
            out.append(str(err))

    th = threading.Thread(target=sampler)
    th.start()
    _wait_until_blocked(t)
    guard.gone = True
    guard.wake()
    th.join(5)
    assert out == ["sample of 1 rows: the caller went away while the call was blocked"]
    assert (guard.entered, guard.exited) == (1, 1)


def test_a_guard_bounds_the_wait_by_its_deadline_and_may_refuse_to_block():
    t = _table(min_size_to_sample=5)
    with pytest.raises(DeadlineExceeded, match=r"timeout None s"):
        t.sample(1, guard=_Guard(left=0.05))
    with pytest.raises(FailedPrecondition, match="no slot"):
        t.sample(1, guard=_Guard(refuse=True))
    refusing = _Guard(refuse=True)
    with pytest.raises(DeadlineExceeded, match="timeout 0 s"):
        t.sample(1, timeout=0, guard=refusing)              # a call that would not wait never asks for a slot
    t.insert(_rows(5))
    assert t.sample(1, guard=refusing).keys.size == 1     # nor does one that need not wait


def test_released_inserts_never_wait_and_tying_them_again_rebases():
    rl = RateLimiter(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=3.0)   # offset 2, band [-1, 5]
    rl.record_insert(5)                             # diff 5: at max_diff
    assert not rl.can_insert(1, size=5)
    rl.release_inserts()
    assert rl.can_insert(1_000, size=5) and "inserts released" in rl.describe(size=5)
    assert rl.insert_never_possible(1_000, size=5) is None
    rl.record_insert(1_000)                         # diff 1005: without the rebase a burst of 1000 samples
    state = rl.state_dict()
    rl.release_inserts(False)
    assert (rl.inserts, rl.diff, rl.inserts_released) == (1_005, 2.0, False)
    assert rl.can_sample(3, size=100) and not rl.can_sample(4, size=100)   # no burst for the returning sampler
    assert rl.can_insert(3, size=100) and not rl.can_insert(4, size=100)   # and inserts are tied again
    restored = RateLimiter(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=3.0)
    restored.load_state_dict(state)                 # a shard restored while the table was released
    assert restored.inserts_released and restored.can_insert(10, size=5)
    rl.release_inserts(False)                       # tying twice does not move the band again
    assert rl.diff == 2.0


def test_queue_inserts_cannot_be_released():
    q = QueueRateLimiter(capacity=4)
    with pytest.raises(ValueError, match="fifo"):
        q.release_inserts()
    q.release_inserts(False)                        # already tied: a no-op


def test_releasing_a_table_wakes_its_blocked_insert():
    t = _table(min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1.0)  # band [0, 2]
    t.insert(_rows(2))
    done = threading.Event()

    def inserter():
        t.insert(_rows(1, 2), timeout=30)
        done.set()

    th = threading.Thread(target=inserter)
    th.start()
    _wait_until_blocked(t)
    assert "inserts released" in t.release_inserts(True)   # nobody samples: the insert must not wait for good
    th.join(30)
    assert done.is_set() and t.info().inserts == 3
    t.release_inserts(False)
    with pytest.raises(DeadlineExceeded):
        t.insert(_rows(2, 3), timeout=0)          # tied again at the middle of the band: 2 rows overshoot it
