"""Versioned weights from the learner to the actors through the Ray object store.

The learner's publishing thread ``ray.put``s each new state dict once and hands the reference to a
tiny ``WeightStore`` actor; actors ask the store for the latest version number (a few bytes) every few hundred steps
and fetch the weights only when it changed. Weights never pass through the driver's memory twice
and experience never passes through Ray at all (it goes to replay over gRPC).

    store = WeightStore.options(name="weights").remote()
    publisher = WeightPublisher(store, actor_keys=set(actor_network.state_dict()))   # picklable
    publisher(120, dqn.acting_weights(), dqn.acting_network())   # learner side
    source = RayWeightSource(store)                        # picklable; give it to actors
    if source.latest_version() > mine: state = source.get(source.latest_version())
    store.set_task.remote(1)                               # driver: a continual scenario moved on
    source.current_task()                                  # 1: actors switch at their next poll

The store is also the run's env-step gate. Actors report the env steps they took at every poll
(``source.poll(actor, steps, held=...)``: one round trip for version, task and gate), and the store
closes the gate once the run's count reaches ``hold_at``: a task switch or the run's end. Held actors
insert what they buffered and wait; the driver switches the learner and replay, then opens the gate
again. So a switch lands within one poll interval per actor of its env step, on any machine and under
any load, and no actor runs ahead of a switch the driver has not made yet::

    store.open_gate.remote(env_steps=0, hold_at=20_000)    # driver: the next switch is at 20k env steps
    ray.get(store.gate.remote())                           # {"env_steps": 20_004, "closed": True, "held": [0, 1]}
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

#: An actor that has not polled for this long no longer counts as held (it died, or was retired).
HELD_FRESH_S = 2.0


class PollAnswer(NamedTuple):
    """What an actor's poll returns: the newest weights' version, the task to act on, and whether the
    run's env-step gate is closed (the actor must insert what it buffered and wait)."""

    version: int
    task: int
    hold: bool


class EnvStepGate:
    """The run's env-step count as the actors report it, and the limit at which they must wait.

        gate = EnvStepGate()
        gate.open(hold_at=100, env_steps=0)
        gate.report(actor=0, env_steps=96)              # False: go on
        gate.report(actor=0, env_steps=8)               # True: 104 >= 100, hold
        gate.report(actor=0, env_steps=0, held=True)    # True; actor 0 now waits with its rows inserted
        gate.state()["held"]                            # [0]
        gate.open(hold_at=200)                          # the driver switched: on to the next limit
    """

    def __init__(self) -> None:
        self.env_steps = 0                    # env steps the actors reported at their polls
        self.hold_at: int | None = None       # closed once env_steps reaches this (None: never)
        self._held: dict[int, float] = {}     # actor index -> its last poll while held, buffer inserted

    @property
    def closed(self) -> bool:
        return self.hold_at is not None and self.env_steps >= self.hold_at

    def open(self, *, hold_at: int | None, env_steps: int | None = None) -> None:
        if env_steps is not None:
            self.env_steps = int(env_steps)
        self.hold_at = None if hold_at is None else int(hold_at)
        self._held.clear()

    def report(self, actor: int, env_steps: int, held: bool = False) -> bool:
        """Count ``env_steps`` more; True while the actor must hold (``held``: it holds, rows inserted)."""
        self.env_steps += max(0, int(env_steps))
        if self.closed and held:
            self._held[int(actor)] = time.monotonic()
        else:
            self._held.pop(int(actor), None)
        return self.closed

    def state(self) -> dict[str, Any]:
        """The count, the limit, whether the gate is closed, and the actors held at it (polled lately)."""
        now = time.monotonic()
        held = sorted(a for a, t in self._held.items() if now - t < HELD_FRESH_S) if self.closed else []
        return {"env_steps": self.env_steps, "hold_at": self.hold_at, "closed": self.closed, "held": held}


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds the latest (version, object ref) pair, the current task and the env-step gate.

    Refs are wrapped in a list so Ray does not resolve them."""

    def __init__(self, task: int = 0) -> None:
        self._version = -1
        self._ref: list[Any] = []
        self._task = int(task)  # the scenario task actors act on (continual runs)
        self._gate = EnvStepGate()

    def publish(self, version: int, ref_holder: list[Any]) -> None:
        if version >= self._version:
            self._version, self._ref = version, ref_holder

    def latest_version(self) -> int:
        return self._version

    def latest(self) -> tuple[int, list[Any]]:
        return self._version, self._ref

    def set_task(self, task: int) -> None:
        self._task = int(task)

    def current_task(self) -> int:
        return self._task

    def open_gate(self, *, hold_at: int | None, env_steps: int | None = None) -> None:
        """Let actors step until the run's count reaches ``hold_at`` (None: no limit); ``env_steps`` sets
        the count (a run's start or resume)."""
        self._gate.open(hold_at=hold_at, env_steps=env_steps)

    def poll(self, actor: int, env_steps: int, held: bool = False) -> PollAnswer:
        """An actor's poll: count the ``env_steps`` it took since its previous poll; ``held`` says it is
        waiting at the closed gate with everything it collected inserted."""
        return PollAnswer(self._version, self._task, self._gate.report(actor, env_steps, held))

    def gate(self) -> dict[str, Any]:
        """:meth:`EnvStepGate.state`."""
        return self._gate.state()


class WeightPublisher:
    """Learner side: ``publisher(version, weights, network)`` hands the weights to a publishing thread.

    The call returns at once: a thread of its own puts the weights into the object store and tells
    the store, so the learner's update loop never waits on Ray (a publish costs a few milliseconds of
    round trips, as much as several updates of a small network). Only the newest weights matter, so a
    publish that arrives while the thread is busy replaces the one still waiting, and the actors' lag
    stays bounded by ``publish_every`` plus one publish. Tensors travel as numpy arrays (Ray pickles
    them out of band; torch's own pickling is several times slower); ``RayWeightSource.get`` turns
    them back into tensors. A failed publish is raised by the next call (and by :meth:`flush`).

    Actors build their network once from the run config, so they can load a state dict only while
    its keys match that architecture. When an intervention changes the architecture during the run
    (plasticity injection adds heads), the publisher sends the whole ``network`` (a CPU copy)
    instead, and actors replace theirs. Picklable before its first use, so the driver can build it
    and hand it to the learner process.
    """

    def __init__(self, store: Any, *, actor_keys: set[str] | None = None):
        self.store = store
        self._keys = actor_keys  # the state-dict keys of the network the actors build
        self._last_ref = None  # keeps the newest weights alive until the next ones replace them
        self._next: tuple[int, Any] | None = None  # the publish waiting for the thread
        self._busy = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "keys": self._keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], actor_keys=state["keys"])

    def __call__(self, version: int, weights: dict[str, Any], network: Any = None) -> None:
        self._raise_error()
        if self._keys is None:
            self._keys = set(weights)
        if set(weights) != self._keys and network is not None:
            payload: Any = copy.deepcopy(network).cpu()
        else:  # already a CPU copy (Algorithm.acting_weights), so the arrays can share its memory
            payload = {k: v.detach().numpy() if hasattr(v, "numpy") else v for k, v in weights.items()}
        with self._cond:
            self._next = (int(version), payload)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="weight-publisher", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is in the store (raises a publishing failure)."""
        with self._cond:
            if not self._cond.wait_for(lambda: (self._next is None and not self._busy) or self._error is not None,
                                       timeout=timeout):
                raise TimeoutError(f"weights not published within {timeout:g} s")
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"publishing weights to the weight store failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None)
                (version, payload), self._next, self._busy = self._next, None, True
            try:
                ref = ray.put(payload)
                ray.get(self.store.publish.remote(version, [ref]))
                self._last_ref = ref
            except BaseException as exc:  # noqa: BLE001 - raised in the learner by the next publish
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class RayWeightSource:
    """Actor side: the ``weights_source`` interface of ``actors.actor.Actor`` over a WeightStore handle
    (``current_task()`` included: actors switch tasks when they poll for weights; ``poll`` asks for
    version, task and the env-step gate in one round trip)."""

    def __init__(self, store: Any):
        self.store = store

    def poll(self, actor: int, env_steps: int, held: bool = False) -> PollAnswer:
        return ray.get(self.store.poll.remote(actor, env_steps, held))

    def latest_version(self) -> int:
        return ray.get(self.store.latest_version.remote())

    def current_task(self) -> int:
        return ray.get(self.store.current_task.remote())

    def get(self, version: int) -> dict[str, Any] | Any | None:
        """The newest weights as a state dict of tensors (or a whole network), None before the first publish."""
        latest, holder = ray.get(self.store.latest.remote())
        if latest < 0 or not holder:
            return None
        return as_weights(ray.get(holder[0]))


def as_weights(payload: Any) -> Any:
    """What a publish put in the object store, as an actor loads it: a state dict of tensors (own, writable
    copies of the store's read-only numpy arrays), or the whole network as it was sent."""
    if isinstance(payload, dict):
        return {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in payload.items()}
    return payload
