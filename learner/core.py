"""The algorithm interface: what the learner loop, plasticity and checkpoints need from an algorithm.

An algorithm is a plain class (no Ray, no gRPC): it takes a batch of tensors and returns metrics
and, optionally, new priorities. DQN (``learner/dqn.py``) is one; SAC will be another. Everything
around it (prefetching, priority write-back, weight publishing, diagnostics, checkpoints) is written
against this protocol only.

Example (what ``learner/loop.py`` and the checkpoint code do)::

    algorithm: Algorithm = DQN(DQNConfig(), NetworkConfig(), obs_shape=(4,), num_actions=2, obs_dtype="float32")
    result = algorithm.update(batch, weights=importance_weights)     # UpdateResult
    if result.priorities is not None:
        replay.update_priorities(keys, result.priorities)
    publish(version, algorithm.acting_weights())                     # CPU state dict for the actors
    for name, net in algorithm.networks().items():                   # "q"; or "actor" and "critic"
        print(name, type(net.module).__name__, net.optimizer, net.target)
    losses = algorithm.per_sample_loss(batch)                        # [B], the loss actually trained
    algorithm.task_switch(task=1)                                    # interventions' task-switch hooks
    state = algorithm.state_dict(); algorithm.load_state_dict(state)  # bit-identical continuation
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from plasticity.base import NetworkSlot

__all__ = ["Algorithm", "DeferredResult", "InvalidBatch", "NetworkSlot", "UpdateResult", "load_state_or_keep",
           "packed_result", "switch_task"]


class InvalidBatch(ValueError):
    """A batch an algorithm refuses before touching any state (wrong fields, shapes, dtypes or values).

    The learner loop drops such a batch, counts it and goes on: one bad batch must not end a long run.
    """


@dataclass(frozen=True)
class UpdateResult:
    """What one update returns."""

    metrics: dict[str, float]
    """Scalar metrics of this update (loss, ..., and ``<intervention>/...`` entries)."""
    priorities: np.ndarray | None = None
    """``[B]`` float32 new replay priorities in batch order, or None if the algorithm has none."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else an algorithm wants the loop to see (unused by the loop itself)."""


class DeferredResult:
    """An update's result on its way to the host: what keeps a GPU learner from waiting on every update.

    The update's priorities and scalar metrics, packed into one device tensor, are copied into pinned
    host memory with a non-blocking copy queued behind the update's kernels, and an event marks its
    end. The learner queues the next update meanwhile and calls :meth:`result` one update later, when
    the copy is normally done (the wait, if any, ends with the copy, not with later work)::

        pending = algorithm.update(batch, weights=w, defer=True)   # DeferredResult on CUDA
        algorithm.update(next_batch, defer=True)                  # queued behind it
        result = pending.result()                                 # UpdateResult, as without defer
    """

    def __init__(self, packed: torch.Tensor, *, size: int, names: list[str], metrics: dict[str, float]):
        self._host = packed.detach().to("cpu", non_blocking=True)
        self._event = None
        if packed.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._size, self._names, self._metrics = size, names, metrics

    def result(self) -> UpdateResult:
        if self._event is not None:
            self._event.synchronize()
        values = self._host.numpy()
        metrics = dict(self._metrics)
        metrics.update(zip(self._names, values[self._size:].tolist(), strict=True))
        return UpdateResult(metrics=metrics, priorities=values[:self._size].copy())


def packed_result(priorities: torch.Tensor, names: list[str], scalars: torch.Tensor, metrics: dict[str, float], *,
                  defer: bool = False) -> UpdateResult | DeferredResult:
    """An update's ``priorities`` ``[B]`` and named ``scalars`` with the host ``metrics`` it has already, in one
    device-to-host transfer: now (an :class:`UpdateResult`), or with ``defer`` on a CUDA device as a
    :class:`DeferredResult` (no host synchronization in the update)."""
    packed = torch.cat([priorities.detach().float(), scalars.detach().float()])
    pending = DeferredResult(packed, size=priorities.shape[0], names=names, metrics=metrics)
    return pending if defer and packed.is_cuda else pending.result()


@runtime_checkable
class Algorithm(Protocol):
    """The learner-side algorithm (see the module docstring for how it is driven)."""

    device: torch.device

    def update(self, batch: Mapping[str, Any], *, weights: Any = None, defer: bool = False) -> UpdateResult:
        """One gradient step on ``batch`` (importance ``weights`` [B] or None); bad input raises InvalidBatch first.

        ``defer``: on a CUDA device, return a :class:`DeferredResult` instead of waiting for the result's copy
        to the host (what the learner loop asks for; elsewhere an UpdateResult either way)."""
        ...

    def acting_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the acting network's state dict (what actors load)."""
        ...

    def acting_network(self) -> torch.nn.Module:
        """The live acting network (sent whole when its architecture changed, e.g. after an injection)."""
        ...

    def networks(self) -> dict[str, NetworkSlot]:
        """The trainable networks by name, each with its optimizer and target network (or None)."""
        ...

    def per_sample_loss(self, batch: Mapping[str, Any], *, network: str | None = None) -> torch.Tensor:
        """``[B]`` per-sample loss of ``network`` (default: the main one) on ``batch``, differentiable.

        The loss the update trains (QR heads: the quantile loss), which curvature and gradient
        interference diagnostics measure.
        """
        ...

    def task_switch(self, task: int) -> dict[str, float]:
        """The task changed to ``task``: tell the interventions; returns their metrics."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (networks, optimizers, counters, RNGs)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; on error the previous state is kept and ValueError raised."""
        ...


def load_state_or_keep(state: Any, *, algorithm: str, keys: set[str] | frozenset[str], state_format: int,
                       interventions: Any, current: Callable[[], Mapping[str, Any]],
                       apply: Callable[[Mapping[str, Any]], None]) -> None:
    """What every algorithm's ``load_state_dict`` checks, then ``apply(state)``, all or nothing.

    ``state`` must have exactly ``keys``, ``state["format"] == state_format`` and the same (network,
    intervention) list as ``interventions``; if ``apply`` fails half-way, ``apply(current())`` as taken
    before puts the previous state back and ValueError names what failed.

        load_state_or_keep(state, algorithm="DQN", keys=KEYS, state_format=2, interventions=self.interventions,
                           current=self.state_dict, apply=self._apply_state)
    """
    if not isinstance(state, Mapping) or set(state) != set(keys):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{algorithm} state must have keys {sorted(keys)}, got {got}")
    if state["format"] != state_format:
        raise ValueError(f"{algorithm} state format {state['format']!r} is not supported (expected {state_format})")
    entries = state["interventions"]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and set(e) == {"name", "network", "state"}
                                                 for e in entries):
        raise ValueError(f"{algorithm} state 'interventions' must be a list of {{name, network, state}} entries, "
                         f"got {entries!r}")
    saved = [(e["network"], e["name"]) for e in entries]
    mine = [(network, iv.name) for network, iv in interventions]
    if saved != mine:
        raise ValueError(f"checkpoint interventions {saved} differ from this learner's {mine} (network, name)")
    backup = copy.deepcopy(current())
    try:
        apply(state)
    except Exception as exc:
        apply(backup)
        raise ValueError(f"could not load {algorithm} state ({exc}); the previous state was kept") from exc


def switch_task(ctx: Any, interventions: Any, task: int | None) -> dict[str, float]:
    """What every algorithm's ``task_switch`` does: ``ctx.task`` becomes ``task`` (None: the next one) and
    every intervention's ``on_task_switch`` runs; returns their metrics. ValueError for a bad ``task``."""
    if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
        raise ValueError(f"task must be an integer >= 0, got {task!r}")
    ctx.task = ctx.task + 1 if task is None else task
    return interventions.on_task_switch(ctx)
