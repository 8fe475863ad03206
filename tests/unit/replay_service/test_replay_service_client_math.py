"""Client routing, key tagging and batch splitting, without a server."""

from __future__ import annotations

import pickle
import zlib

import numpy as np
import pytest

from replay.client import ReplayClient, allocate, global_keys, shard_of_writer, split_keys


def test_writer_routing_is_crc32_mod_n():
    assert shard_of_writer("actor-3", 2) == zlib.crc32(b"actor-3") % 2
    assert [shard_of_writer(f"actor-{i}", 3) for i in range(6)] == [zlib.crc32(f"actor-{i}".encode()) % 3
                                                                    for i in range(6)]
    assert shard_of_writer("anything", 1) == 0


def test_global_keys_tag_the_shard_in_the_top_16_bits():
    keys = global_keys(np.array([0, 5], np.uint64), 3)
    assert keys.dtype == np.uint64
    assert keys.tolist() == [3 << 48, (3 << 48) + 5]
    shard, local = split_keys(keys)
    assert shard.tolist() == [3, 3]
    assert local.tolist() == [0, 5]
    with pytest.raises(ValueError, match=r"key 281474976710656 >= 2\*\*48"):
        global_keys(np.array([1 << 48], np.uint64), 0)


@pytest.mark.parametrize(
    ("batch", "weights", "u", "expected"),
    [
        (8, [30, 10], 0.5, [6, 2]),          # exact shares: no randomness at all
        (8, [30, 10], 0.0, [6, 2]),
        (10, [1, 1, 1], 0.1, [4, 3, 3]),     # fractions 1/3 each: the point 0.1 falls in shard 0
        (10, [1, 1, 1], 0.5, [3, 4, 3]),     # 0.5 falls in shard 1's interval [1/3, 2/3)
        (10, [1, 1, 1], 0.9, [3, 3, 4]),
        (5, [0, 7], 0.3, [0, 5]),            # an empty shard never gets rows
    ],
)
def test_allocate_is_stratified(batch, weights, u, expected):
    assert allocate(batch, weights, u=u).tolist() == expected


def test_allocate_expected_counts_equal_batch_times_share():
    us = (np.arange(1000) + 0.5) / 1000
    counts = np.array([allocate(7, [2.0, 3.0, 5.0], u=u) for u in us])
    assert (counts.sum(axis=1) == 7).all()
    np.testing.assert_allclose(counts.mean(axis=0), [1.4, 2.1, 3.5], atol=1e-9)


def test_allocate_refuses_zero_mass():
    with pytest.raises(ValueError, match=r"weights \[0.0, 0.0\] have no positive mass"):
        allocate(4, [0, 0], u=0.5)


def test_client_pickles_by_address_without_connecting():
    client = ReplayClient(["127.0.0.1:1", "127.0.0.1:2"], table="t", timeout=3.0, max_message_bytes=1 << 20)
    clone = pickle.loads(pickle.dumps(client))
    assert clone.addresses == ("127.0.0.1:1", "127.0.0.1:2")
    assert (clone.table, clone.timeout, clone.max_message_bytes) == ("t", 3.0, 1 << 20)
    assert clone._shards is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addresses": []}, "addresses is empty"),
        ({"addresses": ["localhost"]}, "address 'localhost' is not 'host:port'"),
        ({"addresses": ["a:1"], "timeout": 0}, "timeout=0 must be > 0"),
    ],
)
def test_bad_client_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReplayClient(**kwargs)
