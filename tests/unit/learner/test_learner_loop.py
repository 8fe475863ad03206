"""Prefetcher and LearnerLoop, driven by in-process fakes (the real wiring is tested in integration)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from learner.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from learner.core import DeferredResult, InvalidBatch, UpdateResult, packed_result
from learner.loop import Batch, LearnerLoop, Prefetcher


def _batch(raw):
    keys, version = raw
    return Batch(tensors={"x": torch.ones(2)}, keys=keys, weights=None, policy_version=version)


def _source(items):
    """A Prefetcher sample function over (keys, version) pairs; None once exhausted."""
    it = iter(items)

    def sample(_timeout):
        raw = next(it, None)
        return None if raw is None else _batch(raw)

    return sample


class _Algorithm:
    """A learner.core.Algorithm double: counts updates; priorities only when asked for."""

    def __init__(self, *, priorities: bool = True):
        self.calls = 0
        self.priorities = priorities
        self.net = torch.nn.Linear(1, 1)

    def update(self, tensors, *, weights=None):
        self.calls += 1
        return UpdateResult(metrics={"loss": 1.0 / self.calls},
                            priorities=np.full(2, float(self.calls)) if self.priorities else None)

    def acting_weights(self):
        return {"w": torch.tensor([float(self.calls)])}

    def acting_network(self):
        return self.net


class _EveryOther:
    """Diagnostics double: due on every second step; checks before_step precedes after_step."""

    def __init__(self):
        self.steps, self.armed = 0, False

    def before_step(self):
        self.armed = True

    def after_step(self, *, loss_batch):
        assert self.armed and torch.equal(loss_batch["x"], torch.ones(2))
        self.armed = False
        self.steps += 1
        return {"srank": 7.0} if self.steps % 2 == 0 else {}


def test_prefetcher_retries_on_none_and_delivers_in_order():
    source = iter([None, (np.array([1, 2], dtype=np.uint64), np.array([0, 0])), None,
                   (np.array([3, 4], dtype=np.uint64), np.array([0, 0]))])
    lock = threading.Lock()

    def sample(_timeout):
        with lock:
            raw = next(source, None)
        return None if raw is None else _batch(raw)

    pre = Prefetcher(sample=sample, depth=2, poll_timeout_s=0.01).start()
    try:
        assert pre.get(timeout=5).keys.tolist() == [1, 2]
        assert pre.get(timeout=5).keys.tolist() == [3, 4]
        assert pre.get(timeout=0.05) is None
    finally:
        pre.stop()


def test_prefetcher_surfaces_sampling_errors():
    def sample(_timeout):
        raise ConnectionError("shard 127.0.0.1:1 unavailable")

    pre = Prefetcher(sample=sample, depth=1, poll_timeout_s=0.01).start()
    with pytest.raises(RuntimeError, match="shard 127.0.0.1:1 unavailable"):
        pre.get(timeout=5)
    pre.stop()


def test_prefetcher_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        Prefetcher(sample=lambda t: None, depth=0)


def test_loop_updates_writes_priorities_publishes_and_measures_lag():
    batches = [(np.array([10 * i, 10 * i + 1], dtype=np.uint64), np.array([0, 2])) for i in range(6)]
    written, published = [], []
    algorithm = _Algorithm()
    pre = Prefetcher(sample=_source(batches), depth=2, poll_timeout_s=0.01).start()
    loop = LearnerLoop(algorithm=algorithm, prefetcher=pre,
                       update_priorities=lambda k, p: written.append((k.tolist(), p.tolist())),
                       publish=lambda v, w, net: published.append((v, float(w["w"][0]), net is algorithm.net)),
                       publish_every=3, diagnostics={"q": _EveryOther()})
    metrics = [loop.step(timeout=5) for _ in range(6)]
    loop.close()
    assert [m["loss"] for m in metrics] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    assert [("diag/srank" in m) for m in metrics] == [False, True, False, True, False, True]
    assert loop.last_diagnostics == {"diag/srank": 7.0}
    assert published == [(3, 3.0, True), (6, 6.0, True)]
    assert written[0] == ([0, 1], [1.0, 1.0]) and written[5] == ([50, 51], [6.0, 6.0])
    # lag = published version - mean(policy_version) = {0,0,0,3,3,3} - 1
    assert loop.take_policy_lag() == pytest.approx(np.mean([-1, -1, -1, 2, 2, 2]))
    assert loop.take_policy_lag() is None


class _Deferring(_Algorithm):
    """Hands back each update's result the way a GPU algorithm does with defer=True (a DeferredResult)."""

    supports_defer = True

    def update(self, tensors, *, weights=None, defer=False):
        assert defer, "the loop asks supporting algorithms to defer"
        self.calls += 1
        return DeferredResult(torch.tensor([float(self.calls)] * 2 + [1.0 / self.calls]), size=2, names=["loss"],
                              metrics={"step": float(self.calls)})


def test_deferred_results_are_read_one_update_later_and_the_last_at_flush():
    batches = [(np.array([10 * i, 10 * i + 1], dtype=np.uint64), np.array([0, 0])) for i in range(3)]
    written = []
    pre = Prefetcher(sample=_source(batches), depth=2, poll_timeout_s=0.01).start()
    loop = LearnerLoop(algorithm=_Deferring(), prefetcher=pre, publish=lambda v, w, net: None,
                       update_priorities=lambda k, p: written.append((k.tolist(), p.tolist())))
    first, second, third = (loop.step(timeout=5) for _ in range(3))
    assert first == {} and loop.counters.updates == 3   # counted at once, read one update later
    assert second == {"step": 1.0, "loss": 1.0} and third == {"step": 2.0, "loss": 0.5}
    assert loop.flush() == {"step": 3.0, "loss": pytest.approx(1 / 3)} and loop.flush() is None
    loop.close()
    # every batch's priorities went back to its own keys
    assert written == [([0, 1], [1.0, 1.0]), ([10, 11], [2.0, 2.0]), ([20, 21], [3.0, 3.0])]


def test_packed_result_reads_now_on_the_cpu_even_when_asked_to_defer():
    result = packed_result(torch.tensor([0.5, 2.0]), ["loss"], torch.tensor([3.0]), {"lr": 0.1}, defer=True)
    assert isinstance(result, UpdateResult)
    assert result.metrics == {"lr": 0.1, "loss": 3.0} and result.priorities.tolist() == [0.5, 2.0]


def test_loop_raises_when_priority_updates_fail():
    pre = Prefetcher(sample=_source([(np.array([1], dtype=np.uint64), None)] * 3), depth=1,
                     poll_timeout_s=0.01).start()

    def fail(keys, prios):
        raise ConnectionError("owner shard gone")

    loop = LearnerLoop(algorithm=_Algorithm(), prefetcher=pre, update_priorities=fail,
                       publish=lambda v, w, net: None)
    loop.step(timeout=5)
    loop._priorities.close()  # drain: the failure is recorded
    with pytest.raises(RuntimeError, match="owner shard gone"):
        loop.step(timeout=5)
    pre.stop()


def test_loop_with_two_networks_prefixes_diagnostics_and_skips_absent_priorities():
    written = []
    pre = Prefetcher(sample=_source([(np.array([1, 2], dtype=np.uint64), np.array([0, 0]))] * 2), depth=1,
                     poll_timeout_s=0.01).start()
    loop = LearnerLoop(algorithm=_Algorithm(priorities=False), prefetcher=pre,
                       update_priorities=lambda k, p: written.append(k), publish=lambda v, w, net: None,
                       diagnostics={"actor": _EveryOther(), "critic": _EveryOther()})
    loop.step(timeout=5)
    second = loop.step(timeout=5)
    loop.close()
    assert {k: v for k, v in second.items() if k.startswith("diag/")} == {"diag/actor/srank": 7.0,
                                                                          "diag/critic/srank": 7.0}
    assert written == []  # the algorithm returned no priorities: nothing to write back


class _RefusesOdd(_Algorithm):
    """Refuses every other batch as invalid, as DQN refuses e.g. an action outside its range."""

    def update(self, tensors, *, weights=None):
        if (self.calls + self.refused) % 2:
            self.refused += 1
            raise InvalidBatch("batch['action'] holds values outside [0, 2): min 0, max 7")
        return super().update(tensors, weights=weights)


def test_invalid_batches_are_dropped_counted_and_the_loop_goes_on(caplog):
    algorithm = _RefusesOdd()
    algorithm.refused = 0
    pre = Prefetcher(sample=_source([(np.array([i], dtype=np.uint64), None) for i in range(6)]), depth=1,
                     poll_timeout_s=0.01).start()
    loop = LearnerLoop(algorithm=algorithm, prefetcher=pre, update_priorities=None, publish=lambda v, w, net: None)
    with caplog.at_level("WARNING", logger="learner.loop"):
        results = [loop.step(timeout=5) for _ in range(6)]
    loop.close()
    assert [r is not None for r in results] == [True, False, True, False, True, False]
    assert loop.counters.dropped_batches == 3 and loop.counters.updates == 3
    assert "dropped an invalid batch (3 so far): batch['action'] holds values outside [0, 2)" in caplog.text


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, {"step": step, "w": torch.tensor([step])}, step=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["learner-000000000020.pt", "learner-000000000030.pt"]
    # a torn write (leftover tmp file) is ignored
    (tmp_path / ".learner-000000000040.pt.tmp").write_bytes(b"garbage")
    assert load_latest_checkpoint(tmp_path)["step"] == 30
    assert load_latest_checkpoint(tmp_path / "missing") is None


def test_discard_drops_what_was_sampled_before_it_and_the_call_in_flight():
    """After a replay flush no update may train on flushed rows: queued, half-handed-out and in-flight
    calls are dropped; a sampling failure is still raised."""
    release = threading.Event()
    calls = []

    def sample(_timeout):
        calls.append(len(calls))
        if len(calls) == 3:          # the call in flight when discard() runs
            release.wait(5)
        tag = len(calls)
        return [Batch(tensors={"tag": torch.tensor(tag)}, keys=np.zeros(1, np.uint64), weights=None)
                for _ in range(2)]

    p = Prefetcher(sample=sample, depth=2, poll_timeout_s=0.05).start()
    try:
        first = p.get(timeout=5)     # call 1, batch 0; its batch 1 waits on the consumer side
        assert int(first.tensors["tag"]) == 1
        deadline = time.time() + 5
        while len(calls) < 3 and time.time() < deadline:  # call 2 queued, call 3 in flight
            time.sleep(0.01)
        assert p.discard() == 3      # call 1's second batch and call 2's two
        release.set()
        after = p.get(timeout=5)
        assert int(after.tensors["tag"]) >= 4  # call 3 (sampled before the discard) never comes out
    finally:
        release.set()
        p.stop()


def test_discard_drops_a_call_that_was_waiting_for_room_in_the_queue():
    """The sampling thread may hold a finished call while the queue is full; discard() drains the queue,
    the thread then queues that call: it was sampled before the discard and must never be handed out."""
    calls = []

    def sample(_timeout):
        calls.append(len(calls))
        return [Batch(tensors={"tag": torch.tensor(len(calls))}, keys=np.zeros(1, np.uint64), weights=None)]

    p = Prefetcher(sample=sample, depth=1, poll_timeout_s=0.05).start()
    try:
        deadline = time.time() + 5
        while len(calls) < 2 and time.time() < deadline:   # call 1 queued, call 2 waits for room
            time.sleep(0.01)
        time.sleep(0.05)
        assert p.discard() == 1
        after = p.get(timeout=5)
        assert int(after.tensors["tag"]) >= 3 and p.late_discarded == 1   # call 2 was dropped on the way out
    finally:
        p.stop()


def test_discard_keeps_a_sampling_failure():
    def sample(_timeout):
        raise OSError("replay gone")

    p = Prefetcher(sample=sample, depth=2, poll_timeout_s=0.05).start()
    try:
        time.sleep(0.2)
        assert p.discard() == 0
        with pytest.raises(RuntimeError, match="replay gone"):
            p.get(timeout=5)
    finally:
        p.stop()
