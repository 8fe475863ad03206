"""Sum tree invariants (hypothesis) and exact small cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.errors import InvalidArgument
from replay.sum_tree import SumTree


def _check_internal_nodes(tree: SumTree) -> None:
    t = tree.tree
    for node in range(1, tree._leaves):
        assert t[node] == t[2 * node] + t[2 * node + 1], f"node {node}"


@st.composite
def _ops(draw):
    capacity = draw(st.integers(1, 40))
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        k = draw(st.integers(0, 2 * capacity))
        idx = draw(st.lists(st.integers(0, capacity - 1), min_size=k, max_size=k))
        # Small integer values keep every partial sum exact, so equalities below are exact.
        vals = draw(st.lists(st.integers(0, 50), min_size=k, max_size=k))
        ops.append((idx, vals))
    return capacity, ops


@settings(max_examples=200, deadline=None)
@given(_ops(), st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=30), st.integers(0, 7))
def test_total_leaves_and_prefix_search(case, fractions, top_levels):
    capacity, ops = case
    # top_levels varies how many levels the cumsum jump covers (0 = a pure walk, >= depth = pure cumsum).
    tree = SumTree(capacity, search_top_levels=top_levels)
    ref = np.zeros(capacity)
    for idx, vals in ops:
        tree.set(np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float64))
        for i, v in zip(idx, vals, strict=True):  # later duplicates win
            ref[i] = v
        np.testing.assert_array_equal(tree.leaves(), ref)
        assert tree.total == ref.sum()
        _check_internal_nodes(tree)
    if ref.sum() == 0:
        with pytest.raises(InvalidArgument, match="empty tree"):
            tree.find(np.array([0.0]))
        return
    u = np.array(fractions) * ref.sum()
    found = tree.find(u)
    cum = np.cumsum(ref)
    # The unique leaf i with cum[i-1] <= u < cum[i]; never a zero leaf.
    expected = np.searchsorted(cum, u, side="right")
    np.testing.assert_array_equal(found, expected)
    assert (ref[found] > 0).all()


def test_exact_small_case_and_boundaries():
    tree = SumTree(5)  # 8 leaves internally; leaves 5..7 stay 0
    tree.set(np.array([0, 1, 3, 4]), np.array([1.0, 2.0, 3.0, 0.5]))
    assert tree.total == 6.5
    # prefix sums: leaf0 [0,1) leaf1 [1,3) leaf2 empty leaf3 [3,6) leaf4 [6,6.5)
    got = tree.find(np.array([0.0, 0.999, 1.0, 2.999, 3.0, 5.999, 6.0, 6.49, 6.5, 100.0, -1.0]))
    assert got.tolist() == [0, 0, 1, 1, 3, 3, 4, 4, 4, 4, 0]
    assert tree.get(np.array([4, 2])).tolist() == [0.5, 0.0]


def test_update_changes_search():
    tree = SumTree(4)
    tree.set(np.arange(4), np.ones(4))
    tree.set(np.array([1, 1, 2]), np.array([5.0, 0.0, 2.0]))  # duplicate: last (0.0) wins
    assert tree.leaves().tolist() == [1.0, 0.0, 2.0, 1.0]
    assert tree.find(np.array([0.5, 1.0, 2.9, 3.0])).tolist() == [0, 2, 2, 3]


@pytest.mark.parametrize("top_levels", [0, 1, 12])
def test_large_tree_matches_searchsorted(top_levels):
    rng = np.random.default_rng(5)
    tree = SumTree(20_000, search_top_levels=top_levels)
    vals = rng.integers(0, 4, size=20_000).astype(np.float64)  # a quarter of the leaves are empty
    tree.set(np.arange(20_000), vals)
    u = rng.random(4096) * vals.sum()
    np.testing.assert_array_equal(tree.find(u), np.searchsorted(np.cumsum(vals), u, side="right"))


@pytest.mark.parametrize("top_levels", [0, 1])
def test_rounding_fallback_never_returns_empty_leaf(top_levels):
    # Simulate float rounding that leaves u above a subtree's real mass: inflate the root so a search
    # descends into the empty right half; the fallback must answer with a positive leaf.
    tree = SumTree(4, search_top_levels=top_levels)
    tree.set(np.array([0, 1]), np.array([1.0, 1.0]))
    tree.tree[1] = 2.5
    assert tree.find(np.array([2.2, 0.5, 1.5])).tolist() == [1, 0, 1]


def test_capacity_one():
    tree = SumTree(1)
    tree.set(np.array([0]), np.array([2.0]))
    assert tree.total == 2.0 and tree.find(np.array([1.9])).tolist() == [0]


@pytest.mark.parametrize(
    "idx, vals, msg",
    [
        ([0], [float("nan")], "position 0 is nan"),
        ([0, 1], [1.0, -2.0], "position 1 is -2.0"),
        ([0], [float("inf")], "position 0 is inf"),
        ([4], [1.0], r"index 4 out of range \[0, 4\)"),
        ([-1], [1.0], r"index -1 out of range"),
        ([0, 1], [1.0], "2 indices but 1 values"),
    ],
)
def test_bad_updates_refused_without_change(idx, vals, msg):
    tree = SumTree(4)
    tree.set(np.arange(4), np.ones(4))
    with pytest.raises(InvalidArgument, match=msg):
        tree.set(np.array(idx), np.array(vals))
    assert tree.leaves().tolist() == [1.0, 1.0, 1.0, 1.0] and tree.total == 4.0
    with pytest.raises(ValueError, match="positive int"):
        SumTree(0)


def _saved_tree(capacity=5):
    tree = SumTree(capacity)
    tree.set(np.arange(capacity), np.arange(1.0, capacity + 1.0))
    return tree.tree.copy()


def test_load_restores_a_consistent_tree():
    fresh = SumTree(5)
    fresh.load(_saved_tree())
    assert fresh.total == 15.0 and fresh.leaves().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert fresh.find(np.array([0.5, 14.9])).tolist() == [0, 4]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t.__setitem__(1, t[1] + 1.0), r"node 1 is 16.0 but its children sum to 15.0"),
        (lambda t: t.__setitem__(8 + 2, 30.0), r"node 5 is 7.0 but its children sum to 34.0"),   # a leaf changed
        (lambda t: t.__setitem__(3, 0.0), r"node 1 is 15.0 but its children sum to 10.0"),    # an internal node
        (lambda t: t.__setitem__(8 + 6, 2.0), r"mass 2.0 in padding leaf 6 \(capacity 5\)"),
        (lambda t: t.__setitem__(0, 1.0), r"node 0 is 1.0 but its children sum to 0.0"),
    ],
    ids=["root", "leaf", "internal", "padding", "unused-slot"],
)
def test_load_refuses_a_corrupt_tree_and_loads_nothing(corrupt, message):
    bad = _saved_tree()
    corrupt(bad)
    target = SumTree(5)
    target.set(np.array([0]), np.array([9.0]))
    with pytest.raises(ValueError, match=message):
        target.load(bad)
    assert target.total == 9.0 and target.leaves().tolist() == [9.0, 0.0, 0.0, 0.0, 0.0]
