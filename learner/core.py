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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from plasticity.base import NetworkSlot

__all__ = ["Algorithm", "InvalidBatch", "NetworkSlot", "UpdateResult"]


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


@runtime_checkable
class Algorithm(Protocol):
    """The learner-side algorithm (see the module docstring for how it is driven)."""

    device: torch.device

    def update(self, batch: Mapping[str, Any], *, weights: Any = None) -> UpdateResult:
        """One gradient step on ``batch`` (importance ``weights`` [B] or None); bad input raises InvalidBatch first."""
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
