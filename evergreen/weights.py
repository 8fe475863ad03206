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
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np
import ray
import torch


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds the latest (version, object ref) pair. Refs are wrapped in a list so Ray does not resolve them."""

    def __init__(self, task: int = 0) -> None:
        self._version = -1
        self._ref: list[Any] = []
        self._task = int(task)  # the scenario task actors act on (continual runs)

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
    (``current_task()`` included: actors switch tasks when they poll for weights)."""

    def __init__(self, store: Any):
        self.store = store

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
