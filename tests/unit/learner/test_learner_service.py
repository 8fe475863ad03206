"""LearnerService in-process: training calls, pacing, checkpoints that restore exactly, diagnostics.

The replay side is a real ``replay.table.Table`` behind a two-method adapter (the service needs
only ``sample`` and ``update_priorities``); the gRPC client is exercised by the integration tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.envs import DiscreteActions, EnvSpec
from evergreen.agents import DQNBuilder
from evergreen.config import load_config
from evergreen.train import table_config
from learner.checkpoint import state_digest
from learner.service import LearnerService
from replay.errors import DeadlineExceeded
from replay.samplers import importance_weights
from replay.table import Table

SPEC = EnvSpec((4,), np.dtype(np.float32), DiscreteActions(2))


class TableClient:
    """The replay client's sampling surface over an in-process table."""

    def __init__(self, table: Table):
        self.table = table
        self.priority_updates = 0

    def sample(self, batch_size, *, beta, timeout):
        try:
            result = self.table.sample(batch_size, timeout=timeout)
        except DeadlineExceeded:
            raise
        weights = importance_weights(probabilities=result.probabilities, size=result.table_size, beta=beta)

        class Raw:
            keys, columns = result.keys, result.columns

        Raw.weights = weights
        return Raw

    def update_priorities(self, keys, priorities):
        self.priority_updates += 1
        self.table.update_priorities(keys, priorities)


def _setup(tmp_path, *, samples_per_insert=0.0, diagnostics="", rows=600):
    config = load_config(preset="cartpole", overrides={
        "replay": {"capacity": 2000, "min_size_to_sample": 100, "samples_per_insert": samples_per_insert,
                   "sampler": "prioritized"},
        "learner": {"batch_size": 32}, "network": {"hidden_sizes": [16, 16]}, "dqn": {"compile": False},
        "plasticity": {"diagnostics": diagnostics, "diagnostics_every": 5, "probe_size": 16},
    }).validate()
    builder = DQNBuilder(config, SPEC)
    table = Table(table_config(config, fields=builder.replay_fields(), obs_shape=(4,), obs_dtype="float32"))
    rng = np.random.default_rng(0)
    table.insert({"obs": rng.standard_normal((rows, 4)).astype(np.float32), "action": rng.integers(0, 2, rows),
                  "reward": np.ones(rows, np.float32), "discount": np.full(rows, 0.97, np.float32),
                  "next_obs": rng.standard_normal((rows, 4)).astype(np.float32),
                  "policy_version": np.zeros(rows, np.int64), "task": np.zeros(rows, np.int64)})
    published = []

    def make(**kwargs):
        return LearnerService(make_algorithm=builder.make_algorithm, client=TableClient(table), batch_size=32,
                              prioritized=True, publish=lambda v, w, net: published.append(v),
                              checkpoint_dir=tmp_path / "ckpt", publish_every=10, total_env_steps=10_000,
                              make_diagnostics=builder.make_diagnostics if diagnostics else None, probe_size=16,
                              device="cpu", num_threads=1, **kwargs)

    return make, published


def test_paced_training_stops_at_the_ratio_and_resumes_bit_identically(tmp_path):
    make, published = _setup(tmp_path)
    service = make(updates_per_env_step=0.5)
    assert service.restore() is None
    report = service.train(seconds=3.0, env_steps=100)
    # 0.5 updates per env step at 100 env steps: exactly 50 updates, whatever the time allowed.
    assert report.updates == report.new_updates == 50
    assert report.metric_counts["loss"] == 50 and np.isfinite(report.metric_sums["loss"])
    assert published == [0, 10, 20, 30, 40, 50]  # initial weights, then every 10 updates
    assert service.client.priority_updates > 0
    path = service.checkpoint({"counters": {"env_steps": 100, "updates": 0}})
    saved = torch.load(path, weights_only=False)
    assert saved["counters"]["updates"] == 50  # the learner's own count overrides the caller's
    digest = state_digest(service.algorithm.state_dict())
    service.close()

    resumed = make(updates_per_env_step=0.5)
    extra = resumed.restore()
    assert extra["counters"] == {"env_steps": 100, "updates": 50}
    assert extra["state_digest"] == digest == state_digest(saved["algorithm"])
    assert resumed.train(seconds=0.5, env_steps=100).new_updates == 0   # still at the ratio
    assert resumed.train(seconds=3.0, env_steps=140).updates == 70
    with pytest.raises(RuntimeError, match="restore\\(\\) must come before"):
        resumed.restore()
    resumed.close()


def test_diagnostics_start_once_the_probe_can_be_sampled(tmp_path):
    make, _ = _setup(tmp_path, diagnostics="dormant_ratio,srank")
    service = make(updates_per_env_step=1.0)
    report = service.train(seconds=3.0, env_steps=20)
    assert report.probe_ready and report.updates == 20
    # diagnostics every 5 updates, measured on the network "q": keys without a network prefix
    assert "diag/srank" in report.diagnostics and "diag/dormant_ratio/total" in report.diagnostics
    service.close()


@pytest.mark.parametrize("flush", [True, False])
def test_the_learner_flushes_denormal_floats_only_when_asked(tmp_path, flush):
    """Denormal arithmetic is many times slower on x86 CPUs (LearnerConfig.flush_denormal): with the
    option the learner's thread computes them as zero, without it they stay what IEEE 754 says."""
    make, _ = _setup(tmp_path)
    smallest_normal = torch.finfo(torch.float32).tiny
    try:
        service = make(flush_denormal=flush)
        halved = (torch.tensor([smallest_normal]) / 2).item()   # a denormal, unless flushed
        assert (halved == 0.0) is flush, halved
        service.close()
    finally:
        torch.set_flush_denormal(False)   # the thread's default, for the tests after this one
