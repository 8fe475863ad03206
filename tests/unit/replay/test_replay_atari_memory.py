"""Bytes per stored Atari transition and sampling cost at realistic sizes (prints, never asserts times).

Run directly for the numbers: ``python tests/unit/replay/test_replay_atari_memory.py [transitions]``.
As a test (marked slow) it fills 20k transitions of 84x84 frames from 16 interleaved 3-step streams and
checks reconstruction of a sample exactly; the printed bytes per transition are for the report.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from replay.schema import Schema
from replay.table import Table, TableConfig

SCHEMA = Schema.parse("obs:uint8:4x84x84,action:int64,reward:float32,discount:float32,next_obs:uint8:4x84x84")
_BASE = np.random.default_rng(11).integers(0, 256, size=(97, 84 * 84), dtype=np.uint8)


def frames(ids: np.ndarray) -> np.ndarray:
    """Distinct 84x84 frames per id (a base pattern stamped with the id)."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = _BASE[flat % 97].copy()
    out[:, :8] = (flat + 1).astype("<u8").view(np.uint8).reshape(-1, 8)
    return out.reshape(*np.shape(ids), 84, 84)


def vector_env_ids(*, streams: int, steps: int, n: int, ep_range=(400, 1200), seed=0):
    """Frame ids of ``streams`` envs stepped together; transitions ordered by step then env.

    Each env runs episodes of random length; stacks at an episode start repeat the reset frame; an n-step
    transition's next_obs is the stack n steps later (or the last stack of the episode)."""
    rng = np.random.default_rng(seed)
    per_stream, next_id = [], 0
    for _ in range(streams):
        obs, nxt = [], []
        while len(obs) < steps:
            L = int(rng.integers(*ep_range))
            f = np.arange(next_id, next_id + L + 1)
            next_id += L + 1
            t = np.arange(L)[:, None]
            obs.append(f[np.maximum(t + np.arange(-3, 1), 0)])
            nxt.append(f[np.maximum(np.minimum(t + n, L) + np.arange(-3, 1), 0)])
        per_stream.append((np.concatenate(obs)[:steps], np.concatenate(nxt)[:steps]))
    o = np.stack([p[0] for p in per_stream], axis=1).reshape(-1, 4)  # [steps*streams, 4], step-major
    x = np.stack([p[1] for p in per_stream], axis=1).reshape(-1, 4)
    return o, x


def fill(table: Table, o: np.ndarray, x: np.ndarray, batch: int = 64) -> float:
    t0 = time.perf_counter()
    for a in range(0, len(o), batch):
        b = min(len(o), a + batch)
        k = np.arange(a, b)
        table.insert(
            {
                "obs": frames(o[a:b]),
                "action": k.astype(np.int64),
                "reward": np.zeros(b - a, np.float32),
                "discount": np.ones(b - a, np.float32),
                "next_obs": frames(x[a:b]),
            }
        )
    return time.perf_counter() - t0


def measure(transitions: int, *, sampler: str = "uniform", verbose: bool = True) -> dict:
    streams = 16
    o, x = vector_env_ids(streams=streams, steps=transitions // streams, n=3)
    table = Table(TableConfig(name="atari", schema=SCHEMA, capacity=transitions, storage="atari", sampler=sampler))
    fill_s = fill(table, o, x)
    info = table.info()
    st = table._storage
    # The dedup map is a Python dict bounded by dedup_window entries: ~ 8 B key + 8 B value + ~100 B
    # of dict slot and int objects each; counted here so the figure covers everything the table holds.
    dict_bytes = st.dedup_entries * 120
    res = {
        "transitions": info.size,
        "nbytes": info.nbytes,
        "bytes_per_transition": (info.nbytes + dict_bytes) / info.size,
        "frames_per_transition": st.frames_in_use() / info.size,
        "fill_transitions_per_s": len(o) / fill_s,
    }
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        r = table.sample(256)
        times.append(time.perf_counter() - t0)
    res["sample256_ms_median"] = 1e3 * float(np.median(times))
    nbytes_batch = sum(v.nbytes for v in r.columns.values())
    res["sample256_MBps"] = nbytes_batch / 1e6 / (res["sample256_ms_median"] / 1e3)
    buf = np.empty(nbytes_batch, np.uint8)
    src = np.ones(nbytes_batch, np.uint8)
    t0 = time.perf_counter()
    for _ in range(30):
        np.copyto(buf, src)
    res["memcpy_same_bytes_ms"] = 1e3 * (time.perf_counter() - t0) / 30
    k = r.keys.astype(np.int64)
    np.testing.assert_array_equal(r.columns["obs"], frames(o[k]))
    np.testing.assert_array_equal(r.columns["next_obs"], frames(x[k]))
    if verbose:
        print(f"[{sampler}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return res


@pytest.mark.slow
def test_bytes_per_atari_transition_20k():
    res = measure(20_000)
    assert res["transitions"] == 20_000
    assert res["frames_per_transition"] < 1.1  # dedup works: ~one frame per transition, not eight


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for s in ("uniform", "prioritized"):
        measure(n, sampler=s)
