"""Samplers: which live items a table hands out. Uniform, prioritized (sum tree) and FIFO queue.

A table keeps its live items as the contiguous key range ``[oldest, oldest + size)`` (items are only
ever removed oldest-first: ring overwrite, frame-pool eviction, FIFO consumption), and an item's slot is
``key % capacity``. Samplers therefore only track per-slot state and are told which key ranges appear
and disappear. All three satisfy :class:`replay.interfaces.Sampler` and are registered by name in
:data:`SAMPLERS`.

Priorities must be finite and >= 0, and ``priority ** priority_exponent`` at most
``replay.limits.MAX_ITEM_MASS`` (1e100), which keeps the sum tree's total finite; positive masses below
``MIN_ITEM_MASS`` (1e-100) are raised to it so that no draw's probability underflows to 0.

Example::

    import numpy as np
    from replay.samplers import PrioritizedSampler, importance_weights

    s = PrioritizedSampler(capacity=4, priority_exponent=1.0)
    s.on_insert(first_key=0, n=3, priorities=np.array([1.0, 2.0, 1.0]))
    keys, probs = s.sample(batch_size=2, oldest=0, size=3, rng=np.random.default_rng(0))
    w = importance_weights(probabilities=probs, size=3, beta=1.0)   # float32, max weight 1
"""

from __future__ import annotations

from typing import Any

import numpy as np

from replay.errors import InvalidArgument
from replay.interfaces import Sampler
from replay.limits import MAX_ITEM_MASS, MIN_ITEM_MASS
from replay.sum_tree import SumTree

__all__ = [
    "FifoSampler",
    "PrioritizedSampler",
    "SAMPLERS",
    "UniformSampler",
    "importance_weights",
    "make_sampler",
    "validate_priorities",
]


def validate_priorities(priorities: Any, *, n: int, exponent: float | None = None) -> np.ndarray:
    """Return ``priorities`` as a float64 vector of length ``n``; refuse NaN, inf and negatives and, with
    the table's ``exponent``, priorities whose ``priority ** exponent`` exceeds
    ``replay.limits.MAX_ITEM_MASS`` (1e100), the bound that keeps the sum tree's total finite.

    The error names the first bad index and its value, e.g. ``priority[3] = nan``.
    """
    arr = np.asarray(priorities)
    if arr.dtype.kind not in "iuf":
        raise InvalidArgument(f"priorities have dtype {arr.dtype}; expected a float or int array")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidArgument(f"priorities have shape {arr.shape}; expected ({n},), one per row")
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(f"priority[{i}] = {float(arr[i])!r}; expected a finite value >= 0")
    if exponent is not None and arr.size:
        with np.errstate(over="ignore"):   # numpy powers overflow to inf (Python floats would raise)
            top = float(np.float64(arr.max()) ** np.float64(exponent)) if arr.max() > 0 else 0.0
        if not top <= MAX_ITEM_MASS:
            i = int(np.argmax(arr))
            raise InvalidArgument(
                f"priority[{i}] = {float(arr[i])!r}: priority ** priority_exponent = {top!r} exceeds "
                f"{MAX_ITEM_MASS:g} (priority_exponent {exponent:g}); expected priorities whose "
                f"priority ** priority_exponent <= {MAX_ITEM_MASS:g}, which keeps the sum of priorities finite"
            )
    return arr


def importance_weights(*, probabilities: np.ndarray, size: int, beta: float) -> np.ndarray:
    """PER importance-sampling weights ``(size * P)^-beta / max``, as float32.

    Example: probabilities [0.5, 0.25], size 4, beta 1 -> raw [0.5, 1.0] -> [0.5, 1.0].
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if size < 1:
        raise InvalidArgument(f"importance_weights: size {size!r}; expected >= 1")
    if not (0.0 <= beta <= 1.0) or not np.isfinite(beta):
        raise InvalidArgument(f"importance_weights: beta {beta!r}; expected a value in [0, 1]")
    if p.size == 0:
        return np.zeros(0, dtype=np.float32)
    bad = ~np.isfinite(p) | (p <= 0) | (p > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(
            f"importance_weights: probabilities[{i}] = {float(p[i])!r}; expected a value in (0, 1]"
        )
    w = (size * p) ** (-beta)
    return (w / w.max()).astype(np.float32)


def _keys_of_slots(slots: np.ndarray, *, oldest: int, capacity: int) -> np.ndarray:
    """Map slots back to the live keys in ``[oldest, oldest + capacity)`` that occupy them."""
    return (np.int64(oldest) + (slots.astype(np.int64) - oldest) % capacity).astype(np.uint64)


def _present(keys: np.ndarray, *, oldest: int, end: int) -> np.ndarray:
    k = np.asarray(keys)
    if k.dtype.kind not in "iu":
        raise InvalidArgument(f"keys have dtype {k.dtype}; expected uint64 item keys")
    k = k.reshape(-1)
    if k.dtype.kind == "i" and k.size and k.min() < 0:
        raise InvalidArgument(f"key {int(k.min())} is negative; expected uint64 item keys")
    k = k.astype(np.uint64)
    return (k >= np.uint64(oldest)) & (k < np.uint64(end))


class UniformSampler:
    """Every live item equally likely, with replacement."""

    name = "uniform"
    consumes = False  # sampled items stay in the table

    def __init__(self, *, capacity: int, priority_exponent: float | None = None) -> None:
        # priority_exponent is accepted (and ignored) so that make_sampler builds every sampler alike.
        self.capacity = capacity

    def on_insert(self, *, first_key: int, n: int, priorities: np.ndarray | None) -> None:
        """Uniform sampling needs no per-item state."""

    def on_remove(self, *, first_key: int, end_key: int) -> None:
        """Uniform sampling needs no per-item state."""

    def sample(self, *, batch_size: int, oldest: int, size: int, rng: np.random.Generator):
        offsets = rng.integers(0, size, size=batch_size, dtype=np.int64)
        keys = (offsets + oldest).astype(np.uint64)
        return keys, np.full(batch_size, 1.0 / size, dtype=np.float64)

    def update(self, *, keys: np.ndarray, priorities: np.ndarray, oldest: int, end: int) -> int:
        return int(_present(keys, oldest=oldest, end=end).sum())

    def mass(self, *, size: int) -> float:
        return float(size)

    @property
    def nbytes(self) -> int:
        return 0

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        """Uniform sampling needs no per-item state."""


class FifoSampler(UniformSampler):
    """Queue: each item is handed out exactly once, oldest first; sampled items leave the table."""

    name = "fifo"
    consumes = True

    def sample(self, *, batch_size: int, oldest: int, size: int, rng: np.random.Generator):
        if batch_size > size:
            raise InvalidArgument(f"FIFO sample of {batch_size} with only {size} items waiting")
        keys = np.arange(oldest, oldest + batch_size, dtype=np.uint64)
        # Deterministic: the item at the head of the queue is drawn with probability 1.
        return keys, np.ones(batch_size, dtype=np.float64)


class PrioritizedSampler:
    """Proportional prioritized sampling: P(i) = p_i^alpha / sum_j p_j^alpha, with replacement.

    New items get the largest priority seen so far (initially 1.0) unless priorities are given at insert.
    A batch is drawn by stratified search: the mass is cut into ``batch_size`` equal strata and one
    uniform point is drawn in each (strata in random order), which keeps every draw's marginal
    probability at P(i) while spreading the batch over the distribution. If every live priority is 0
    the sampler falls back to uniform over live items (reported probabilities say so).
    """

    name = "prioritized"
    consumes = False

    def __init__(self, *, capacity: int, priority_exponent: float) -> None:
        self.capacity = capacity
        self.alpha = float(priority_exponent)
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def _mass(self, priorities: np.ndarray) -> np.ndarray:
        # 0**0 would be 1 in numpy; a zero priority must stay unsampleable even with alpha 0. Positive
        # masses are kept at least MIN_ITEM_MASS so that no draw's probability underflows to 0 (see
        # replay.limits); validate_priorities already bounded them from above.
        with np.errstate(under="ignore"):
            return np.where(priorities > 0, np.maximum(priorities**self.alpha, MIN_ITEM_MASS), 0.0)

    def on_insert(self, *, first_key: int, n: int, priorities: np.ndarray | None) -> None:
        slots = np.arange(first_key, first_key + n, dtype=np.int64) % self.capacity
        if priorities is None:
            pr = np.full(n, self.max_priority, dtype=np.float64)
        else:
            pr = priorities
            self.max_priority = max(self.max_priority, float(pr.max()))
        self.tree.set(slots, self._mass(pr))

    def on_remove(self, *, first_key: int, end_key: int) -> None:
        count = end_key - first_key
        if count <= 0:
            return
        if count >= self.capacity:
            self.tree.clear()
            return
        slots = np.arange(first_key, end_key, dtype=np.int64) % self.capacity
        self.tree.set(slots, np.zeros(count))

    def sample(self, *, batch_size: int, oldest: int, size: int, rng: np.random.Generator):
        total = self.tree.total
        if not total > 0:
            offsets = rng.integers(0, size, size=batch_size, dtype=np.int64)
            return (offsets + oldest).astype(np.uint64), np.full(batch_size, 1.0 / size)
        strata = rng.permutation(batch_size).astype(np.float64)
        u = (strata + rng.random(batch_size)) * (total / batch_size)
        slots = self.tree.find(u)
        probs = self.tree.tree[self.tree._leaves + slots] / total
        return _keys_of_slots(slots, oldest=oldest, capacity=self.capacity), probs

    def update(self, *, keys: np.ndarray, priorities: np.ndarray, oldest: int, end: int) -> int:
        present = _present(keys, oldest=oldest, end=end)
        count = int(present.sum())
        if count:
            k = np.asarray(keys).reshape(-1)[present].astype(np.int64)
            pr = priorities[present]
            self.tree.set(k % self.capacity, self._mass(pr))
            self.max_priority = max(self.max_priority, float(pr.max()))
        return count

    def mass(self, *, size: int) -> float:
        return self.tree.total

    @property
    def nbytes(self) -> int:
        return self.tree.nbytes

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"max_priority": self.max_priority, "priority_exponent": self.alpha}, {
            "tree": self.tree.tree.copy()
        }

    def compact(self, *, keep: np.ndarray, end: int) -> None:
        leaves = self.tree.leaves().copy()
        moved = np.zeros(self.capacity)
        targets = np.arange(end - keep.size, end, dtype=np.int64)
        moved[targets % self.capacity] = leaves[keep.astype(np.int64) % self.capacity]
        self.tree.set(np.arange(self.capacity), moved)

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        if "tree" not in arrays:
            raise ValueError("saved prioritized sampler has no 'tree' array")
        mp = float(meta["max_priority"])
        if not np.isfinite(mp) or mp < 0 or (mp > 0 and not mp**self.alpha <= MAX_ITEM_MASS):
            raise ValueError(f"saved max_priority {mp!r}; expected finite >= 0 with max_priority ** alpha <= "
                             f"{MAX_ITEM_MASS:g}")
        self.tree.load(arrays["tree"])
        self.max_priority = mp


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (UniformSampler, PrioritizedSampler, FifoSampler)
}
"""Registered samplers by name; each is built as ``cls(capacity=..., priority_exponent=...)``."""


def make_sampler(name: str, *, capacity: int, priority_exponent: float) -> Sampler:
    """Build the sampler named ``name`` (one of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}: expected one of {list(SAMPLERS)}")
    return SAMPLERS[name](capacity=capacity, priority_exponent=priority_exponent)
