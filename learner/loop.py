"""The learner loop: prefetch, update, priority write-back, weight publishing, diagnostics.

Transport-free: it is handed callables, so it runs the same against a gRPC replay client, an
in-process table or a test double. The wiring in ``evergreen/train.py`` passes the real ones::

    prefetcher = Prefetcher(sample=lambda timeout: client.sample(64, beta=beta(), timeout=timeout),
                            convert=to_tensors, depth=4).start()
    loop = LearnerLoop(algorithm=dqn, prefetcher=prefetcher,
                       update_priorities=client.update_priorities,
                       publish=store.publish, publish_every=50)
    while not done:
        metrics = loop.step()           # one update; never waits on the network unless replay is empty
    loop.close()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    """One sampled batch, ready for the algorithm."""

    tensors: dict[str, torch.Tensor]
    keys: np.ndarray
    weights: torch.Tensor | None
    policy_version: np.ndarray | None = None


class Prefetcher:
    """A background thread that keeps ``depth`` converted batches ready.

    ``sample(timeout_s)`` returns a raw batch or ``None`` when nothing could be sampled within the
    timeout (replay still filling, or the rate limiter holding the learner back); the thread
    retries, which keeps it responsive to ``stop()``. Any other exception is re-raised in the
    consumer on the next ``get`` so that failures are not swallowed by the thread.
    """

    def __init__(
        self,
        *,
        sample: Callable[[float], Any | None],
        convert: Callable[[Any], Batch],
        depth: int = 4,
        poll_timeout_s: float = 0.5,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._sample, self._convert, self._poll = sample, convert, poll_timeout_s
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.wait_seconds = 0.0
        """Total time the consumer spent blocked in ``get`` (the learner starved of data)."""

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._sample(self._poll)
                if raw is None:
                    continue
                item: Batch | BaseException = self._convert(raw)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=self._poll)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self, *, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none arrived within ``timeout`` seconds."""
        start = time.perf_counter()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise RuntimeError(f"replay sampling failed in the prefetch thread: {item}") from item
        return item

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
    extra: dict[str, float] = field(default_factory=dict)


class LearnerLoop:
    """One ``step()`` = take a prefetched batch, update, write priorities back, maybe publish.

    ``publish(version, weights)`` is called with ``version`` = the number of updates so far, so a
    transition's ``policy_version`` and the learner's version subtract to the policy lag in updates.
    ``diagnostics`` (optional) is an object with ``before_step()`` and ``after_step() -> dict`` —
    :class:`plasticity.diagnostics.Diagnostics`, which keeps its own schedule and needs the snapshot
    right before the update to measure the effective learning rate. Its wall time is accounted
    separately so its cost relative to updates can be reported.
    """

    def __init__(
        self,
        *,
        algorithm: Any,
        prefetcher: Prefetcher,
        update_priorities: Callable[[np.ndarray, np.ndarray], Any] | None,
        publish: Callable[[int, dict[str, torch.Tensor]], Any],
        publish_every: int = 50,
        diagnostics: Any | None = None,
        start_updates: int = 0,
    ):
        self.algorithm = algorithm
        self.prefetcher = prefetcher
        self.publish_fn = publish
        self.publish_every = publish_every
        self.diagnostics = diagnostics
        self.counters = LoopCounters(updates=start_updates, published_version=start_updates)
        self._priorities = _BackgroundCalls("priority-updates") if update_priorities else None
        self._update_priorities = update_priorities
        self.last_diagnostics: dict[str, float] = {}

    def publish(self) -> None:
        self.counters.published_version = self.counters.updates
        self.publish_fn(self.counters.updates, self.algorithm.weights())

    def step(self, *, timeout: float | None = 1.0) -> dict[str, float] | None:
        """One update; None if no batch arrived within ``timeout`` (replay filling or rate-limited)."""
        if self._priorities is not None and self._priorities.errors:
            raise RuntimeError(f"priority update failed: {self._priorities.errors[0]}") from self._priorities.errors[0]
        batch = self.prefetcher.get(timeout=timeout)
        if batch is None:
            return None
        if self.diagnostics is not None:
            start = time.perf_counter()
            self.diagnostics.before_step()
            self.counters.diagnostics_seconds += time.perf_counter() - start
        start = time.perf_counter()
        result = self.algorithm.update(batch.tensors, weights=batch.weights)
        self.counters.update_seconds += time.perf_counter() - start
        self.counters.updates += 1
        if self._priorities is not None:
            self._priorities.submit(self._update_priorities, batch.keys, np.asarray(result.priorities, dtype=np.float64))
        if batch.policy_version is not None and len(batch.policy_version):
            lag = self.counters.published_version - float(np.mean(batch.policy_version))
            self.counters.policy_lag_sum += lag
            self.counters.policy_lag_count += 1
        if self.counters.updates % self.publish_every == 0:
            self.publish()
        metrics = dict(result.metrics)
        if self.diagnostics is not None:
            start = time.perf_counter()
            # The batch just trained on doubles as the loss batch of curvature/interference diagnostics.
            measured = self.diagnostics.after_step(loss_batch=batch.tensors)
            self.counters.diagnostics_seconds += time.perf_counter() - start
            if measured:
                self.last_diagnostics = {f"diag/{k}": float(v) for k, v in measured.items()}
                metrics.update(self.last_diagnostics)
        return metrics

    def take_policy_lag(self) -> float | None:
        """Mean policy lag (in updates) since the last call."""
        c = self.counters
        if c.policy_lag_count == 0:
            return None
        lag = c.policy_lag_sum / c.policy_lag_count
        c.policy_lag_sum, c.policy_lag_count = 0.0, 0
        return lag

    def close(self) -> None:
        self.prefetcher.stop()
        if self._priorities is not None:
            self._priorities.close()
