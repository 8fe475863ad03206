"""Versioned weights from the learner to the actors through the Ray object store.

The learner ``ray.put``s each new state dict once and hands the reference to a tiny ``WeightStore``
actor; actors ask the store for the latest version number (a few bytes) every few hundred steps
and fetch the weights only when it changed. Weights never pass through the driver's memory twice
and experience never passes through Ray at all (it goes to replay over gRPC).

    store = WeightStore.options(name="weights").remote()
    publisher = WeightPublisher(store, actor_keys=set(actor_network.state_dict()))   # picklable
    publisher(120, dqn.acting_weights(), dqn.acting_network())   # learner side
    source = RayWeightSource(store)                        # picklable; give it to actors
    if source.latest_version() > mine: state = source.get(source.latest_version())
"""

from __future__ import annotations

import copy
from typing import Any

import ray


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds the latest (version, object ref) pair. Refs are wrapped in a list so Ray does not resolve them."""

    def __init__(self) -> None:
        self._version = -1
        self._ref: list[Any] = []

    def publish(self, version: int, ref_holder: list[Any]) -> None:
        if version >= self._version:
            self._version, self._ref = version, ref_holder

    def latest_version(self) -> int:
        return self._version

    def latest(self) -> tuple[int, list[Any]]:
        return self._version, self._ref


class WeightPublisher:
    """Learner side: ``publisher(version, weights, network)``; keeps the last ref alive until the next publish.

    Actors build their network once from the run config, so they can load a state dict only while
    its keys match that architecture. When an intervention changes the architecture during the run
    (plasticity injection adds heads), the publisher sends the whole ``network`` (a CPU copy)
    instead, and actors replace theirs. Picklable before its first use, so the driver can build it
    and hand it to the learner process.
    """

    def __init__(self, store: Any, *, actor_keys: set[str] | None = None):
        self.store = store
        self._keys = actor_keys  # the state-dict keys of the network the actors build
        self._last_ref = None
        self._pending = None  # the store's acknowledgement of the previous publish

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "keys": self._keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], actor_keys=state["keys"])

    def __call__(self, version: int, weights: dict[str, Any], network: Any = None) -> None:
        if self._keys is None:
            self._keys = set(weights)
        if set(weights) != self._keys and network is not None:
            payload: Any = copy.deepcopy(network).cpu()
        else:
            payload = weights  # already a CPU copy (Algorithm.acting_weights)
        # The learner does not wait for the store: the previous publish, long done by now, is the only
        # one awaited, so at most one is in flight and a failed store still surfaces here.
        if self._pending is not None:
            ray.get(self._pending)
        ref = ray.put(payload)
        self._pending = self.store.publish.remote(version, [ref])
        self._last_ref = ref


class RayWeightSource:
    """Actor side: the ``weights_source`` interface of ``actors.actor.Actor`` over a WeightStore handle."""

    def __init__(self, store: Any):
        self.store = store

    def latest_version(self) -> int:
        return ray.get(self.store.latest_version.remote())

    def get(self, version: int) -> dict[str, Any] | None:
        latest, holder = ray.get(self.store.latest.remote())
        if latest < 0 or not holder:
            return None
        return ray.get(holder[0])
