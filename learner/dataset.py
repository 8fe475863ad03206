"""Batches for an algorithm from the replay service: sampling, importance exponent, tensor conversion.

``ReplayDataset`` is what the prefetch thread calls. It asks a replay client for a batch (any object
with ``sample(batch_size, beta=..., timeout=...)`` returning keys, columns and importance weights,
e.g. ``replay.client.ReplayClient``), turns the columns into host tensors (pinned when the learner
is on a GPU, so the algorithm's host-to-device copy can overlap compute), and anneals the PER
importance exponent from ``beta_start`` to 1 over the run's env steps. A sample that times out
(replay still filling, or the rate limiter holding the learner back) is ``None``, not an error.

``sample`` returns the batches of one replay call as a list: one batch, or ``batches_per_sample`` of
them in one call. A sample call costs about the same for 128 rows as for 1024 (the gRPC round trip and the
decoding are per call), and in the learner process that cost is paid under the GIL that the update
also needs, so for a small network it decides the learner's speed. The rows of one call are shuffled
before they are split (a call's rows come back grouped by shard), and each batch's importance weights
are normalized by its own maximum, as they would be had it been sampled alone. The price is
freshness: the last batch of a call was drawn ``batches_per_sample - 1`` updates earlier than it is
trained on (on top of the prefetch queue), so its priorities are that much staler.

Example::

    dataset = ReplayDataset(client, batch_size=128, prioritized=False, beta_start=0.4,
                            total_env_steps=100_000, device=torch.device("cpu"))
    dataset.progress(env_steps=25_000)          # beta is now 0.4 + 0.6 * 0.25
    [batch] = dataset.sample(timeout=0.5)       # [Batch(tensors, keys, weights, policy_version)] or None

    fast = ReplayDataset(client, batch_size=128, prioritized=False, batches_per_sample=8)
    batches = fast.sample(timeout=0.5)          # 8 batches of 128 from one call of 1024 rows
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from replay.client import ShardUnavailable
from replay.errors import DeadlineExceeded

__all__ = ["Batch", "ReplayDataset"]

#: Columns that describe a row rather than feed the loss.
METADATA_FIELDS = ("policy_version", "task")


@dataclass
class Batch:
    """One sampled batch, ready for the algorithm."""

    tensors: dict[str, torch.Tensor]
    keys: np.ndarray
    weights: torch.Tensor | None
    policy_version: np.ndarray | None = None
    task: np.ndarray | None = None
    """The scenario task each row was collected on (None if the table has no task column)."""
    table: str = ""
    """The replay table sampled (``SampleBatch.table``): where this batch's priority updates go."""


class ReplayDataset:
    """See the module docstring."""

    def __init__(
        self,
        client: Any,
        *,
        batch_size: int,
        prioritized: bool,
        beta_start: float = 0.4,
        total_env_steps: int = 1,
        device: torch.device | str = "cpu",
        batches_per_sample: int = 1,
        seed: int | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(batches_per_sample, bool) or not isinstance(batches_per_sample, int) or batches_per_sample < 1:
            raise ValueError(f"batches_per_sample must be an integer >= 1, got {batches_per_sample!r}")
        if not 0.0 <= beta_start <= 1.0:
            raise ValueError(f"beta_start must be in [0, 1], got {beta_start!r}")
        if isinstance(total_env_steps, bool) or not isinstance(total_env_steps, int) or total_env_steps < 1:
            raise ValueError(f"total_env_steps must be an integer >= 1, got {total_env_steps!r}")
        self.client = client
        self.batch_size = batch_size
        self.prioritized = prioritized
        self.beta_start = float(beta_start)
        self.total_env_steps = total_env_steps
        self.batches_per_sample = batches_per_sample
        self._pin = torch.device(device).type == "cuda"
        self._env_steps = 0
        self._rng = np.random.default_rng(seed)

    def progress(self, *, env_steps: int) -> None:
        """The run's env steps so far (drives the importance-exponent annealing)."""
        self._env_steps = max(0, int(env_steps))

    @property
    def beta(self) -> float:
        fraction = min(1.0, self._env_steps / self.total_env_steps)
        return self.beta_start + (1.0 - self.beta_start) * fraction

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory() if self._pin else tensor

    def sample(self, timeout: float) -> list[Batch] | None:
        """The ``batches_per_sample`` batches of one replay call, or None if replay could not give them
        within ``timeout`` seconds."""
        try:
            raw = self.client.sample(self.batch_size * self.batches_per_sample, beta=self.beta, timeout=timeout)
        except (DeadlineExceeded, ShardUnavailable):   # replay filling, or a shard restarting: ask again
            return None
        return self._split(raw)

    def _split(self, raw: Any) -> list[Batch]:
        k, n = self.batches_per_sample, self.batch_size
        columns, keys, weights = raw.columns, raw.keys, raw.weights
        if k > 1:
            order = self._rng.permutation(len(keys))
            columns = {name: array[order] for name, array in columns.items()}
            keys, weights = keys[order], weights[order]
        batches = []
        for i in range(k):
            rows = slice(i * n, (i + 1) * n)
            tensors = {name: self._tensor(array[rows]) for name, array in columns.items()
                       if name not in METADATA_FIELDS}
            batch_weights = None
            if self.prioritized:
                w = weights[rows]
                batch_weights = self._tensor(w / w.max() if k > 1 else w)
            versions, tasks = columns.get("policy_version"), columns.get("task")
            batches.append(Batch(tensors=tensors, keys=keys[rows], weights=batch_weights,
                                 policy_version=None if versions is None else versions[rows],
                                 task=None if tasks is None else tasks[rows],
                                 table=getattr(raw, "table", "")))
        return batches
