"""SAC through the whole system: a Ray actor acting with the squashed-Gaussian policy, continuous
actions through the adder and a real gRPC replay shard (which checks their bounds), the SAC learner,
interventions and diagnostics on actor and critic, checkpoint and resume with identical counters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evergreen.config import load_config
from evergreen.train import Trainer, main
from learner.checkpoint import load_latest_checkpoint, state_digest

pytestmark = pytest.mark.e2e


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pendulum(total: int):
    return load_config(preset="pendulum", overrides={
        "sac": {"hidden": [64, 64]},
        "replay": {"capacity": 5000, "min_size_to_sample": 256, "samples_per_insert": 64.0},
        "learner": {"total_env_steps": total, "stop_at_return": None, "log_every_s": 1.0, "batch_size": 64},
        "plasticity": {"diagnostics": "dormant_ratio,srank,churn", "diagnostics_every": 20,
                       "interventions": "shrink_perturb", "options": {"shrink_perturb": {"period": 100}}},
    }).validate()


def test_a_short_pendulum_run_trains_sac_checkpoints_and_resumes_with_identical_counters(tmp_path):
    run_dir = tmp_path / "sac"
    first = Trainer(_pendulum(1500), run_dir=run_dir).run()
    # The run ends at the actors' env-step gate: within one weight poll (16 steps x 1 env) of its total.
    assert 1500 <= first.env_steps <= 1500 + 16 and first.updates > 100 and first.episodes >= 7
    records = _records(run_dir)
    keys = set().union(*records)
    assert {"critic_loss", "actor_loss", "alpha", "entropy", "q"} <= keys, sorted(keys)
    # Diagnostics per network, intervention metrics per network (SAC names its networks in metric keys).
    assert {"diag/actor/dormant_ratio/total", "diag/critic/dormant_ratio/total", "diag/critic/srank"} <= keys
    assert any(k.startswith("shrink_perturb/critic/") for k in keys) and \
        any(k.startswith("shrink_perturb/actor/") for k in keys), sorted(keys)
    assert records[-1]["dropped_batches"] == 0 and records[-1]["actor_restarts"] == 0
    alpha = [r["alpha"] for r in records if r.get("alpha") is not None]
    assert alpha and alpha[-1] < 1.0            # the temperature learned (it starts at 1)

    state = load_latest_checkpoint(run_dir / "checkpoints")
    assert state["counters"]["env_steps"] == first.env_steps and state["counters"]["updates"] == first.updates
    assert state["algorithm"]["step"] == first.updates
    assert main(["--resume", str(run_dir), "--learner.total_env_steps", str(first.env_steps + 500)]) == 0
    resumed_from = json.loads((run_dir / "resumed.json").read_text())
    assert resumed_from == {"updates": first.updates, "env_steps": first.env_steps,
                            "state_digest": state_digest(state["algorithm"])}
    after = load_latest_checkpoint(run_dir / "checkpoints")
    assert after["counters"]["env_steps"] >= first.env_steps + 500 and after["counters"]["updates"] > first.updates


def test_sac_refuses_discrete_envs_and_dqn_refuses_continuous_ones():
    with pytest.raises(ValueError, match=r"algorithm 'sac' needs a continuous \(Box\) action space"):
        Trainer(load_config(preset="cartpole", overrides={"algorithm": "sac"}).validate(), run_dir="/nonexistent").run()
    with pytest.raises(ValueError, match="algorithm 'dqn' needs a discrete action space"):
        Trainer(load_config(preset="pendulum", overrides={"algorithm": "dqn"}).validate(), run_dir="/nonexistent").run()


def test_the_replay_table_of_a_sac_run_refuses_an_action_outside_the_box():
    """The table the run's shards hold checks continuous actions against the env's box, naming the field."""
    from actors.envs import env_spec
    from evergreen.agents import make_builder
    from evergreen.train import table_config
    from replay.table import Table

    config = load_config(preset="pendulum").validate()
    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    table = Table(table_config(config, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                               obs_dtype=spec.observation_dtype, bounds=builder.replay_bounds()))
    row = {name: np.zeros((1, *shape), dtype) for name, dtype, shape in builder.replay_fields()}
    assert row["action"].shape == (1, 1) and row["action"].dtype == np.float32
    table.insert(row)
    row["action"][0, 0] = 2.5                      # Pendulum's torque is in [-2, 2]
    with pytest.raises(ValueError, match="action"):
        table.insert(row)
    assert table.info().size == 1
