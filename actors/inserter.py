"""Overlap inserts with acting: one batch on the wire while the actor keeps stepping.

A synchronous gRPC insert stalls the acting loop for the round trip and the shard's work (for
Atari, hashing and storing ~3.6 MB per 64 transitions). ``AsyncInserter`` hands each batch to one
sender thread and returns at once; the next call waits only if the previous batch is still in flight.
Replay's rate limiter still reaches the actor (one batch later), and a failed insert is raised in the
actor on its next call or on ``flush()`` — never lost.

    insert = AsyncInserter(functools.partial(client.insert, writer_key="actor-0"))
    insert(columns)        # returns immediately; `columns` must not be modified afterwards
    insert.flush()         # wait until everything handed over is stored (raises the sender's error)
    insert.close()

Picklable (the sender thread is created lazily), so it can travel to a Ray actor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np


class AsyncInserter:
    """``insert(columns)`` with at most ``max_in_flight`` batches being sent in the background."""

    def __init__(self, insert: Callable[[dict[str, np.ndarray]], Any], *, max_in_flight: int = 1):
        if not callable(insert):
            raise ValueError(f"insert must be callable, got {insert!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self._insert = insert
        self._max_in_flight = max_in_flight
        self._pending: deque[Future] = deque()
        self._executor: ThreadPoolExecutor | None = None

    def __call__(self, columns: dict[str, np.ndarray]) -> None:
        while self._pending and (len(self._pending) >= self._max_in_flight or self._pending[0].done()):
            self._pending.popleft().result()  # re-raises the sender's error in the actor
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-insert")
        self._pending.append(self._executor.submit(self._insert, columns))

    def flush(self) -> None:
        """Wait until every batch handed over has been inserted; raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("cannot pickle an AsyncInserter with batches in flight; flush() first")
        return {"insert": self._insert, "max_in_flight": self._max_in_flight}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["insert"], max_in_flight=state["max_in_flight"])
