"""Actor loop on real envs: columns, counts, batching, weight pulls by version, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actors.actor import Actor, ActorStats
from actors.adder import TRANSITION_FIELDS, NStepAdder
from actors.envs import EnvConfig, env_spec
from actors.policy import ConstantEpsilon, EpsilonGreedyPolicy, PolicyStep, apex_epsilon


def mlp_factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


class RecordingInserter:
    def __init__(self):
        self.batches: list[dict[str, np.ndarray]] = []

    def __call__(self, columns):
        self.batches.append(columns)

    def column(self, name, start=0):
        return np.concatenate([b[name] for b in self.batches[start:]])


class VersionedWeights:
    """Publishes state dicts by version, like the learner's weight publisher."""

    def __init__(self):
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        self.gets: list[int] = []

    def publish(self, version, state):
        self.versions[version] = {k: v.clone() for k, v in state.items()}

    def latest_version(self):
        return max(self.versions, default=-1)

    def get(self, version):
        self.gets.append(version)
        return self.versions[version]


def policy(network_factory=mlp_factory, epsilon=0.0, seed=0) -> EpsilonGreedyPolicy:
    return EpsilonGreedyPolicy(network=network_factory(), epsilon=ConstantEpsilon(epsilon), seed=seed)


def adder(env: EnvConfig, n: int = 3, gamma: float = 0.9) -> NStepAdder:
    return NStepAdder(env_spec(env), num_envs=env.num_envs, n=n, gamma=gamma)


def prefer_action(action: int) -> dict[str, torch.Tensor]:
    """Weights under which the greedy action is always ``action``."""
    state = {k: torch.zeros_like(v) for k, v in mlp_factory().state_dict().items()}
    state["2.bias"][action] = 1.0
    return state


def test_actor_runs_cartpole_inserts_batches_and_follows_weight_versions():
    inserter = RecordingInserter()
    weights = VersionedWeights()
    weights.publish(0, prefer_action(0))
    env = EnvConfig(id="CartPole-v1", num_envs=4, seed=3)
    actor = Actor(
        env_config=env,
        policy=policy(),
        adder=adder(env, n=3, gamma=0.9),
        insert=inserter,
        weights_source=weights,
        insert_batch_size=32,
        weights_poll_interval=50,
    )
    try:
        stats = actor.run(200)
        assert isinstance(stats, ActorStats)
        assert stats.env_steps == 800 and actor.total_env_steps == 800
        assert stats.weight_updates == 1 and stats.policy_version == 0 and weights.gets == [0]

        rows = sum(b["action"].shape[0] for b in inserter.batches)
        assert stats.transitions == rows and stats.insert_calls == len(inserter.batches)
        # Every batch but the last (flushed at the end of run) is exactly insert_batch_size rows.
        assert all(b["action"].shape[0] == 32 for b in inserter.batches[:-1])
        assert 0 < inserter.batches[-1]["action"].shape[0] <= 32
        # Each non-autoreset step becomes one transition unless still pending in the adder.
        lengths = stats.episode_lengths["CartPole-v1"]
        pending = int(actor.adder.pending.sum())
        assert rows + pending == int(lengths.sum() + actor.env.current_episode_lengths.sum())
        # CartPole pays +1 per step: the undiscounted return equals the length.
        np.testing.assert_array_equal(stats.episode_returns["CartPole-v1"], lengths.astype(np.float64))
        assert stats.num_episodes == lengths.size > 0

        specs = actor.adder.schema()
        for batch in inserter.batches:
            assert list(batch) == list(TRANSITION_FIELDS)
            n = batch["action"].shape[0]
            for name, dtype, shape in specs:
                assert batch[name].dtype == dtype and batch[name].shape == (n, *shape), name
                assert batch[name].flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(inserter.column("action"), 0)  # greedy under version-0 weights
        np.testing.assert_array_equal(inserter.column("policy_version"), 0)
        discounts = inserter.column("discount")
        # Always pushing left, CartPole only terminates: each episode of length L flushes min(L, 3) rows
        # with discount 0; every other row has a full window, discount 0.9^3.
        assert np.count_nonzero(discounts == 0) == int(np.minimum(lengths, 3).sum())
        np.testing.assert_array_equal(discounts[discounts != 0], np.float32(0.9**3))

        # Publish version 1; the next run polls before its first step and tags with it.
        weights.publish(1, prefer_action(1))
        before = len(inserter.batches)
        stats2 = actor.run(200)
        assert stats2.weight_updates == 1 and stats2.policy_version == 1 and weights.gets == [0, 1]
        for name, value in actor.network.state_dict().items():
            torch.testing.assert_close(value, weights.versions[1][name])
        versions = inserter.column("policy_version", before)
        actions = inserter.column("action", before)
        # Transitions pending at the end of run 1 were acted by version 0; all later ones by version 1.
        assert np.count_nonzero(versions == 0) == pending
        np.testing.assert_array_equal(actions[versions == 1], 1)
        np.testing.assert_array_equal(actions[versions == 0], 0)

        # A run with no new version loads nothing.
        assert actor.run(60).weight_updates == 0 and weights.gets == [0, 1]

        recent = actor.stats()
        assert recent.env_steps == 4 * 460 and recent.weight_updates == 2 and recent.policy_version == 1
        assert recent.transitions == sum(b["action"].shape[0] for b in inserter.batches)
        assert recent.wall_s > 0 and recent.steps_per_second > 0
        empty = actor.stats()
        assert empty.env_steps == 0 and empty.num_episodes == 0 and empty.transitions == 0
    finally:
        actor.close()
    with pytest.raises(RuntimeError, match="close"):
        actor.run(1)


def test_actor_without_weights_source_reports_the_policy_exploration_and_version_minus_one():
    inserter = RecordingInserter()
    env = EnvConfig(id="CartPole-v1", num_envs=2)
    eps = apex_epsilon(index=1, num_actors=3)
    actor = Actor(env_config=env, policy=policy(epsilon=eps), adder=adder(env, n=1, gamma=0.99), insert=inserter,
                  actor_index=1, insert_batch_size=7, seed=9)
    try:
        stats = actor.run(30)
        assert actor.seed == 9 and actor.env_config.seed == 9
        assert stats.exploration == {"epsilon": pytest.approx(0.4**4.5, rel=1e-12)}
        np.testing.assert_array_equal(inserter.column("policy_version"), -1)
        assert stats.transitions == inserter.column("action").shape[0] > 0
    finally:
        actor.close()


class ScriptedPolicy:
    """A Policy that plays a fixed action and hands the adder one extra per row."""

    def __init__(self):
        self.network = mlp_factory()
        self.seen_steps: list[int] = []

    def act(self, obs, *, env_steps):
        self.seen_steps.append(env_steps)
        return PolicyStep(actions=np.ones(obs.shape[0], np.int64), extras={"tag": np.full(obs.shape[0], env_steps)})

    def load_weights(self, weights):
        raise AssertionError("no weights source")

    def describe(self, *, env_steps):
        return {"scripted": 1.0}


def test_actor_drives_any_policy_and_adder_and_resumes_the_step_count():
    inserter = RecordingInserter()
    env = EnvConfig(id="CartPole-v1", num_envs=2)
    scripted = ScriptedPolicy()
    extras = NStepAdder(env_spec(env), num_envs=2, n=1, gamma=0.9, extras=[("tag", np.int64, ())])
    actor = Actor(env_config=env, policy=scripted, adder=extras, insert=inserter, insert_batch_size=4,
                  env_steps_offset=1000, async_inserts=False)
    try:
        stats = actor.run(5)
        assert scripted.seen_steps == [1000, 1002, 1004, 1006, 1008] and actor.total_env_steps == 1010
        assert stats.exploration == {"scripted": 1.0}
        assert list(inserter.batches[0]) == [*TRANSITION_FIELDS, "tag"]
        np.testing.assert_array_equal(inserter.column("action"), 1)
        np.testing.assert_array_equal(np.unique(inserter.column("tag")), [1000, 1002, 1004, 1006, 1008])
    finally:
        actor.close()


def test_actor_time_bounded_run():
    env = EnvConfig(id="CartPole-v1", num_envs=2)
    actor = Actor(env_config=env, policy=policy(), adder=adder(env), insert=lambda columns: None)
    try:
        stats = actor.run(max_seconds=0.2)
        assert stats.env_steps > 0 and stats.env_steps % 2 == 0
        assert actor.run(0).env_steps == 0
    finally:
        actor.close()


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, kernel_size=8, stride=8)
        self.head = nn.Linear(4 * 10 * 10, 6)

    def forward(self, x):
        # The network scales uint8 frames itself (the learner applies the same module to replayed frames).
        x = x.float() / 255.0
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_actor_on_pong_keeps_uint8_frames():
    inserter = RecordingInserter()
    env = EnvConfig(id="pong", num_envs=2)
    actor = Actor(env_config=env, policy=policy(TinyConv), adder=adder(env, n=3, gamma=0.99), insert=inserter,
                  insert_batch_size=16)
    try:
        stats = actor.run(20)
        assert stats.env_steps == 40
        assert stats.transitions == 2 * (20 - 2)  # no episode ends in 20 Pong steps; 2 pending per env
        obs = inserter.column("obs")
        assert obs.dtype == np.uint8 and obs.shape == (36, 4, 84, 84)
        assert inserter.column("next_obs").dtype == np.uint8
    finally:
        actor.close()


def test_actor_bad_arguments():
    cfg = EnvConfig(id="CartPole-v1", num_envs=1)
    base = dict(env_config=cfg, policy=policy(), adder=adder(cfg), insert=lambda c: None)
    cases = [
        ({"actor_index": -1}, "actor_index"),
        ({"insert_batch_size": 0}, "insert_batch_size"),
        ({"weights_poll_interval": 0}, "weights_poll_interval"),
        ({"env_steps_offset": -5}, "env_steps_offset"),
        ({"weights_source": object()}, "weights_source"),
        ({"env_config": "CartPole-v1"}, "EnvConfig"),
        ({"policy": object()}, "policy must implement actors.policy.Policy"),
        ({"adder": object()}, "adder must implement actors.adder.Adder"),
        ({"insert": "nowhere"}, "insert must be a callable"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            Actor(**{**base, **change})
    with pytest.raises(ValueError, match="network must be an nn.Module"):
        EpsilonGreedyPolicy(network="not a module", epsilon=ConstantEpsilon(0.1))
    def three_actions() -> nn.Module:  # a 3-action head that always picks action 2
        head = nn.Linear(4, 3)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        return head

    wrong_head = Actor(**{**base, "policy": policy(three_actions)})
    try:
        with pytest.raises(ValueError, match=r"actions must lie in \[0, 2\), got min 2 max 2"):
            wrong_head.run(1)
        with pytest.raises(ValueError, match="num_steps or max_seconds"):
            wrong_head.run()
        with pytest.raises(ValueError, match="num_steps"):
            wrong_head.run(-1)
    finally:
        wrong_head.close()


class TaskWeights(VersionedWeights):
    """A weights source that also names the scenario's current task, as the run's weight store does."""

    def __init__(self):
        super().__init__()
        self.task = 0

    def current_task(self):
        return self.task


def test_actor_follows_the_task_at_its_weight_polls_and_rows_carry_their_task():
    from actors.tasks import EnvTask, TaskVariation

    env = EnvConfig(id="CartPole-v1", num_envs=2, seed=1)
    tasks = [EnvTask("short", env), EnvTask("long", env, TaskVariation.from_dict({"params": {"length": 3.0}}))]
    inserter, weights = RecordingInserter(), TaskWeights()
    weights.publish(0, prefer_action(0))
    actor = Actor(env_config=env, policy=policy(), adder=adder(env), insert=inserter, weights_source=weights,
                  insert_batch_size=16, weights_poll_interval=10, tasks=tasks)
    try:
        first = actor.run(40)
        assert actor.task == 0 and set(first.episode_returns) <= {"short"}
        assert actor.env._env.envs[0].unwrapped.length == 0.5
        weights.task = 1
        rows_before = len(inserter.column("task"))
        second = actor.run(60)
        assert actor.task == 1 and actor.env.task_id == "long" and actor.env._env.envs[0].unwrapped.length == 3.0
        assert set(second.episode_returns) <= {"short", "long"} and "long" in second.episode_returns
        task_column = inserter.column("task")
        assert set(task_column[:rows_before].tolist()) == {0}
        assert task_column[rows_before:].tolist() == sorted(task_column[rows_before:].tolist())  # 0s, then 1s
        assert task_column[-1] == 1
        # No n-step window spans the switch: every row made after it holds an observation of the new env,
        # and the adder was reset (no pending steps of the old task made it into a task-1 row).
        assert actor.adder.pending.max() <= 3
    finally:
        actor.close()
    with pytest.raises(ValueError, match="tasks must be a non-empty list of actors.tasks.EnvTask"):
        Actor(env_config=env, policy=policy(), adder=adder(env), insert=inserter, tasks=[])
    with pytest.raises(ValueError, match="Actor task must be an index into its 2 task"):
        Actor(env_config=env, policy=policy(), adder=adder(env), insert=inserter, tasks=tasks, task=2)


class GatedWeights(TaskWeights):
    """The run's weight store without Ray: version, task and the env-step gate in one poll."""

    def __init__(self, hold_at):
        from evergreen.weights import EnvStepGate

        super().__init__()
        self.gate = EnvStepGate()
        self.gate.open(hold_at=hold_at, env_steps=0)
        self.polls: list[tuple[int, bool]] = []

    def poll(self, actor, env_steps, held=False):
        self.polls.append((env_steps, held))
        return self.latest_version(), self.task, self.gate.report(actor, env_steps, held)


def test_an_actor_stops_at_the_closed_gate_with_its_rows_inserted_and_goes_on_when_it_opens():
    env = EnvConfig(id="CartPole-v1", num_envs=2, seed=1)
    inserter, weights = RecordingInserter(), GatedWeights(hold_at=100)
    weights.publish(0, prefer_action(0))
    actor = Actor(env_config=env, policy=policy(), adder=adder(env, n=1), insert=inserter, weights_source=weights,
                  insert_batch_size=1000, weights_poll_interval=10, async_inserts=False)
    try:
        stats = actor.run(max_seconds=0.5)
        # 10 vector steps x 2 envs per poll: the gate closes at the poll that reports step 100, no later.
        assert actor.gate_closed and stats.env_steps == actor.total_env_steps == 100
        assert weights.gate.env_steps == 100 and stats.held_s > 0.3
        # Held, it inserted the rows it had buffered (the batch was far from full; autoreset steps make no
        # row) and said so.
        assert 90 <= len(inserter.column("action")) == stats.transitions <= 100
        assert weights.gate.state()["held"] == [0]
        assert weights.polls[-1] == (0, True)
        weights.task = 0
        weights.gate.open(hold_at=300)
        more = actor.run(max_seconds=0.5)
        assert more.env_steps == 200 and weights.gate.env_steps == 300 and actor.gate_closed
        weights.gate.open(hold_at=None)
        assert actor.run(5).env_steps == 10 and not actor.gate_closed
    finally:
        actor.close()


def test_the_gate_counts_reported_steps_and_forgets_actors_that_stop_polling(monkeypatch):
    from evergreen import weights as weights_module
    from evergreen.weights import EnvStepGate

    gate = EnvStepGate()
    assert gate.state() == {"env_steps": 0, "hold_at": None, "closed": False, "held": []}
    assert gate.report(0, 10_000, held=True) is False    # no limit: never closed, nobody held
    gate.open(hold_at=100, env_steps=40)
    assert gate.report(0, 50) is False and gate.report(1, 20) is True and gate.env_steps == 110
    assert gate.report(0, -5, held=True) is True and gate.env_steps == 110   # a negative report counts nothing
    assert gate.state()["held"] == [0]
    clock = [1000.0]
    monkeypatch.setattr(weights_module.time, "monotonic", lambda: clock[0])
    gate.report(1, 0, held=True)
    clock[0] += weights_module.HELD_FRESH_S + 1   # actor 1 died while held: it no longer counts
    gate.report(0, 0, held=True)
    assert gate.state()["held"] == [0]
    gate.open(hold_at=200)
    assert gate.state() == {"env_steps": 110, "hold_at": 200, "closed": False, "held": []}
