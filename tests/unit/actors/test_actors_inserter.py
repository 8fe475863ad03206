"""AsyncInserter: order, at most one batch in flight, errors surface in the caller, pickling."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from actors.inserter import AsyncInserter


class _Gated:
    """An insert that blocks until released, recording what it got and how many ran at once."""

    def __init__(self):
        self.got, self.running, self.max_running = [], 0, 0
        self.release = threading.Semaphore(0)
        self.lock = threading.Lock()

    def __call__(self, columns):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.release.acquire()
        with self.lock:
            self.got.append(int(columns["x"][0]))
            self.running -= 1


def test_returns_immediately_keeps_order_and_bounds_in_flight():
    gated = _Gated()
    insert = AsyncInserter(gated)
    insert({"x": np.array([0])})            # returns while the send is blocked
    assert gated.got == []
    done = threading.Event()

    def second():
        insert({"x": np.array([1])})        # must wait for batch 0 (one in flight)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.2)
    gated.release.release()                 # batch 0 stored -> second call proceeds
    assert done.wait(5)
    gated.release.release()
    insert.flush()
    assert gated.got == [0, 1] and gated.max_running == 1
    insert.close()


def test_errors_surface_on_the_next_call_and_on_flush():
    calls = []

    def failing(columns):
        calls.append(columns)
        raise ConnectionError("shard 127.0.0.1:7 unavailable")

    insert = AsyncInserter(failing)
    insert({"x": np.array([0])})
    with pytest.raises(ConnectionError, match="unavailable"):
        insert({"x": np.array([1])})
    insert2 = AsyncInserter(failing)
    insert2({"x": np.array([2])})
    with pytest.raises(ConnectionError):
        insert2.flush()


def test_pickles_without_its_thread_and_refuses_bad_arguments():
    insert = AsyncInserter(print, max_in_flight=2)
    clone = pickle.loads(pickle.dumps(insert))
    assert clone._max_in_flight == 2 and clone._executor is None
    with pytest.raises(ValueError, match="insert must be callable"):
        AsyncInserter(42)
    with pytest.raises(ValueError, match="max_in_flight must be an integer >= 1, got 0"):
        AsyncInserter(print, max_in_flight=0)
