"""The run config tree: presets, cross-field validation, derived replay settings, CLI flags."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from actors.envs import BoxActions, DiscreteActions, EnvSpec
from actors.policy import ConstantEpsilon, LinearEpsilon
from evergreen.agents.dqn import DQNBuilder, exploration_schedule
from evergreen.config import CONFIG_DIR, RunConfig, load_config, read_config, save_config
from evergreen.configtools import field_docs
from evergreen.train import build_parser, default_error_buffer, table_config
from replay.schema import Bounds


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset=preset).validate()
    assert config.name == preset


def test_every_config_field_is_documented():
    def walk(cls, path):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) or dataclasses.is_dataclass(
                getattr(cls(), f.name)
            ):
                walk(type(getattr(cls(), f.name)), f"{path}{f.name}.")
            assert docs.get(f.name), f"config field {path}{f.name} has no docstring"

    walk(RunConfig, "")


def test_config_round_trips_through_the_run_dir(tmp_path):
    config = load_config(preset="pong", overrides={"learner": {"batch_size": 48}, "plasticity": {
        "interventions": "layer_norm,redo", "options": {"redo": {"period": 10}}}})
    save_config(config, tmp_path / "config.json")
    assert read_config(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["learner"]["batch_size"] == 48


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"replay": {"num_shards": 0}}, "replay.num_shards = 0 is invalid"),
        ({"replay": {"min_size_to_sample": 10**9}}, "otherwise sampling never starts"),
        ({"replay": {"min_size_to_sample": 10}, "learner": {"batch_size": 64}}, ">= learner.batch_size"),
        ({"replay": {"samples_per_insert": 32.0, "error_buffer": 100.0}}, "fit in the limiter's band"),
        ({"actors": {"gamma": 1.5}}, "actors.gamma = 1.5 is invalid: expected in (0, 1]"),
        ({"learner": {"device": "tpu"}}, "learner.device = 'tpu' is invalid"),
        ({"learner": {"num_ranks": 0}}, "learner.num_ranks = 0 is invalid: expected an integer >= 1"),
        ({"learner": {"num_ranks": True}}, "learner.num_ranks: expected an integer, got True"),
        ({"learner": {"num_ranks": 2, "device": "cuda:1"}}, "each rank gets its own GPU from Ray"),
        ({"dqn": {"bf16": "maybe"}}, "dqn.bf16: 'maybe' is not a boolean (true/false)"),
        ({"sac": {"bf16": 3}}, "sac.bf16: expected true/false, got 3"),
        ({"plasticity": {"interventions": "redo,bogus"}}, "bogus"),
        ({"plasticity": {"diagnostics": "srank,bogus"}}, "unknown diagnostic 'bogus'"),
        ({"env": {"num_envs": 0}}, "num_envs"),
        ({"network": {"encoder": "transformer"}}, "transformer"),
        ({"telemetry_port": 70000}, "telemetry_port = 70000 is invalid"),
        ({"telemetry_host": " "}, "telemetry_host = ' ' is invalid: expected an address to bind"),
        ({"replay": {"metrics_port": 70000}}, "replay.metrics_port = 70000 is invalid"),
        ({"algorithm": "ppo"}, "algorithm = 'ppo' is invalid: expected one of ['dqn', 'sac']"),
        ({"learner": {"placement": {"num_gpus": -1}}}, "learner.placement.num_gpus = -1.0 is invalid"),
        ({"replay": {"placement": {"resources": {"replay": 0}}}}, "replay.placement.resources = {'replay': 0}"),
        ({"replay": {"num_shards": 2, "checkpoint_dir": "/data/replay"}}, "a path containing {shard}"),
        ({"replay": {"checkpoint_dir": "/data/{node}/shard-{shard}"}}, "only {shard} and {run} may appear"),
        ({"plasticity": {"interventions": "redo", "options": {"redo": {"networks": ["critic"]}}}},
         "redo: option 'networks' names ['critic']; this algorithm's networks are ['q']"),
        ({"env": {"id": "Nope-v0"}}, "is not an id of any env family"),
        ({"learner": {"batches_per_sample": 0}}, "learner.batches_per_sample = 0 is invalid: expected >= 1"),
        ({"learner": {"batches_per_sample": 1000}}, "learner.batches_per_sample = 1000 is invalid: expected at most 781"),
        ({"learner": {"batches_per_sample": 40}, "replay": {"samples_per_insert": 1.0, "error_buffer": 1000.0}},
         "one sample call (5120 rows: learner.batch_size x learner.batches_per_sample)"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(preset="cartpole", overrides=overrides).validate()
    assert message in str(err.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'nope': expected one of \[.*'cartpole'.*'pong'"):
        load_config(preset="nope")


def test_table_config_follows_the_run_config():
    config = load_config(preset="cartpole", overrides={"replay": {"num_shards": 2, "capacity": 10_000,
                                                                  "samples_per_insert": 8.0}})
    builder = DQNBuilder(config, EnvSpec((4,), np.dtype("float32"), DiscreteActions(2)))
    table = table_config(config, fields=builder.replay_fields(), obs_shape=(4,), obs_dtype="float32",
                         bounds=builder.replay_bounds())
    bounds = {f.name: f.bounds for f in table.schema.fields}
    assert bounds["action"] == Bounds(low=0, high=1) and bounds["discount"] == Bounds(low=0, high=1)
    assert bounds["reward"] == Bounds() and bounds["obs"] == Bounds() and bounds["policy_version"] is None
    assert table.capacity == 5_000 and table.storage == "ring" and table.sampler == config.replay.sampler
    assert [f.name for f in table.schema.fields] == ["obs", "action", "reward", "discount", "next_obs", "policy_version",
                                                     "task"]
    # the band holds 2 insert calls of insert_batch_size rows at spi 8, 4 sample batches, or 2 sample calls
    # (batches_per_sample batches each), whichever is largest: here 2 calls of 8 batches of 128
    lrn = config.learner
    assert lrn.batches_per_sample == 8
    expected = max(2 * config.actors.insert_batch_size * 8.0, 4 * lrn.batch_size, 2 * lrn.batch_size * 8)
    assert expected == 2048 and table.error_buffer == default_error_buffer(config) == expected
    pong = load_config(preset="pong")
    atari_builder = DQNBuilder(pong, EnvSpec((4, 84, 84), np.dtype("uint8"), DiscreteActions(6)))
    atari = table_config(pong, fields=atari_builder.replay_fields(), obs_shape=(4, 84, 84), obs_dtype="uint8")
    assert atari.storage == "atari"


def test_dqn_builder_refuses_continuous_actions():
    config = load_config(preset="cartpole")
    with pytest.raises(ValueError, match=r"algorithm 'dqn' needs a discrete action space; env 'CartPole-v1' has Box"):
        DQNBuilder(config, EnvSpec((3,), np.dtype("float32"), BoxActions((1,), (-2.0,), (2.0,))))


def test_exploration_schedule_resumes_where_it_left_off():
    actors = load_config(preset="cartpole", overrides={"actors": {
        "num_actors": 3, "epsilon_start": 1.0, "epsilon_base": 0.4, "epsilon_alpha": 7.0,
        "epsilon_decay_steps": 1000}}).actors
    fresh = exploration_schedule(actors, index=0)
    assert isinstance(fresh, LinearEpsilon) and fresh(0) == 1.0 and fresh(1000) == pytest.approx(0.4)
    resumed = exploration_schedule(actors, index=0, step_offset=250)
    assert resumed(0) == pytest.approx(fresh(250)) and resumed(750) == pytest.approx(0.4)
    done = exploration_schedule(actors, index=2, step_offset=5000)
    assert isinstance(done, ConstantEpsilon) and done(0) == pytest.approx(0.4 ** 8)


def test_actors_added_by_scaling_spread_over_a_ladder_of_max_actors():
    actors = load_config(preset="cartpole", overrides={"actors": {
        "num_actors": 2, "epsilon_base": 0.4, "epsilon_alpha": 7.0, "epsilon_decay_steps": 1}}).actors
    ends = [exploration_schedule(actors, index=i, step_offset=10, max_actors=8)(0) for i in range(5)]
    assert ends[:2] == pytest.approx([0.4, 0.4 ** 8])               # the configured ladder, unchanged
    assert ends[2:] == pytest.approx([0.4 ** (1 + 7 * i / 7) for i in (2, 3, 4)])   # added: a ladder over 8
    assert len(set(ends[2:])) == 3
    with pytest.raises(ValueError, match=r"index must be an integer in \[0, 2\)"):
        exploration_schedule(actors, index=2)                        # without a max: only the configured ones


def test_cli_flags_cover_the_tree():
    help_text = build_parser().format_help()
    for flag in ("--replay.num_shards", "--learner.total_env_steps", "--plasticity.interventions",
                 "--network.hidden_sizes", "--dqn.lr", "--env.id", "--actors.n_step", "--resume", "--plasticity",
                 "--algorithm", "--ray.address", "--replay.placement.resources", "--learner.placement.num_gpus",
                 "--replay.checkpoint_dir", "--learner.checkpoint_dir"):
        assert flag in help_text
