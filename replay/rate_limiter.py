"""Rate limiter with Reverb ``SampleToInsertRatio`` semantics, blocking on the table's Condition.

Arithmetic (all counts are rows; ``inserts`` and ``samples`` are totals since the table was created)::

    diff     = inserts * spi - samples - shift  # how far inserts are "ahead" of samples
    offset   = spi * min_size_to_sample         # diff after filling to min size with no samples yet
    min_diff = offset - error_buffer
    max_diff = offset + error_buffer

    sample of b rows  allowed  iff  size >= min_size_to_sample  and  diff - b >= min_diff
    insert of n rows  allowed  iff  size <  min_size_to_sample  or   diff + n * spi <= max_diff

So samplers may run at most ``error_buffer`` rows below the target ratio and inserters at most
``error_buffer`` above it, measured from the point where the table became sampleable. ``shift`` is 0
until :meth:`RateLimiter.rebase` moves the baseline (see below).

The arithmetic is exact: ``samples_per_insert`` and ``error_buffer`` are taken as the nearest fractions
with denominators up to 10^6 (``0.1`` is exactly 1/10) and the comparisons run on integers, so an insert
whose ``n * spi`` exactly fills the band (``2 * error_buffer``) waits for samples instead of being refused
because ``30 * 0.1`` rounds to ``3.0000000000000004``.

Rebasing. ``rebase()`` sets ``shift`` so that ``diff == offset``, the middle of the band: from there
inserts may run ``error_buffer`` sampled rows ahead and samples ``error_buffer`` rows behind, so neither
side can be blocked for good. A shard restored after a crash uses it: its checkpointed counts are newer
(or older) than the learner's checkpoint, and the learner and actors restart with their own counters,
so the restored ``diff`` can sit at one edge of the band with the other side waiting on a peer that
lost its place. The per-shard counts cannot be recomputed from the learner's (it counts updates over
all shards), so rebasing forgives the at most ``error_buffer`` rows of ratio debt instead. The insert
and sample totals themselves are never changed (they are exported as monotonic counters). While the table is
smaller than ``min_size_to_sample`` inserts are never blocked (no sample could ever unblock them).
With ``samples_per_insert=None`` only the minimum size applies: inserts never block, samples need
``size >= min_size_to_sample``.

Calls that could never proceed are refused with FailedPrecondition instead of hanging:

* an insert of n rows with ``n * spi > 2 * error_buffer`` that is blocked now: samples can lower ``diff``
  no further than ``min_diff`` and inserts only raise it, so ``diff + n * spi <= max_diff`` can never
  hold again;
* a sample of b rows with ``b > 2 * error_buffer`` that is blocked now while ``size >= min_size``:
  inserts can raise ``diff`` no further than ``max_diff`` so ``diff - b >= min_diff`` can never hold.

Config validation follows Reverb: ``error_buffer >= max(1, spi)``, otherwise single-row calls could block
each other forever.

:class:`QueueRateLimiter` is the limiter of a table whose sampler consumes what it samples (FIFO), like
Reverb's ``Queue``: on top of the rules above, an insert of n rows waits while ``size + n > capacity``
(so the ring never overwrites an unread item) and a sample of b rows waits until ``size >= b``. Both
conditions use the table's actual size, which also shrinks when a storage evicts unread items. Its only
never-proceeds refusals are calls larger than the capacity: consumption can take the table back below
``min_size_to_sample``, where the ratio band no longer limits inserts, so whether a smaller call can be
unblocked depends on the sizes of future calls, and it waits.

Example::

    import threading
    from replay.rate_limiter import QueueRateLimiter, RateLimiter

    cond = threading.Condition()
    rl = RateLimiter(min_size_to_sample=2, samples_per_insert=1.0, error_buffer=2.0)
    assert rl.can_insert(5, size=0)            # filling: never blocked
    rl.record_insert(5)                        # diff = 5, min_diff = 0, max_diff = 4
    assert rl.can_sample(5, size=5) and not rl.can_sample(6, size=5)
    assert not rl.can_insert(1, size=5)        # 5 + 1 > 4: inserts are too far ahead

    q = QueueRateLimiter(capacity=4)
    assert q.can_insert(4, size=0) and not q.can_insert(1, size=4)   # full: wait for a sample
    assert q.can_sample(3, size=3) and not q.can_sample(4, size=3)   # wait for 4 unread items
    rl.wait(cond, side="sample", rows=5, ready=lambda: rl.can_sample(5, size=5),
            never=lambda: rl.sample_never_possible(5, size=5), closed=lambda: False,
            describe=lambda: rl.describe(size=5), timeout=0)          # ready: returns at once
    rl.rebase()                                # diff = offset = 2: samples and inserts may proceed again

A blocked call can also be ended by its caller: ``wait(..., guard=g)`` calls ``g.enter(wake)`` once
before it first blocks (the server refuses the call there if too many are already waiting, and arranges
for ``wake()`` when the RPC is cancelled), ends with Cancelled as soon as ``g.cancelled()``, never waits
past ``g.time_left()`` (the RPC's deadline), and calls ``g.exit()`` when it stops waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

from replay.errors import Cancelled, DeadlineExceeded, FailedPrecondition

__all__ = ["QueueRateLimiter", "RateLimiter", "WaitGuard"]

_MAX_DENOMINATOR = 10**6


class WaitGuard(Protocol):
    """What a blocked call's caller provides (the server's per-RPC guard; see the module docstring)."""

    def enter(self, wake: Callable[[], None]) -> None:
        """The call is about to block: raise to refuse it; arrange ``wake()`` when the caller goes away."""

    def exit(self) -> None:
        """The call stopped waiting (ready, refused, timed out or cancelled)."""

    def cancelled(self) -> bool:
        """True once the caller went away (the RPC was cancelled or its deadline passed)."""

    def time_left(self) -> float | None:
        """Seconds until the caller's deadline, or None without one."""


def _exact(value: float) -> Fraction:
    return Fraction(value).limit_denominator(_MAX_DENOMINATOR)


class RateLimiter:
    """Counts inserts/samples, decides which calls may proceed, and blocks callers on a Condition."""

    def __init__(
        self, *, min_size_to_sample: int, samples_per_insert: float | None = None, error_buffer: float = 100.0
    ) -> None:
        self.validate_config(
            min_size_to_sample=min_size_to_sample,
            samples_per_insert=samples_per_insert,
            error_buffer=error_buffer,
        )
        self.min_size_to_sample = int(min_size_to_sample)
        self.samples_per_insert = None if samples_per_insert is None else float(samples_per_insert)
        self.error_buffer = float(error_buffer)
        self.inserts = 0
        self.samples = 0
        self.insert_blocked_s = 0.0
        self.sample_blocked_s = 0.0
        # Everything below is in units of 1/_scale sampled rows, so that every comparison is on integers.
        spi = _exact(self.samples_per_insert or 0.0)
        eb = _exact(self.error_buffer)
        self._scale = math.lcm(spi.denominator, eb.denominator)
        self._spi = int(spi * self._scale)
        self._eb = int(eb * self._scale)
        self._offset = self._spi * self.min_size_to_sample
        self._shift = 0
        self.inserts_released = False
        """True while the insert side is released (:meth:`release_inserts`): a table nobody samples any more."""

    @staticmethod
    def validate_config(
        *, min_size_to_sample: int, samples_per_insert: float | None, error_buffer: float
    ) -> None:
        """ValueError naming the bad value; refuses configs that can deadlock single-row calls."""
        if (
            isinstance(min_size_to_sample, bool)
            or not isinstance(min_size_to_sample, int)
            or min_size_to_sample < 1
        ):
            raise ValueError(f"min_size_to_sample {min_size_to_sample!r}: expected an int >= 1")
        if samples_per_insert is None:
            return
        if isinstance(samples_per_insert, bool) or not isinstance(samples_per_insert, (int, float)):
            raise ValueError(f"samples_per_insert {samples_per_insert!r}: expected a positive number or None")
        if not math.isfinite(samples_per_insert) or samples_per_insert <= 0:
            raise ValueError(
                f"samples_per_insert {samples_per_insert!r}: expected a finite number > 0 or None"
            )
        if (
            isinstance(error_buffer, bool)
            or not isinstance(error_buffer, (int, float))
            or not math.isfinite(error_buffer)
        ):
            raise ValueError(f"error_buffer {error_buffer!r}: expected a finite number")
        need = max(1.0, float(samples_per_insert))
        if error_buffer < need:
            raise ValueError(
                f"error_buffer {error_buffer!r} is smaller than max(1, samples_per_insert) = {need}: a single-row "
                "insert and a single-row sample could then block each other forever; expected error_buffer >= "
                f"{need}"
            )

    # ------------------------------------------------------------ arithmetic
    def _diff(self) -> int:
        return self.inserts * self._spi - self.samples * self._scale - self._shift

    @property
    def diff(self) -> float:
        return self._diff() / self._scale

    @property
    def min_diff(self) -> float:
        return (self._offset - self._eb) / self._scale

    @property
    def max_diff(self) -> float:
        return (self._offset + self._eb) / self._scale

    def can_insert(self, n: int, *, size: int) -> bool:
        if self.samples_per_insert is None or size < self.min_size_to_sample or self.inserts_released:
            return True
        return self._diff() + n * self._spi <= self._offset + self._eb

    def can_sample(self, batch_size: int, *, size: int) -> bool:
        if size < self.min_size_to_sample:
            return False
        if self.samples_per_insert is None:
            return True
        return self._diff() - batch_size * self._scale >= self._offset - self._eb

    def rebase(self) -> None:
        """Move the baseline so that ``diff`` is the middle of the band (see the module docstring)."""
        self._shift += self._diff() - self._offset

    def restart(self) -> None:
        """Move the baseline so that the limiter behaves as a fresh one: what a table does when it is emptied.

        ``diff`` becomes 0, so the next ``min_size_to_sample`` inserts refill the table freely and leave
        ``diff`` at the middle of the band, exactly as at the start of a run (without this, the refill's
        inserts would count on top of the ones the band already allowed for, and the sampler could
        take a burst of ``min_size_to_sample * samples_per_insert`` extra samples). Counts are kept.
        """
        self._shift += self._diff()

    def release_inserts(self, released: bool = True) -> None:
        """Let inserts proceed regardless of samples (``True``), or tie them to samples again (``False``).

        For a table its sampler has left, such as an old task's table when the learner samples per-task
        tables: the actors still on the old task must not wait forever for samples that will not come.
        Tying them again rebases the band (:meth:`rebase`), so the inserts made while released give the
        returning sampler no burst of extra samples, and neither side starts blocked.
        """
        if self.inserts_released and not released:
            self.rebase()
        self.inserts_released = bool(released)

    def insert_never_possible(self, n: int, *, size: int) -> str | None:
        """Why a blocked insert of ``n`` rows can never proceed, or None if it may still proceed."""
        spi = self.samples_per_insert
        if spi is None or self.can_insert(n, size=size):
            return None
        if n * self._spi > 2 * self._eb:
            return (
                f"an insert of {n} rows raises inserts*samples_per_insert by {n * spi:g}, more than the whole "
                f"band 2*error_buffer = {2 * self.error_buffer:g} between min_diff {self.min_diff:g} and "
                f"max_diff {self.max_diff:g}; samples cannot lower diff below min_diff, so it could never "
                f"proceed (diff now {self.diff:g}); insert at most {int(2 * self.error_buffer // spi)} rows per "
                "call or raise error_buffer"
            )
        return None

    def sample_never_possible(self, batch_size: int, *, size: int) -> str | None:
        """Why a blocked sample of ``batch_size`` rows can never proceed, or None if it may still."""
        if self.samples_per_insert is None or size < self.min_size_to_sample:
            return None
        if self.can_sample(batch_size, size=size):
            return None
        if batch_size * self._scale > 2 * self._eb:
            return (
                f"a sample of {batch_size} rows needs diff >= min_diff + {batch_size} = "
                f"{self.min_diff + batch_size:g}, but inserts cannot raise diff above max_diff "
                f"{self.max_diff:g} (band 2*error_buffer = {2 * self.error_buffer:g}), so it could never "
                f"proceed (diff now {self.diff:g}); sample at most {int(2 * self.error_buffer)} rows per call "
                "or raise error_buffer"
            )
        return None

    def describe(self, *, size: int) -> str:
        """The counts a blocked-call message reports."""
        s = f"size={size}, min_size_to_sample={self.min_size_to_sample}, inserts={self.inserts}, samples={self.samples}"
        if self.samples_per_insert is not None:
            s += (
                f", samples_per_insert={self.samples_per_insert:g}, diff=inserts*spi-samples={self.diff:g}, "
                f"min_diff={self.min_diff:g}, max_diff={self.max_diff:g}"
            )
        if self.inserts_released:
            s += ", inserts released"
        return s

    # ------------------------------------------------------------ counters
    def record_insert(self, n: int) -> None:
        self.inserts += int(n)

    def record_sample(self, batch_size: int) -> None:
        self.samples += int(batch_size)

    # ------------------------------------------------------------ blocking
    def wait(
        self,
        cond: threading.Condition,
        *,
        side: str,
        rows: int,
        ready: Callable[[], bool],
        never: Callable[[], str | None],
        closed: Callable[[], bool],
        describe: Callable[[], str],
        timeout: float | None,
        guard: WaitGuard | None = None,
    ) -> None:
        """Block (``cond`` held) until ``ready()``; counts blocked seconds for ``side`` ("insert"/"sample").

        Raises Cancelled if ``closed()`` or the ``guard``'s caller went away, FailedPrecondition if
        ``never()`` gives a reason, and DeadlineExceeded after ``timeout`` seconds (``0`` = fail at once
        if it would block, None = no limit but the guard's deadline).
        """
        if closed():
            raise Cancelled(f"{side} of {rows} rows: table is closed")
        if ready():
            return
        reason = never()
        if reason:
            raise FailedPrecondition(f"{side} of {rows} rows can never proceed: {reason}")
        if timeout is not None and not (timeout >= 0):
            raise ValueError(f"timeout {timeout!r}: expected None or a number >= 0")
        if timeout == 0:
            raise DeadlineExceeded(f"{side} of {rows} rows blocked by the rate limiter (timeout 0 s): {describe()}")
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        if guard is not None:
            left = guard.time_left()
            if left is not None:
                deadline = start + left if deadline is None else min(deadline, start + left)

            def wake() -> None:
                with cond:
                    cond.notify_all()

            guard.enter(wake)
        try:
            while True:
                if guard is not None and guard.cancelled():
                    raise Cancelled(f"{side} of {rows} rows: the caller went away while the call was blocked")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(
                        f"{side} of {rows} rows blocked by the rate limiter for {time.monotonic() - start:.3f} s "
                        f"(timeout {timeout} s): {describe()}"
                    )
                cond.wait(remaining)
                if closed():
                    raise Cancelled(f"{side} of {rows} rows: table closed while the call was blocked")
                if ready():
                    return
                reason = never()
                if reason:
                    raise FailedPrecondition(f"{side} of {rows} rows can never proceed: {reason}")
        finally:
            if guard is not None:
                guard.exit()
            blocked = time.monotonic() - start
            if side == "insert":
                self.insert_blocked_s += blocked
            else:
                self.sample_blocked_s += blocked

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "inserts": self.inserts,
            "samples": self.samples,
            "insert_blocked_s": self.insert_blocked_s,
            "sample_blocked_s": self.sample_blocked_s,
            # Exact, and independent of the scale (which depends on the configured ratio).
            "shift": str(Fraction(self._shift, self._scale)),
            "inserts_released": self.inserts_released,
        }

    def load_state_dict(self, meta: dict) -> None:
        ins, smp = int(meta["inserts"]), int(meta["samples"])
        if ins < 0 or smp < 0:
            raise ValueError(f"saved rate limiter counts inserts={ins}, samples={smp}; expected >= 0")
        shift = Fraction(str(meta.get("shift", "0")))
        self.inserts, self.samples = ins, smp
        self._shift = round(shift * self._scale)
        self.insert_blocked_s = float(meta.get("insert_blocked_s", 0.0))
        self.sample_blocked_s = float(meta.get("sample_blocked_s", 0.0))
        self.inserts_released = bool(meta.get("inserts_released", False))


class QueueRateLimiter(RateLimiter):
    """A :class:`RateLimiter` for a consuming (FIFO) sampler that also keeps at most ``capacity`` unread
    items: inserts wait for room, samples wait for ``batch_size`` unread items (see module docstring).

    ``min_size_to_sample`` and a ``samples_per_insert`` of 1 apply as in the base class; any other ratio is
    refused, because a queue samples every item exactly once.
    """

    def __init__(
        self,
        *,
        capacity: int,
        min_size_to_sample: int = 1,
        samples_per_insert: float | None = None,
        error_buffer: float = 100.0,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"queue capacity {capacity!r}: expected an int >= 1")
        super().__init__(
            min_size_to_sample=min_size_to_sample,
            samples_per_insert=samples_per_insert,
            error_buffer=error_buffer,
        )
        if samples_per_insert not in (None, 1):
            # Over time samples == inserts in a queue; any other target ratio drifts until inserts wait
            # for a full queue and samples for the ratio band, both for good.
            raise ValueError(
                f"samples_per_insert {samples_per_insert!r}: a queue samples each item exactly once, so "
                "any other ratio would deadlock; expected None or 1"
            )
        if min_size_to_sample > capacity:
            raise ValueError(
                f"min_size_to_sample {min_size_to_sample} > queue capacity {capacity}: samples could never "
                f"proceed; expected at most {capacity}"
            )
        self.capacity = capacity

    def can_insert(self, n: int, *, size: int) -> bool:
        return size + n <= self.capacity and super().can_insert(n, size=size)

    def release_inserts(self, released: bool = True) -> None:
        if released:
            raise ValueError("a queue (fifo) table keeps every unread item, so its inserts cannot be released "
                             "from waiting for samples; use a uniform or prioritized table")
        super().release_inserts(False)

    def can_sample(self, batch_size: int, *, size: int) -> bool:
        return size >= batch_size and super().can_sample(batch_size, size=size)

    def insert_never_possible(self, n: int, *, size: int) -> str | None:
        if n > self.capacity:
            return (
                f"an insert of {n} rows is larger than the queue capacity {self.capacity}, so even an empty "
                f"queue could not take it; insert at most {self.capacity} rows per call"
            )
        # Anything smaller may still proceed: samples consume items, which frees room and can take the
        # table back below min_size_to_sample, where the ratio band no longer limits inserts.
        return None

    def sample_never_possible(self, batch_size: int, *, size: int) -> str | None:
        if batch_size > self.capacity:
            return (
                f"a sample of {batch_size} rows needs {batch_size} unread items but the queue holds at "
                f"most capacity {self.capacity}; sample at most {self.capacity} rows per call"
            )
        # Anything smaller may still proceed: whether inserts can bring enough unread items depends on
        # the sizes of future calls (below min_size_to_sample inserts are unlimited), so it waits.
        return None

    def describe(self, *, size: int) -> str:
        return (
            super().describe(size=size)
            + f", capacity={self.capacity} (queue: inserts wait for room, samples for batch_size unread items)"
        )
