"""The learner loop: prefetch, update, priority write-back, weight publishing, diagnostics.

Transport-free: it is handed callables, so it runs the same against a gRPC replay client, an
in-process table or a test double. ``learner.service.LearnerService`` passes the real ones::

    dataset = ReplayDataset(client, batch_size=64, prioritized=True)
    prefetcher = Prefetcher(sample=dataset.sample, depth=4).start()
    loop = LearnerLoop(algorithm=dqn, prefetcher=prefetcher,
                       update_priorities=client.update_priorities,
                       publish=publisher, publish_every=50)     # publisher(version, weights, network)
    while not done:
        metrics = loop.step()           # one update; never waits on the network unless replay is empty
    loop.close()
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from learner.core import DeferredResult, InvalidBatch
from learner.dataset import Batch

log = logging.getLogger(__name__)

__all__ = ["Batch", "LearnerLoop", "LoopCounters", "Prefetcher"]


class Prefetcher:
    """A background thread that keeps the results of ``depth`` sample calls ready.

    ``sample(timeout_s)`` returns a :class:`Batch`, a list of them (the batches of one replay call,
    handed out in order), or ``None`` when nothing could be sampled within the timeout (replay still
    filling, or the rate limiter holding the learner back); the thread retries, which keeps it
    responsive to ``stop()``. Any other exception is re-raised in the consumer on the next ``get`` so
    that failures are not swallowed by the thread.

    A list travels through the queue as one item and is unpacked on the consumer's side: for a small
    network an update takes about as long as waking a thread, so the sampling thread should wake once
    per replay call, not once per batch (each wake-up also takes the GIL from the update).
    """

    def __init__(
        self,
        *,
        sample: Callable[[float], Batch | None],
        depth: int = 4,
        poll_timeout_s: float = 0.5,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._sample, self._poll = sample, poll_timeout_s
        # Items travel with the discard() epoch they were sampled in (see get()).
        self._queue: queue.Queue[tuple[int, list[Batch] | BaseException]] = queue.Queue(maxsize=depth)
        self._ready: collections.deque[Batch] = collections.deque()  # consumer side: the rest of a call's batches
        self._stop = threading.Event()
        # Bumped by discard(): a sample call that started before it is dropped, not queued; and one queued
        # after discard() drained the queue (the thread was waiting for room) is dropped by get().
        self._epoch = 0
        self.late_discarded = 0
        """Batches dropped by ``get`` because they were sampled before a ``discard()`` that missed them."""
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.wait_seconds = 0.0
        """Total time the consumer spent blocked in ``get`` (the learner starved of data)."""

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            epoch = self._epoch
            try:
                item: list[Batch] | Batch | BaseException | None = self._sample(self._poll)
                if item is None:
                    continue
                if isinstance(item, Batch):
                    item = [item]
                elif not item:
                    continue
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                item = exc
            if epoch != self._epoch and not isinstance(item, BaseException):
                continue  # sampled before a discard(): from the replay contents it asked to forget
            while not self._stop.is_set():
                try:
                    self._queue.put((epoch, item), timeout=self._poll)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self, *, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none arrived within ``timeout`` seconds."""
        if self._ready:
            return self._ready.popleft()
        start = time.perf_counter()
        try:
            while True:
                epoch, item = self._queue.get(timeout=timeout)
                if epoch == self._epoch or isinstance(item, BaseException):
                    break
                self.late_discarded += len(item)
        except queue.Empty:
            return None
        finally:
            self.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise RuntimeError(f"replay sampling failed in the prefetch thread: {item}") from item
        self._ready.extend(item[1:])
        return item[0]

    def discard(self) -> int:
        """Drop every batch sampled so far and not yet handed out (and the call in flight, when it
        returns); returns how many batches were dropped. What a replay flush at a task switch needs:
        otherwise the learner would go on training on the flushed rows for ``depth`` calls."""
        self._epoch += 1
        dropped = len(self._ready)
        self._ready.clear()
        while True:
            try:
                epoch, item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if isinstance(item, BaseException):  # a failure is never dropped: the next get raises it
                self._queue.put_nowait((epoch, item))   # (there is room: it was just taken out)
                return dropped
            dropped += len(item)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)



class _BackgroundCalls:
    """Runs ``fn(*args)`` calls in order on one worker thread (priority updates are fire-and-forget)."""

    def __init__(self, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - surfaced by LearnerLoop.step
                self.errors.append(exc)

    def submit(self, fn: Callable, *args: Any) -> None:
        self._queue.put((fn, args))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


@dataclass
class LoopCounters:
    updates: int = 0
    published_version: int = 0
    update_seconds: float = 0.0
    diagnostics_seconds: float = 0.0
    policy_lag_sum: float = 0.0
    policy_lag_count: int = 0
    dropped_batches: int = 0
    """Batches the algorithm refused as invalid (``learner.core.InvalidBatch``): dropped, not trained on."""
    task_rows: dict[int, int] = field(default_factory=dict)
    """Rows trained on per scenario task (from the batches' ``task`` column)."""
    extra: dict[str, float] = field(default_factory=dict)


class LearnerLoop:
    """One ``step()`` = take a prefetched batch, update, write priorities back, maybe publish.

    ``algorithm`` is a :class:`learner.core.Algorithm`. ``publish(version, weights, network)`` is
    called with ``version`` = the number of updates so far, so a transition's ``policy_version`` and
    the learner's version subtract to the policy lag in updates, with the acting network's CPU state
    dict and the live acting network (sent whole when its architecture changed).
    ``diagnostics`` (optional) maps network names to objects with ``before_step()`` and
    ``after_step(loss_batch=...) -> dict`` (:class:`plasticity.diagnostics.Diagnostics`, which keeps
    its own schedule and needs the snapshot right before the update to measure the effective
    learning rate); with more than one network the keys carry the network name
    (``diag/critic/srank``). Their wall time is accounted separately so their cost relative to
    updates can be reported.
    """

    def __init__(
        self,
        *,
        algorithm: Any,
        prefetcher: Prefetcher,
        update_priorities: Callable[[np.ndarray, np.ndarray], Any] | None,
        publish: Callable[[int, dict[str, torch.Tensor], torch.nn.Module], Any],
        publish_every: int = 50,
        diagnostics: Mapping[str, Any] | None = None,
        start_updates: int = 0,
    ):
        self.algorithm = algorithm
        self.prefetcher = prefetcher
        self.publish_fn = publish
        self.publish_every = publish_every
        self.diagnostics = dict(diagnostics or {})
        self.counters = LoopCounters(updates=start_updates, published_version=start_updates)
        self._priorities = _BackgroundCalls("priority-updates") if update_priorities else None
        self._update_priorities = update_priorities
        self.last_diagnostics: dict[str, float] = {}
        # Algorithms that can hand back a GPU update's result without waiting for it (learner.core.DeferredResult).
        self._defer = {"defer": True} if getattr(algorithm, "supports_defer", False) else {}
        self._pending: tuple[DeferredResult, Batch] | None = None

    def publish(self) -> None:
        self.counters.published_version = self.counters.updates
        self.publish_fn(self.counters.updates, self.algorithm.acting_weights(), self.algorithm.acting_network())

    def step(self, *, timeout: float | None = 1.0) -> dict[str, float] | None:
        """One update; None if no batch arrived within ``timeout`` (replay filling or rate-limited) or the
        batch was invalid (counted in ``counters.dropped_batches``, logged, and skipped)."""
        batch = self.next_batch(timeout=timeout)
        return None if batch is None else self.train_on(batch)

    def next_batch(self, *, timeout: float | None = 1.0) -> Batch | None:
        """The next prefetched batch, or None if none arrived within ``timeout``; raises a failed priority update."""
        if self._priorities is not None and self._priorities.errors:
            raise RuntimeError(f"priority update failed: {self._priorities.errors[0]}") from self._priorities.errors[0]
        return self.prefetcher.get(timeout=timeout)

    def drop_invalid(self, exc: InvalidBatch) -> None:
        """Count and log a batch the algorithm refused (a multi-day run goes on without it)."""
        self.counters.dropped_batches += 1
        if self.counters.dropped_batches <= 10 or self.counters.dropped_batches % 1000 == 0:
            log.warning("dropped an invalid batch (%d so far): %s", self.counters.dropped_batches, exc)

    def train_on(self, batch: Batch) -> dict[str, float] | None:
        """One update on ``batch``: the metrics, or None for an invalid batch (dropped, see :meth:`step`)."""
        if self.diagnostics:
            start = time.perf_counter()
            for diagnostics in self.diagnostics.values():
                diagnostics.before_step()
            self.counters.diagnostics_seconds += time.perf_counter() - start
        start = time.perf_counter()
        try:
            result = self.algorithm.update(batch.tensors, weights=batch.weights, **self._defer)
        except InvalidBatch as exc:   # nothing was changed: the algorithm validates first
            self.drop_invalid(exc)
            return None
        self.counters.update_seconds += time.perf_counter() - start
        self.counters.updates += 1
        if isinstance(result, DeferredResult):
            # A GPU update's result is read one update later, when its copy to the host is done: the next
            # update is queued meanwhile, and the host never waits for the device at every update.
            (earlier, self._pending) = (self._pending, (result, batch))
            metrics = self._finish(*earlier) if earlier is not None else {}
        else:
            metrics = self._finish(result, batch)
        if batch.task is not None and len(batch.task):
            # bincount, not np.unique: tasks are small non-negative ids (replay checks them at insert), and
            # np.unique's sort cost ~50 us a batch, 7% of a small network's whole update.
            counts = np.bincount(batch.task)
            for task in np.flatnonzero(counts).tolist():
                self.counters.task_rows[task] = self.counters.task_rows.get(task, 0) + int(counts[task])
        if batch.policy_version is not None and len(batch.policy_version):
            lag = self.counters.published_version - float(np.mean(batch.policy_version))
            self.counters.policy_lag_sum += lag
            self.counters.policy_lag_count += 1
        if self.counters.updates % self.publish_every == 0:
            self.publish()
        if self.diagnostics:
            start = time.perf_counter()
            prefixed = len(self.diagnostics) > 1
            measured_now: dict[str, float] = {}
            for name, diagnostics in self.diagnostics.items():
                # The batch just trained on doubles as the loss batch of curvature/interference diagnostics.
                measured = diagnostics.after_step(loss_batch=batch.tensors)
                prefix = f"diag/{name}/" if prefixed else "diag/"
                measured_now.update({f"{prefix}{k}": float(v) for k, v in measured.items()})
            self.counters.diagnostics_seconds += time.perf_counter() - start
            if measured_now:
                self.last_diagnostics = measured_now
                metrics.update(measured_now)
        return metrics

    def _finish(self, result: Any, batch: Batch) -> dict[str, float]:
        """An update's result on the host: its priorities go back to replay; returns its metrics."""
        if isinstance(result, DeferredResult):
            result = result.result()
        if self._priorities is not None and result.priorities is not None:
            priorities = np.asarray(result.priorities, dtype=np.float64)
            if batch.table:  # back to the table the batch came from (per-task tables: maybe not today's)
                self._priorities.submit(functools.partial(self._update_priorities, table=batch.table), batch.keys,
                                        priorities)
            else:
                self._priorities.submit(self._update_priorities, batch.keys, priorities)
        return dict(result.metrics)

    def flush(self) -> dict[str, float] | None:
        """The metrics of a deferred update not yet read (its priorities sent back), or None if there is none."""
        if self._pending is None:
            return None
        (result, batch), self._pending = self._pending, None
        return self._finish(result, batch)

    def take_policy_lag(self) -> float | None:
        """Mean policy lag (in updates) since the last call."""
        c = self.counters
        if c.policy_lag_count == 0:
            return None
        lag = c.policy_lag_sum / c.policy_lag_count
        c.policy_lag_sum, c.policy_lag_count = 0.0, 0
        return lag

    def close(self) -> None:
        self.flush()
        self.prefetcher.stop()
        if self._priorities is not None:
            self._priorities.close()
