"""A vectorized sum tree over a fixed number of non-negative leaves.

Batch updates touch each tree level once with numpy; a batch of prefix searches walks all values down the
tree together (one numpy step per level), so sampling 256 items costs ~log2(capacity) small array ops.

Example::

    import numpy as np
    from replay.sum_tree import SumTree

    tree = SumTree(capacity=4)
    tree.set(np.array([0, 1, 3]), np.array([1.0, 2.0, 3.0]))
    assert tree.total == 6.0
    # prefix sums are [1, 3, 3, 6]: 0.5 falls in leaf 0, 1.0 and 2.9 in leaf 1, 3.0 in leaf 3 (leaf 2 is empty)
    assert tree.find(np.array([0.5, 1.0, 2.9, 3.0])).tolist() == [0, 1, 1, 3]
"""

from __future__ import annotations

import numpy as np

from replay.errors import InvalidArgument

__all__ = ["SumTree"]


class SumTree:
    """Binary tree of float64 partial sums; leaf ``i`` lives at ``tree[leaves + i]``, the root at ``tree[1]``.

    Parents are always recomputed as ``left + right`` (never adjusted by deltas) so the tree has no
    drift: every internal node equals the float64 sum of its two children exactly.
    """

    def __init__(self, capacity: int, *, search_top_levels: int = 10) -> None:
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"sum tree capacity {capacity!r}: expected a positive int")
        if not isinstance(search_top_levels, int) or search_top_levels < 0:
            raise ValueError(f"search_top_levels {search_top_levels!r}: expected an int >= 0")
        self.capacity = int(capacity)
        self._leaves = 1 << max(0, (self.capacity - 1).bit_length())
        self._depth = self._leaves.bit_length() - 1
        # find() jumps over the top levels with one cumsum + searchsorted over the (at most 1024) nodes
        # of level `_top`, then walks the remaining levels: far fewer numpy calls than a full walk.
        # 10 measured best for 20k..1M leaves (cumsum over 1024 nodes costs about two walked levels).
        self._top = min(self._depth, search_top_levels)
        self.tree = np.zeros(2 * self._leaves, dtype=np.float64)

    # ------------------------------------------------------------------ queries
    @property
    def total(self) -> float:
        return float(self.tree[1])

    @property
    def nbytes(self) -> int:
        return int(self.tree.nbytes)

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Leaf values at ``indices`` (float64 copy)."""
        return self.tree[self._leaves + self._check_indices(indices)]

    def leaves(self) -> np.ndarray:
        """All ``capacity`` leaf values (a view)."""
        return self.tree[self._leaves : self._leaves + self.capacity]

    # ------------------------------------------------------------------ updates
    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves; with repeated indices the last value wins. Values must be finite and >= 0."""
        idx = self._check_indices(indices)
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        if vals.shape != idx.shape:
            raise InvalidArgument(
                f"sum tree set: {idx.size} indices but {vals.size} values; expected equal counts"
            )
        bad = ~np.isfinite(vals) | (vals < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgument(f"sum tree value at position {i} is {float(vals[i])!r}; expected finite and >= 0")
        if idx.size == 0:
            return
        # Keep the last occurrence of each index: unique over the reversed arrays keeps first-in-reverse.
        uniq, first = np.unique(idx[::-1], return_index=True)
        self.tree[self._leaves + uniq] = vals[::-1][first]
        self._refresh_parents(uniq)

    def _refresh_parents(self, leaf_indices: np.ndarray) -> None:
        # Levels below `_top`: one gather of child pairs and one store per level for the touched nodes
        # (repeated parents are harmless, each copy writes the same sum, so no per-level unique()).
        # Levels `_top - 1` .. 0 hold < 2**_top nodes in total: recomputing them whole with slice adds is
        # cheaper than more gathers.
        tree = self.tree
        pairs = tree.reshape(-1, 2)  # pairs[i] = children of node i
        nodes = (leaf_indices + self._leaves) >> 1
        for _ in range(self._depth - self._top):
            p = pairs[nodes]
            tree[nodes] = p[:, 0] + p[:, 1]
            nodes >>= 1
        lo = 1 << self._top >> 1
        while lo >= 1:
            np.add(tree[2 * lo : 4 * lo : 2], tree[2 * lo + 1 : 4 * lo : 2], out=tree[lo : 2 * lo])
            lo >>= 1

    def clear(self) -> None:
        self.tree[:] = 0.0

    # ------------------------------------------------------------------ search
    def find(self, values: np.ndarray) -> np.ndarray:
        """For each ``u`` in ``[0, total)``, the leaf ``i`` with ``prefix(i) <= u < prefix(i + 1)``.

        Values are clamped into ``[0, total)``. Zero-valued leaves are never returned while total > 0:
        float rounding can leave ``u`` a few ulps above the mass of the subtree it descends into, which
        could steer it into an empty right-most branch; those (rare) lanes are redone exactly against the
        leaves' cumulative sums.
        """
        total = self.tree[1]
        if not total > 0:
            raise InvalidArgument("sum tree search on an empty tree (total mass 0)")
        u = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), 0.0, np.nextafter(total, 0.0))
        u0 = u.copy()
        tree = self.tree
        first = 1 << self._top  # index of the first node on level `_top`
        cum = np.cumsum(tree[first : 2 * first])
        j = np.minimum(np.searchsorted(cum, u, side="right"), first - 1)
        u -= np.where(j > 0, cum[j - 1], 0.0)  # cum[j-1] <= u, so u stays >= 0
        node = (first + j).astype(np.intp)
        left = np.empty_like(u)
        go_right = np.empty(u.shape, dtype=bool)
        # Five in-place numpy calls per remaining level, all on batch-sized arrays.
        for _ in range(self._depth - self._top):
            np.left_shift(node, 1, out=node)
            np.take(tree, node, out=left)
            np.greater_equal(u, left, out=go_right)
            np.subtract(u, left, out=u, where=go_right)
            np.add(node, go_right, out=node)
        leaf = node - self._leaves
        bad = tree[node] <= 0
        if bad.any():
            cum = np.cumsum(self.leaves())
            # side="right" on the monotone cumsum lands on a leaf with positive mass, except past the end
            # (the tree's total and the cumsum may round differently): then take the last positive leaf.
            found = np.searchsorted(cum, u0[bad], side="right")
            last_positive = int(np.flatnonzero(self.leaves() > 0)[-1])
            leaf[bad] = np.where(found >= self.capacity, last_positive, found)
        return leaf

    # ------------------------------------------------------------------ helpers
    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        if idx.size and (idx.dtype.kind not in "iu"):
            raise InvalidArgument(f"sum tree indices have dtype {idx.dtype}; expected integers")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            i = int(np.argmax((idx < 0) | (idx >= self.capacity)))
            raise InvalidArgument(f"sum tree index {int(idx[i])} out of range [0, {self.capacity})")
        return idx

    def load(self, tree: np.ndarray) -> None:
        """Restore from a saved ``tree`` array (validated: shape, finite, non-negative, parents consistent).

        Parents are always stored as the float64 sum of their children (see the class docstring), so a
        saved tree whose internal node differs from ``left + right`` in any bit, or with mass in the
        padding leaves past ``capacity``, was not written by this class: it is refused, naming the
        first such node, and nothing is loaded.
        """
        arr = np.asarray(tree)
        if arr.shape != self.tree.shape or arr.dtype != np.float64:
            raise ValueError(
                f"saved sum tree has shape {arr.shape} dtype {arr.dtype}; expected {self.tree.shape} float64"
            )
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise ValueError("saved sum tree has non-finite or negative values")
        leaves = self._leaves
        padding = arr[leaves + self.capacity :]
        if padding.any():
            i = int(np.flatnonzero(padding)[0])
            raise ValueError(
                f"saved sum tree has mass {float(padding[i])!r} in padding leaf {self.capacity + i} "
                f"(capacity {self.capacity}); expected 0"
            )
        children = arr[2 : 2 * leaves : 2] + arr[3 : 2 * leaves : 2]   # sums for nodes 1 .. leaves-1
        wrong = arr[1:leaves] != children
        if wrong.any() or arr[0] != 0:
            node = 0 if arr[0] != 0 else int(np.argmax(wrong)) + 1
            expected = 0.0 if node == 0 else float(children[node - 1])
            raise ValueError(
                f"saved sum tree node {node} is {float(arr[node])!r} but its children sum to {expected!r}; "
                "the tree is corrupt"
            )
        self.tree[:] = arr
