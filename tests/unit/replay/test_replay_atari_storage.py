"""Atari storage: exact stack reconstruction across episode boundaries, interleaved writer streams,
wrap-around and frame-pool eviction; frame dedup counts; hash collisions; schema refusals."""

from __future__ import annotations

import numpy as np
import pytest

import replay.storage as storage_mod
from replay.errors import InvalidArgument
from replay.schema import Schema
from replay.storage import AtariStorage
from replay.table import Table, TableConfig

H, W, S = 6, 8, 4  # 48-byte frames: small and fast, still multiple of 8 (the uint64 hash path)


def _schema(h=H, w=W, s=S):
    return Schema.parse(f"obs:uint8:{s}x{h}x{w},action:int64,reward:float32,next_obs:uint8:{s}x{h}x{w}")


_BASE = np.random.default_rng(7).integers(0, 256, size=(64, 64 * 64), dtype=np.uint8)


def make_frames(ids: np.ndarray, h=H, w=W) -> np.ndarray:
    """Frame content for each id: -1 -> all zeros; otherwise a distinct pattern stamped with the id."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    out = _BASE[flat % 64, : h * w].copy()
    stamp = (flat + 1).astype("<u8").view(np.uint8).reshape(-1, 8)
    out[:, : min(8, h * w)] = stamp[:, : min(8, h * w)]
    out[flat < 0] = 0
    return out.reshape(*ids.shape, h, w)


def stream_transitions(next_id, *, ep_lens, n, pad, s=S):
    """Frame ids of an env stream's n-step transitions: (obs_ids [T,S], next_ids [T,S]), and the next id.

    Episode of length L has frames f_0..f_L; stack(t) = f_{t-S+1..t}, where indices < 0 are f_0 (pad
    "repeat") or the zero frame -1 (pad "zero"); transition t has obs stack(t), next_obs stack(min(t+n, L)).
    """
    obs, nxt = [], []
    for L in ep_lens:
        f = np.arange(next_id, next_id + L + 1)
        next_id += L + 1

        def stack(t, f=f):
            idx = np.arange(t - s + 1, t + 1)
            return np.where(idx >= 0, f[np.maximum(idx, 0)], f[0] if pad == "repeat" else -1)

        for t in range(L):
            obs.append(stack(t))
            nxt.append(stack(min(t + n, L)))
    return np.array(obs), np.array(nxt), next_id


def interleave(streams, rng, max_batch):
    """Merge streams (each a pair of id arrays) in random order, keeping each stream's own order; batch."""
    pos = [0] * len(streams)
    order = []
    while True:
        live = [i for i, (o, _) in enumerate(streams) if pos[i] < len(o)]
        if not live:
            break
        i = live[rng.integers(len(live))]
        order.append((i, pos[i]))
        pos[i] += 1
    obs = np.array([streams[i][0][p] for i, p in order])
    nxt = np.array([streams[i][1][p] for i, p in order])
    cuts = [0]
    while cuts[-1] < len(order):
        cuts.append(min(len(order), cuts[-1] + int(rng.integers(1, max_batch + 1))))
    return [(obs[a:b], nxt[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _columns(obs_ids, nxt_ids, first):
    n = len(obs_ids)
    return {
        "obs": make_frames(obs_ids),
        "action": np.arange(first, first + n, dtype=np.int64),
        "reward": np.arange(first, first + n, dtype=np.float32),
        "next_obs": make_frames(nxt_ids),
    }


def _check_live(table: Table, truth_obs: dict, truth_next: dict) -> int:
    info = table.info()
    lo, hi = info.extra["oldest_key"], info.extra["next_key"]
    keys = np.arange(lo, hi, dtype=np.uint64)
    got = table._storage.gather(keys)
    exp_obs = make_frames(np.array([truth_obs[k] for k in range(lo, hi)]))
    exp_next = make_frames(np.array([truth_next[k] for k in range(lo, hi)]))
    np.testing.assert_array_equal(got["obs"], exp_obs)
    np.testing.assert_array_equal(got["next_obs"], exp_next)
    np.testing.assert_array_equal(got["action"], np.arange(lo, hi))
    return hi - lo


@pytest.mark.parametrize("pad", ["repeat", "zero"])
@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
def test_interleaved_streams_episode_boundaries_and_wraparound(pad, sampler):
    rng = np.random.default_rng(3)
    streams, next_id = [], 0
    for _ in range(5):
        lens = rng.integers(1, 16, size=12).tolist()  # includes 1-step episodes
        o, x, next_id = stream_transitions(next_id, ep_lens=lens, n=3, pad=pad)
        streams.append((o, x))
    batches = interleave(streams, rng, max_batch=9)
    table = Table(TableConfig(name="a", schema=_schema(), capacity=120, storage="atari", sampler=sampler))
    truth_obs, truth_next, key = {}, {}, 0
    for bi, (o, x) in enumerate(batches):
        keys = table.insert(_columns(o, x, key))
        assert keys.tolist() == list(range(key, key + len(o)))
        for j in range(len(o)):
            truth_obs[key + j], truth_next[key + j] = o[j], x[j]
        key += len(o)
        if bi % 10 == 0:
            _check_live(table, truth_obs, truth_next)
    assert key > 3 * 120  # the transition ring and the frame pool both wrapped several times
    assert _check_live(table, truth_obs, truth_next) == 120
    st = table._storage
    assert st.frames_written > st.frame_capacity
    # Public path: sampled rows match the ground truth for their keys.
    r = table.sample(100)
    k = r.keys.astype(np.int64)
    np.testing.assert_array_equal(r.columns["obs"], make_frames(np.array([truth_obs[i] for i in k])))
    np.testing.assert_array_equal(r.columns["next_obs"], make_frames(np.array([truth_next[i] for i in k])))
    for name in ("obs", "next_obs"):
        assert r.columns[name].flags.c_contiguous and r.columns[name].shape == (100, S, H, W)


@pytest.mark.parametrize("pad, expected_frames", [("repeat", 51 + 31), ("zero", 52 + 31)])
def test_single_stream_stores_each_frame_once(pad, expected_frames):
    # Episodes of 50 and 30 steps: frames f_0..f_50 and g_0..g_30 (+ one zero frame with zero padding,
    # shared by both episode starts since it is still inside the dedup window).
    o, x, _ = stream_transitions(0, ep_lens=[50, 30], n=3, pad=pad)
    st = AtariStorage(schema=_schema(), capacity=200, dedup_window=100)
    key = 0
    for a in range(0, len(o), 7):
        cols = _columns(o[a : a + 7], x[a : a + 7], key)
        st.commit(st.prepare(cols, n=len(cols["action"])), first_key=key)
        key += len(cols["action"])
    assert key == 80
    assert st.frames_written == expected_frames
    got = st.gather(np.arange(80, dtype=np.uint64))
    np.testing.assert_array_equal(got["obs"], make_frames(o))
    np.testing.assert_array_equal(got["next_obs"], make_frames(x))


def test_frame_pool_eviction_removes_oldest_from_sampler():
    # Every transition brings 8 fresh frames: the 64-frame pool (capacity 32 + window 32) holds 8
    # transitions, so writing transition k overwrites transition k-8's frames and evicts keys <= k-8.
    table = Table(
        TableConfig(name="a", schema=_schema(), capacity=32, storage="atari", sampler="prioritized", seed=1)
    )
    st = table._storage
    assert (st.frame_capacity, st.dedup_window) == (64, 32)
    truth_obs, truth_next = {}, {}
    for k in range(20):
        o = np.arange(8 * k, 8 * k + 4)[None]
        x = np.arange(8 * k + 4, 8 * k + 8)[None]
        table.insert(_columns(o, x, k))
        truth_obs[k], truth_next[k] = o[0], x[0]
    info = table.info()
    assert (info.size, info.extra["oldest_key"], info.priority_mass) == (8, 12, 8.0)
    assert _check_live(table, truth_obs, truth_next) == 8
    r = table.sample(32)
    assert set(r.keys.tolist()) <= set(range(12, 20))
    np.testing.assert_array_equal(r.probabilities, np.full(32, 1 / 8))
    # Stale keys are skipped by priority updates.
    assert table.update_priorities(np.array([0, 11, 12, 19], np.uint64), np.ones(4)).updated == 2


def test_too_many_distinct_frames_refused_without_change():
    table = Table(TableConfig(name="a", schema=_schema(), capacity=32, storage="atari"))
    table.insert(_columns(np.zeros((1, 4), int), np.ones((1, 4), int), 0))
    before_meta, before_arrays = table.state_dict()
    ids = np.arange(100, 172).reshape(9, 8)
    with pytest.raises(InvalidArgument, match="insert of 9 rows has 72 distinct frames .* frame_capacity = 64"):
        table.insert(_columns(ids[:, :4], ids[:, 4:], 1))
    after_meta, after_arrays = table.state_dict()
    assert after_meta == before_meta
    for k, v in before_arrays.items():
        np.testing.assert_array_equal(after_arrays[k], v)


def test_big_insert_restores_reused_frames_it_would_overwrite():
    # Pool: capacity 16 + window 32 = 48 frames. Keys 0..2 write frames 0..23 (positions 0..23). The next
    # insert reuses frames 0..3 and brings 40 new ones, which overwrite positions 0..39 of the ring: the
    # reused frames sit there, so they must be written again (44 new frames), not referenced and clobbered.
    table = Table(TableConfig(name="a", schema=_schema(), capacity=16, storage="atari"))
    truth_obs, truth_next = {}, {}
    first = np.arange(24).reshape(3, 8)
    table.insert(_columns(first[:, :4], first[:, 4:], 0))
    obs = np.tile(np.arange(4), (10, 1))
    nxt = np.arange(100, 140).reshape(10, 4)
    table.insert(_columns(obs, nxt, 3))
    for k in range(3):
        truth_obs[k], truth_next[k] = first[k, :4], first[k, 4:]
    for j in range(10):
        truth_obs[3 + j], truth_next[3 + j] = obs[j], nxt[j]
    assert table._storage.frames_written == 24 + 44
    info = table.info()
    assert (info.size, info.extra["oldest_key"]) == (10, 3)  # keys 0..2 lost their frames
    assert _check_live(table, truth_obs, truth_next) == 10


def test_hash_collisions_never_corrupt(monkeypatch):
    monkeypatch.setattr(storage_mod, "_hash_rows", lambda rows: np.zeros(rows.shape[0], dtype=np.uint64))
    o, x, _ = stream_transitions(0, ep_lens=[9, 5, 7], n=2, pad="zero")
    table = Table(TableConfig(name="a", schema=_schema(), capacity=16, storage="atari"))
    assert (table._storage.frame_capacity, table._storage.dedup_window) == (48, 32)
    truth_obs, truth_next = {}, {}
    for a in range(0, len(o), 2):
        table.insert(_columns(o[a : a + 2], x[a : a + 2], a))
        for j in range(len(o[a : a + 2])):
            truth_obs[a + j], truth_next[a + j] = o[a + j], x[a + j]
    # Dedup all but fails (one dict entry per hash), so the frame pool evicts early; what is live is exact.
    live = _check_live(table, truth_obs, truth_next)
    assert live == table.info().size and live >= 2


@pytest.mark.parametrize("h, w", [(6, 6), (7, 9)])  # 36 bytes (uint32 hash path), 63 bytes (uint8 path)
def test_odd_frame_sizes(h, w):
    o, x, _ = stream_transitions(0, ep_lens=[6, 4], n=1, pad="repeat")
    st = AtariStorage(schema=_schema(h, w), capacity=20)
    cols = {
        "obs": make_frames(o, h, w),
        "action": np.zeros(10, np.int64),
        "reward": np.zeros(10, np.float32),
        "next_obs": make_frames(x, h, w),
    }
    st.commit(st.prepare(cols, n=10), first_key=0)
    assert st.frames_written == 7 + 5
    got = st.gather(np.arange(10, dtype=np.uint64))
    np.testing.assert_array_equal(got["obs"], cols["obs"])
    np.testing.assert_array_equal(got["next_obs"], cols["next_obs"])


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("obs:uint8:4x6x8,action:int64", "has no field 'next_obs'"),
        ("obs:float32:4x6x8,next_obs:float32:4x6x8", r"field 'obs' is float32 \(4, 6, 8\); expected uint8"),
        ("obs:uint8:6x8,next_obs:uint8:6x8", r"expected uint8 with shape \(stack, H, W\)"),
        ("obs:uint8:4x6x8,next_obs:uint8:2x6x8", r"obs shape \(4, 6, 8\) differs from next_obs shape \(2, 6, 8\)"),
    ],
)
def test_atari_schema_refused(spec, msg):
    cfg = TableConfig(name="a", schema=Schema.parse(spec), capacity=10, storage="atari")
    with pytest.raises(ValueError, match=msg):
        cfg.validate()
    with pytest.raises(ValueError, match=msg):
        Table(cfg)
