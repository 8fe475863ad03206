"""LearnerService as two data-parallel ranks (two real processes, gloo, in-process replay tables).

Rank 1's replay hands out a corrupt batch every few samples: it is refused on rank 1 alone and
the ranks still pair their updates (no rank waits in an all-reduce the other never enters). Rank 0
alone publishes, runs diagnostics and writes the checkpoint, which finds the replicas identical;
a second pair of ranks restores it, rank 1 from rank 0 (its own checkpoint dir is empty).
"""

from __future__ import annotations

import multiprocessing
import queue
import time

import numpy as np
import torch

from learner.checkpoint import state_digest
from learner.parallel import Rendezvous
from tests.unit.learner.test_learner_service import _setup

CALLS = 6


class CorruptEveryThird:
    """Wraps a client: every third sample's actions are out of range (what a hostile writer could cause)."""

    def __init__(self, client):
        self.client, self.calls = client, 0

    def sample(self, batch_size, **kwargs):
        raw = self.client.sample(batch_size, **kwargs)
        self.calls += 1
        if self.calls % 3 == 0 and batch_size == 32:
            raw.columns = {**raw.columns, "action": np.full(batch_size, 7)}
        return raw

    def update_priorities(self, keys, priorities):
        self.client.update_priorities(keys, priorities)


def _rank(tmp, address: str, rank: int, restore: bool, out) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    # Restoring, rank 1's checkpoint dir is a new, empty one: it gets the state from rank 0.
    make, published = _setup(Path(tmp) / f"rank{rank}{'-again' if restore and rank else ''}",
                             diagnostics="dormant_ratio")
    service = make(rank=rank, world_size=2, rendezvous=address, sample_seed=rank)
    if rank == 1:
        service.client = CorruptEveryThird(service.client)
        service.dataset.client = service.client
    extra = service.restore() if restore else None
    reports = [service.train(seconds=0.3, env_steps=10_000) for _ in range(CALLS)]
    path = service.checkpoint({"counters": {"updates": 0}})
    out.put({"rank": rank, "updates": [r.updates for r in reports], "dropped": reports[-1].dropped_batches,
             "diagnostics": sorted(set().union(*(r.diagnostics for r in reports))), "published": len(published),
             "checkpoint": path, "digest": state_digest(service.algorithm.state_dict()),
             "restored": None if extra is None else extra["state_digest"]})
    service.close()


def _pair(tmp_path, *, restore: bool) -> dict[int, dict]:
    rendezvous = Rendezvous()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(tmp_path), rendezvous.address, r, restore, out)) for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + 240
    while len(results) < 2 and time.monotonic() < deadline:
        try:
            result = out.get(timeout=1.0)
            results[result["rank"]] = result
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"a rank failed (exit code {failed}; its traceback is above)"
    for p in procs:
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return results


def test_two_ranks_pair_their_updates_refuse_a_bad_batch_alone_and_restore_through_rank_0(tmp_path):
    first = _pair(tmp_path, restore=False)
    assert first[0]["updates"] == first[1]["updates"] and first[0]["updates"][-1] > 20
    assert first[1]["dropped"] > 0 and first[0]["dropped"] == 0     # refused on rank 1 only
    assert first[0]["digest"] == first[1]["digest"]                  # identical replicas
    assert first[0]["diagnostics"] and not first[1]["diagnostics"]   # diagnostics on rank 0 only
    assert first[0]["published"] > 0 and first[1]["published"] == 0  # one rank publishes
    assert first[0]["checkpoint"].endswith(".pt") and first[1]["checkpoint"] == ""
    assert not (tmp_path / "rank1" / "ckpt").exists()

    second = _pair(tmp_path, restore=True)
    assert second[0]["restored"] == second[1]["restored"] == first[0]["digest"]
    assert second[0]["updates"][0] > first[0]["updates"][-1]         # the update count goes on
    assert second[0]["digest"] == second[1]["digest"]
