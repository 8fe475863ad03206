"""ReplayClient against two real in-process shards: routing, proportional sampling, global keys,
priority updates reaching their owner, errors surfacing as replay.errors, pickling."""

from __future__ import annotations

import pickle
import time
import zlib

import numpy as np
import pytest

from replay import errors
from replay.client import ReplayClient, ShardUnavailable
from replay.schema import Schema
from replay.server import ReplayServer
from replay.table import TableConfig

SCHEMA = Schema.parse("obs:float32:2,action:int64")


def _writer_for(shard: int, n: int = 2) -> str:
    """A writer key that crc32 routes to ``shard`` of ``n``."""
    return next(f"writer-{i}" for i in range(1000) if zlib.crc32(f"writer-{i}".encode()) % n == shard)


def _rows(first: int, n: int) -> dict[str, np.ndarray]:
    keys = np.arange(first, first + n)
    return {"obs": np.stack([keys, -keys], axis=1).astype(np.float32), "action": keys.astype(np.int64)}


@pytest.fixture(params=["uniform", "prioritized"])
def shards(request):
    config = TableConfig(name="replay", schema=SCHEMA, capacity=64, sampler=request.param, priority_exponent=1.0)
    servers = [ReplayServer(tables=[config], port=0, shard_index=i) for i in range(2)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def client(shards):
    c = ReplayClient([s.address for s in shards], table="replay", timeout=10.0, seed=0)
    yield c
    c.close()


def test_inserts_route_by_writer_key_and_return_global_keys(client, shards):
    w0, w1 = _writer_for(0), _writer_for(1)
    keys0 = client.insert(_rows(0, 3), writer_key=w0)
    keys1 = client.insert(_rows(100, 2), writer_key=w1)
    keys0b = client.insert(_rows(3, 1), writer_key=w0)
    assert keys0.tolist() == [0, 1, 2]
    assert keys1.tolist() == [(1 << 48) + 0, (1 << 48) + 1]
    assert keys0b.tolist() == [3]
    assert [i.size for i in client.info()] == [4, 2]
    assert [s.tables["replay"].info().inserts for s in shards] == [4, 2]


@pytest.mark.parametrize("shards", ["uniform"], indirect=True)
def test_uniform_sampling_splits_by_size(shards):
    client = ReplayClient([s.address for s in shards], table="replay", timeout=10.0, seed=0)
    client.insert(_rows(0, 6), writer_key=_writer_for(0))
    client.insert(_rows(100, 2), writer_key=_writer_for(1))
    batch = client.sample(8, beta=1.0)
    shard_of = (batch.keys >> np.uint64(48)).astype(np.int64)
    assert np.bincount(shard_of, minlength=2).tolist() == [6, 2]     # shares 6/8 and 2/8, exactly
    # Global P = share * p_shard: 0.75 * 1/6 = 0.25 * 1/2 = 1/8 for every item.
    np.testing.assert_allclose(batch.probabilities, np.full(8, 0.125))
    np.testing.assert_array_equal(batch.weights, np.ones(8, np.float32))
    assert batch.weights.dtype == np.float32
    # Rows match their keys: local key k of shard 0 is action k, of shard 1 is action 100 + k.
    local = (batch.keys & np.uint64((1 << 48) - 1)).astype(np.int64)
    np.testing.assert_array_equal(batch.columns["action"], local + 100 * shard_of)
    np.testing.assert_array_equal(batch.columns["obs"][:, 0], batch.columns["action"].astype(np.float32))
    assert batch.columns["obs"].flags.writeable and batch.columns["obs"].flags.c_contiguous
    client.close()


@pytest.mark.parametrize("shards", ["prioritized"], indirect=True)
def test_prioritized_sampling_splits_by_mass_and_updates_reach_the_owner(shards):
    client = ReplayClient([s.address for s in shards], table="replay", timeout=10.0, seed=0)
    client.insert(_rows(0, 2), writer_key=_writer_for(0), priorities=np.array([1.0, 3.0]))
    client.insert(_rows(100, 1), writer_key=_writer_for(1), priorities=np.array([4.0]))
    batch = client.sample(4, beta=1.0)
    shard_of = (batch.keys >> np.uint64(48)).astype(np.int64)
    assert np.bincount(shard_of, minlength=2).tolist() == [2, 2]     # masses 4 and 4
    by_action = {1.0: 0.5 * 0.25, 3.0: 0.5 * 0.75, 4.0: 0.5 * 1.0}
    priority = {0: 1.0, 1: 3.0, 100: 4.0}
    expected_p = np.array([by_action[priority[int(a)]] for a in batch.columns["action"]])
    np.testing.assert_allclose(batch.probabilities, expected_p)
    # beta=1: w = (N P)^-1 / max = P_min_in_batch / P
    np.testing.assert_allclose(batch.weights, (expected_p.min() / expected_p).astype(np.float32), rtol=1e-6)

    shard1_key = np.uint64(1 << 48)
    assert client.update_priorities(np.array([shard1_key, np.uint64(0)]), np.array([12.0, 2.0])) == 2
    assert [s.tables["replay"].info().priority_mass for s in shards] == [5.0, 12.0]
    batch = client.sample(17, beta=0.4)   # masses 5 and 12 -> 5 and 12 rows
    assert np.bincount((batch.keys >> np.uint64(48)).astype(np.int64), minlength=2).tolist() == [5, 12]
    client.close()


def test_stale_keys_are_skipped(client):
    keys = client.insert(_rows(0, 2), writer_key=_writer_for(1))
    assert client.update_priorities(np.concatenate([keys, keys + np.uint64(50)]), np.ones(4)) == 2


def test_empty_shard_gets_no_rows(client):
    client.insert(_rows(0, 3), writer_key=_writer_for(1))
    batch = client.sample(5)
    assert (batch.keys >> np.uint64(48)).tolist() == [1] * 5


def test_server_errors_surface_as_replay_errors(client, shards):
    with pytest.raises(errors.InvalidArgument, match=r"replay shard \d \(127.0.0.1:\d+\) Insert: INVALID_ARGUMENT: "
                                                     r"field 'obs': expected dtype float32, got float64"):
        client.insert({"obs": np.zeros((1, 2)), "action": np.zeros(1, np.int64)}, writer_key="w")
    with pytest.raises(errors.InvalidArgument, match=r"priority\[0\]"):
        client.insert(_rows(0, 1), writer_key="w", priorities=np.array([np.nan]))
    assert sum(i.size for i in client.info()) == 0
    with pytest.raises(errors.NotFound, match="has no table 'nope'"):
        ReplayClient([shards[0].address], table="nope").info()
    with pytest.raises(errors.NotFound, match="unknown table 'nope'"):
        ReplayClient([shards[0].address], table="nope").insert(_rows(0, 1), writer_key="w")
    with pytest.raises(errors.InvalidArgument, match="batch_size=0 must be >= 1"):
        client.sample(0)
    with pytest.raises(errors.DeadlineExceeded, match=r"no shard has min_size_to_sample=1 items \(sizes \[0, 0\]\)"):
        client.sample(4, timeout=0.2)


def test_oversized_batches_fail_on_the_client_naming_size_and_limit(shards):
    client = ReplayClient([s.address for s in shards], table="replay", max_message_bytes=1 << 20)
    rows = 100_000
    with pytest.raises(errors.ResourceExhausted, match=r"insert of 1600000 bytes \(\+65536 framing\) exceeds the "
                                                       r"1048576-byte message limit"):
        client.insert({"obs": np.zeros((rows, 2), np.float32), "action": np.zeros(rows, np.int64)}, writer_key="w")
    assert sum(i.size for i in client.info()) == 0
    client.insert(_rows(0, 1), writer_key=_writer_for(0))
    # 16 column bytes + 32 bytes of keys/probabilities/framing per row.
    with pytest.raises(errors.ResourceExhausted, match=r"sample of 30000 rows x 48 bytes = 1440000 bytes from "
                                                       r"shard 0 exceeds the 1048576-byte message limit"):
        client.sample(30_000)
    client.close()


def test_unreachable_shard_raises_after_the_timeout():
    client = ReplayClient(["127.0.0.1:1"], timeout=0.5)
    with pytest.raises(ShardUnavailable, match=r"replay shard 0 \(127.0.0.1:1\) Info: unavailable for"):
        client.info()


def test_client_pickles_by_address_and_works_after_unpickling(client):
    client.insert(_rows(0, 4), writer_key=_writer_for(0))
    clone = pickle.loads(pickle.dumps(client))
    assert clone.addresses == client.addresses
    batch = clone.sample(3)
    assert batch.keys.shape == (3,)
    assert set(batch.columns["action"].tolist()) <= {0, 1, 2, 3}
    clone.close()


def test_clear_empties_every_shard_and_old_keys_never_reach_new_rows(client, shards):
    """A scenario's replay flush over gRPC: both shards emptied, sampling waits for new rows, and the
    removed rows' keys are skipped by priority updates rather than landing on new rows."""
    client.insert(_rows(0, 5), writer_key=_writer_for(0))
    client.insert(_rows(100, 3), writer_key=_writer_for(1))
    old = client.sample(8, beta=1.0).keys
    assert client.clear() == 8
    assert [i.size for i in client.info()] == [0, 0]
    with pytest.raises(errors.DeadlineExceeded):
        client.sample(1, timeout=0.3)
    client.insert(_rows(200, 4), writer_key=_writer_for(1))
    batch = client.sample(16, beta=1.0)
    assert set(batch.columns["action"].tolist()) <= {200, 201, 202, 203}
    result = client.update_priorities_result(old, np.full(old.size, 5.0))
    assert result["updated"] == 0 and result["unknown"] == old.size
    assert client.clear() == 4 and client.clear() == 0


@pytest.mark.parametrize("shards", ["prioritized"], indirect=True)
def test_a_dead_shard_is_left_out_of_samples_and_priority_updates_until_it_is_back(shards):
    """The learner keeps sampling from the live shards while one restarts; nothing waits for the whole
    call timeout, and the shard is sampled again once it answers."""
    client = ReplayClient([s.address for s in shards], table="replay", timeout=10.0, seed=0, refresh_interval_s=0.2)
    client.insert(_rows(0, 6), writer_key=_writer_for(0))
    client.insert(_rows(100, 6), writer_key=_writer_for(1))
    both = client.sample(12, beta=1.0)
    port = int(shards[1].address.rsplit(":", 1)[1])
    shards[1].stop()                                  # no checkpoint dir: it comes back empty
    start = time.monotonic()
    failed = 0
    for _ in range(3):             # a call that picked the dead shard fails (at most once) ...
        try:
            batch = client.sample(12, beta=1.0, timeout=1.0)
            break
        except ShardUnavailable:
            failed += 1
    assert failed <= 1
    assert set((batch.keys >> np.uint64(48)).tolist()) == {0}   # ... then only the live shard is sampled
    result = client.update_priorities_result(both.keys, np.full(12, 2.0), timeout=5.0)
    dead = int(np.sum((both.keys >> np.uint64(48)) == 1))
    assert result["unavailable"] == dead and result["updated"] == 12 - dead
    assert time.monotonic() - start < 8.0
    with pytest.raises(ShardUnavailable, match="replay shard 1"):
        client.insert(_rows(200, 1), writer_key=_writer_for(1), timeout=0.5)   # its writers wait (and retry)
    config = TableConfig(name="replay", schema=SCHEMA, capacity=64, sampler="prioritized", priority_exponent=1.0)
    shards[1] = ReplayServer(tables=[config], port=port, shard_index=1)
    shards[1].start()
    client.insert(_rows(300, 4), writer_key=_writer_for(1), timeout=10.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        keys = client.sample(64, beta=1.0, timeout=5.0).keys
        if set((keys >> np.uint64(48)).tolist()) == {0, 1}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the restarted shard was never sampled again")
    client.close()


def test_atari_inserts_travel_as_shared_frames_and_store_the_same_rows(monkeypatch):
    """A client of an Atari table sends each distinct frame once (replay.frames); the shard stores and
    samples back exactly the rows a dense insert stores, with a fraction of the bytes on the wire."""
    import replay.client as client_mod
    from tests.unit.replay.test_replay_atari_storage import _columns, _schema, stream_transitions

    sent: list[int] = []

    class Recorded(client_mod.InsertRequestParts):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            sent.append(self.nbytes)

    monkeypatch.setattr(client_mod, "InsertRequestParts", Recorded)
    obs_ids, nxt_ids, _ = stream_transitions(0, ep_lens=[20, 7, 30], n=3, pad="repeat")
    batches = [_columns(obs_ids[a:a + 16], nxt_ids[a:a + 16], a) for a in range(0, len(obs_ids), 16)]
    config = TableConfig(name="replay", schema=_schema(), capacity=256, storage="atari")
    sampled = {}
    for share in (True, False):
        with ReplayServer(tables=[config], port=0) as server, \
                ReplayClient([server.address], table="replay", timeout=10.0, share_frames=share) as client:
            for cols in batches:
                client.insert(cols, writer_key="actor-0")
            info = client.info()[0]
            assert info.size == len(obs_ids)
            batch = client.sample(200, timeout=5.0)
            order = np.argsort(batch.columns["action"], kind="stable")
            sampled[share] = {k: v[order] for k, v in batch.columns.items()}
            truth = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
            for name in ("obs", "next_obs", "reward"):
                np.testing.assert_array_equal(sampled[share][name], truth[name][sampled[share]["action"]])
    shared_bytes, dense_bytes = sum(sent[:len(batches)]), sum(sent[len(batches):])
    assert shared_bytes < 0.45 * dense_bytes, (shared_bytes, dense_bytes)
