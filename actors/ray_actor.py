"""Thin Ray wrappers: one ``Actor`` per Ray actor process, and an elastic, self-healing pool of them.

The pool drives each actor with repeated ``step_for(chunk_s)`` calls from one supervisor thread in
the driver; a call that fails with a Ray error (the process died, was killed, or the loop raised)
marks the actor crashed, and it is replaced after an exponential backoff. A slot that crashes more
than ``max_restarts_per_window`` times within ``restart_window_s`` is given up on and the error is
surfaced by ``check()`` and ``stats().errors``. ``resize(n)`` adds actors (new indices) or retires the
highest indices gracefully (the running chunk finishes, buffered transitions are inserted, then the
process is killed). Experience never comes back through Ray: actors insert straight into replay
through the picklable ``insert`` callable in their kwargs; only small ``ActorStats`` come back.

Usage::

    ray.init()
    def make_kwargs(index: int) -> dict:               # keyword arguments of actors.actor.Actor
        return dict(env_config=EnvConfig(id="pong", num_envs=8), policy=builder.make_policy(...),
                    adder=builder.make_adder(), insert=ReplayClient(addresses, table="pong").insert,
                    weights_source=weights, actor_index=index, seed=1000 * index)
    pool = ActorPool(8, make_kwargs, restart_backoff_s=1.0, max_restarts_per_window=5)
    pool.start()
    ...
    pool.resize(16)                    # elastic: more actors while the run goes on
    s = pool.stats()                   # env steps, episodes, returns, steps/s, restarts since last call
    pool.check()                       # raises ActorPoolError if an actor is crash-looping
    pool.stop()
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.actor import Actor, ActorStats

__all__ = ["ActorProcess", "RayActor", "ActorPool", "ActorPoolError", "PoolStats"]

log = logging.getLogger(__name__)

# Seeds of a restarted actor move by this much per restart, so a replacement does not replay the
# trajectory of the actor it replaces.
RESTART_SEED_STRIDE = 10_007


class ActorProcess:
    """The body of a Ray actor: owns one ``Actor`` built from keyword arguments in the worker."""

    def __init__(self, actor_kwargs: dict[str, Any]) -> None:
        self._actor = Actor(**actor_kwargs)

    def step_for(self, seconds: float) -> ActorStats:
        """Run the acting loop for about ``seconds``; return the stats of this chunk."""
        return self._actor.run(max_seconds=seconds)

    def run_steps(self, num_steps: int) -> ActorStats:
        """Run exactly ``num_steps`` vector steps."""
        return self._actor.run(num_steps)

    def stats(self) -> ActorStats:
        """Stats since the previous ``stats()`` call on this actor."""
        return self._actor.stats()

    def ping(self) -> int:
        import os

        return os.getpid()

    def info(self) -> dict[str, Any]:
        """Where this actor runs: its index, node id and pid."""
        import os

        return {"actor_index": self._actor.actor_index, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    def close(self) -> None:
        """Insert buffered transitions and close the env (called before a graceful kill)."""
        self._actor.close()


RayActor = ray.remote(ActorProcess)


class ActorPoolError(RuntimeError):
    """An actor slot crashed too often within the restart window; the pool stopped restarting it."""


@dataclass
class PoolStats:
    """Aggregate over all actors since the previous ``ActorPool.stats()`` call."""

    num_actors: int = 0
    """Target number of actors."""
    running: int = 0
    """Actors alive and stepping now."""
    env_steps: int = 0
    transitions: int = 0
    insert_calls: int = 0
    weight_updates: int = 0
    episode_returns: dict[str, np.ndarray] = field(default_factory=dict)
    episode_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    wall_s: float = 0.0
    """Seconds covered by this period (driver clock)."""
    restarts: int = 0
    """Restarts in this period."""
    restarts_total: int = 0
    min_policy_version: int = -1
    """Oldest policy version any actor reported acting with in this period (-1 if none)."""
    errors: list[str] = field(default_factory=list)
    """Crash loops the pool gave up on (all time)."""
    replay_rows_lost: int = 0
    """Rows replay acknowledged to actors and later lost (a shard crash), found in this period."""

    @property
    def num_episodes(self) -> int:
        return int(sum(v.size for v in self.episode_returns.values()))

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else 0.0

    def mean_return(self, task: str | None = None) -> float:
        """Mean episode return (of ``task``, or over all tasks); NaN without episodes."""
        values = [v for k, v in self.episode_returns.items() if task is None or k == task]
        joined = np.concatenate(values) if values else np.zeros(0)
        return float(joined.mean()) if joined.size else float("nan")


@dataclass
class _Slot:
    index: int
    handle: Any = None
    ref: Any = None  # in-flight step_for (or close) call
    state: str = "running"  # running | retiring | closing | waiting (restart due at restart_at) | failed
    restart_at: float = 0.0
    restarts: int = 0
    crashes: collections.deque = field(default_factory=collections.deque)
    chunks: int = 0  # step_for calls returned since the last launch (0: still starting, or pending placement)


class ActorPool:
    """Creates ``num_actors`` Ray actors from ``make_actor_kwargs(index)`` and keeps them running.

    ``actor_options`` go to ``RayActor.options`` (e.g. ``{"num_cpus": 1}``). If the kwargs contain an
    integer ``seed``, a restarted actor gets ``seed + restarts * RESTART_SEED_STRIDE``.
    """

    def __init__(
        self,
        num_actors: int,
        make_actor_kwargs: Callable[[int], dict[str, Any]],
        *,
        restart_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_restarts_per_window: int = 5,
        restart_window_s: float = 300.0,
        chunk_s: float = 1.0,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        self._check_count(num_actors)
        if not callable(make_actor_kwargs):
            raise ValueError(f"make_actor_kwargs must be callable (index -> dict), got {make_actor_kwargs!r}")
        for name, value in (
            ("restart_backoff_s", restart_backoff_s),
            ("max_backoff_s", max_backoff_s),
            ("restart_window_s", restart_window_s),
            ("chunk_s", chunk_s),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ActorPool {name} must be a positive number of seconds, got {value!r}")
        if isinstance(max_restarts_per_window, bool) or not isinstance(max_restarts_per_window, int) or (
            max_restarts_per_window < 0
        ):
            raise ValueError(
                f"ActorPool max_restarts_per_window must be a non-negative integer, got {max_restarts_per_window!r}"
            )
        self._make_kwargs = make_actor_kwargs
        self._backoff = float(restart_backoff_s)
        self._max_backoff = float(max_backoff_s)
        self._max_restarts = max_restarts_per_window
        self._window = float(restart_window_s)
        self._chunk_s = float(chunk_s)
        self._options = dict(actor_options or {})
        self._target = int(num_actors)
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: list[str] = []
        self._restarts_total = 0
        self._period = self._new_period()

    # -- public -------------------------------------------------------------------------------------

    @property
    def num_actors(self) -> int:
        """The target number of actors."""
        return self._target

    @property
    def running(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots.values() if s.state == "running")

    def chunks(self) -> dict[int, int]:
        """``step_for`` chunks each running actor has returned since its launch (its statistics are in
        ``stats()`` up to the last of them)."""
        with self._lock:
            return {i: s.chunks for i, s in sorted(self._slots.items()) if s.state == "running"}

    def handles(self) -> dict[int, Any]:
        """Ray handles of the running actors by index (for inspection and fault-injection tests)."""
        with self._lock:
            return {i: s.handle for i, s in sorted(self._slots.items()) if s.state == "running"}

    def describe(self) -> list[dict[str, Any]]:
        """Every actor slot, by index: ``state`` (starting: launched, no chunk back yet, which includes an
        actor Ray has no room for; running, retiring, closing, waiting: restart backoff; failed) and
        ``restarts``. What ``evergreen status`` shows."""
        with self._lock:
            out = []
            for index, slot in sorted(self._slots.items()):
                state = "starting" if slot.state == "running" and slot.chunks == 0 else slot.state
                out.append({"index": index, "state": state, "restarts": slot.restarts})
            return out

    def placement(self, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """``info()`` of every running actor (index, node id, pid); actors that do not answer are left out."""
        handles = self.handles()
        refs = [handle.info.remote() for handle in handles.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayError:
                continue
        return sorted(out, key=lambda item: item["actor_index"])

    def start(self) -> None:
        """Create the actors and start the supervisor thread (idempotent)."""
        if self._thread is not None:
            return
        if not ray.is_initialized():
            raise RuntimeError("ActorPool.start needs ray.init() first")
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, name="actor-pool", daemon=True)
        self._thread.start()

    def resize(self, num_actors: int) -> None:
        """Change the target count; actors are added or retired (highest indices first) while running."""
        self._check_count(num_actors)
        with self._lock:
            self._target = int(num_actors)

    def stats(self) -> PoolStats:
        """Aggregate since the previous call (counts are per period; ``errors`` are cumulative)."""
        with self._lock:
            period, self._period = self._period, self._new_period()
            period.num_actors = self._target
            period.running = sum(1 for s in self._slots.values() if s.state == "running")
            period.restarts_total = self._restarts_total
            period.errors = list(self._errors)
        period.wall_s = time.monotonic() - period.wall_s  # started as the period's start time
        if period.min_policy_version == np.iinfo(np.int64).max:
            period.min_policy_version = -1
        return period

    def check(self) -> None:
        """Raise ActorPoolError if any actor slot was given up on."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            raise ActorPoolError("; ".join(errors))

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop the supervisor and kill every actor (buffered transitions of running chunks are lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            if slot.handle is not None:
                ray.kill(slot.handle, no_restart=True)

    def __enter__(self) -> ActorPool:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- supervisor ---------------------------------------------------------------------------------

    @staticmethod
    def _check_count(num_actors: Any) -> None:
        if isinstance(num_actors, bool) or not isinstance(num_actors, (int, np.integer)) or num_actors < 0:
            raise ValueError(f"number of actors must be a non-negative integer, got {num_actors!r}")

    @staticmethod
    def _new_period() -> PoolStats:
        # wall_s holds the start time until stats() turns it into a duration.
        return PoolStats(wall_s=time.monotonic(), min_policy_version=int(np.iinfo(np.int64).max))

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
                self._wait_and_handle()
            except Exception:  # the supervisor must outlive any single bad event
                log.exception("actor pool supervisor step failed")
                time.sleep(0.5)

    def _reconcile(self) -> None:
        now = time.monotonic()
        with self._lock:
            target = self._target
            for index in range(target):
                if index not in self._slots:
                    self._slots[index] = _Slot(index=index, state="waiting", restart_at=now)
            for index, slot in list(self._slots.items()):
                if index >= target and slot.state in ("running", "waiting", "failed"):
                    if slot.state == "running":
                        slot.state = "retiring"  # finishes its chunk, then closes
                    else:
                        del self._slots[index]
                elif index < target and slot.state in ("retiring",):
                    slot.state = "running"  # resized back up before it finished retiring
            due = [s for s in self._slots.values() if s.state == "waiting" and s.restart_at <= now]
        for slot in due:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        try:
            kwargs = dict(self._make_kwargs(slot.index))
        except Exception as exc:  # counts as a crash, so a broken factory ends in a surfaced crash loop
            self._on_crash(slot, exc)
            return
        seed = kwargs.get("seed")
        if slot.restarts and isinstance(seed, int) and not isinstance(seed, bool):
            kwargs["seed"] = seed + slot.restarts * RESTART_SEED_STRIDE
        handle = RayActor.options(**self._options).remote(kwargs)
        ref = handle.step_for.remote(self._chunk_s)
        with self._lock:
            slot.handle, slot.ref, slot.state, slot.chunks = handle, ref, "running", 0

    def _wait_and_handle(self) -> None:
        with self._lock:
            by_ref = {s.ref: s for s in self._slots.values() if s.ref is not None}
        if not by_ref:
            self._stop.wait(0.05)
            return
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0.1)
        for ref in ready:
            slot = by_ref[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._on_crash(slot, exc)
                continue
            self._on_result(slot, result)

    def _on_result(self, slot: _Slot, result: Any) -> None:
        with self._lock:
            if slot.state == "closing":
                # close() returned: the actor inserted what it buffered; now the process can go.
                self._slots.pop(slot.index, None)
                handle = slot.handle
            else:
                self._record(result)
                slot.chunks += 1
                if slot.state == "retiring":
                    slot.state = "closing"
                    slot.ref = slot.handle.close.remote()
                else:
                    slot.ref = slot.handle.step_for.remote(self._chunk_s)
                return
        ray.kill(handle, no_restart=True)

    def _on_crash(self, slot: _Slot, exc: BaseException) -> None:
        now = time.monotonic()
        handle = slot.handle
        with self._lock:
            if slot.state in ("retiring", "closing"):
                self._slots.pop(slot.index, None)  # was leaving anyway
            else:
                while slot.crashes and now - slot.crashes[0] > self._window:
                    slot.crashes.popleft()
                slot.crashes.append(now)
                slot.ref = None
                slot.handle = None
                if len(slot.crashes) > self._max_restarts:
                    slot.state = "failed"
                    message = (
                        f"actor {slot.index} crashed {len(slot.crashes)} times within {self._window:g} s "
                        f"(max_restarts_per_window={self._max_restarts}); not restarting it. "
                        f"Last error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    )
                    self._errors.append(message)
                    log.error(message)
                else:
                    delay = min(self._backoff * 2 ** (len(slot.crashes) - 1), self._max_backoff)
                    slot.state = "waiting"
                    slot.restart_at = now + delay
                    slot.restarts += 1
                    self._restarts_total += 1
                    self._period.restarts += 1
                    log.warning("actor %d crashed (%s); restarting in %.2f s", slot.index, type(exc).__name__, delay)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def _record(self, stats: ActorStats) -> None:
        p = self._period
        p.env_steps += stats.env_steps
        p.transitions += stats.transitions
        p.insert_calls += stats.insert_calls
        p.weight_updates += stats.weight_updates
        p.min_policy_version = min(p.min_policy_version, stats.policy_version)
        p.replay_rows_lost += stats.replay_rows_lost
        for task, returns in stats.episode_returns.items():
            p.episode_returns[task] = np.concatenate([p.episode_returns.get(task, np.zeros(0)), returns])
            p.episode_lengths[task] = np.concatenate(
                [p.episode_lengths.get(task, np.zeros(0, np.int64)), stats.episode_lengths[task]]
            )
