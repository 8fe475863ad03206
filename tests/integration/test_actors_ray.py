"""ActorPool on a local Ray: actors insert through a picklable callable, a killed actor is replaced,
resize adds and retires actors, and a crash loop is given up on with a surfaced error."""

from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from torch import nn  # noqa: E402

from actors.adder import NStepAdder  # noqa: E402
from actors.envs import DiscreteActions, EnvConfig, EnvSpec  # noqa: E402
from actors.policy import ConstantEpsilon, EpsilonGreedyPolicy  # noqa: E402
from actors.ray_actor import ActorPool, ActorPoolError, RayActor  # noqa: E402

CARTPOLE = EnvSpec((4,), np.dtype(np.float32), DiscreteActions(2))


@ray.remote(num_cpus=0)
class Recorder:
    """Counts inserted rows per writer (the actor index carried by the inserter)."""

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.pids: dict[int, set] = {}

    def record(self, writer, rows, pid):
        self.rows[writer] = self.rows.get(writer, 0) + rows
        self.pids.setdefault(writer, set()).add(pid)

    def snapshot(self):
        return dict(self.rows), {k: sorted(v) for k, v in self.pids.items()}


class RecordingInsert:
    """Picklable insert callable: validates columns and reports the row count to the Recorder."""

    def __init__(self, recorder, writer):
        self.recorder = recorder
        self.writer = writer

    def __call__(self, columns):
        import os

        rows = columns["action"].shape[0]
        assert all(v.shape[0] == rows for v in columns.values())
        ray.get(self.recorder.record.remote(self.writer, rows, os.getpid()))


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The test module is not importable inside Ray workers; ship its classes by value.
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def wait_for(predicate, *, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def make_kwargs_factory(recorder):
    def make_kwargs(index):
        return dict(
            env_config=EnvConfig(id="CartPole-v1", num_envs=2),
            # A linear Q-function: picklable by reference to torch, no test code needed in the worker.
            policy=EpsilonGreedyPolicy(network=nn.Linear(4, 2), epsilon=ConstantEpsilon(0.5), seed=index),
            adder=NStepAdder(CARTPOLE, num_envs=2, n=1, gamma=0.99),
            insert=RecordingInsert(recorder, index),
            actor_index=index,
            insert_batch_size=16,
            seed=100 * index,
        )

    return make_kwargs


def test_ray_actor_runs_and_reports_stats():
    recorder = Recorder.remote()
    handle = RayActor.options(num_cpus=0.5).remote(make_kwargs_factory(recorder)(0))
    try:
        stats = ray.get(handle.run_steps.remote(50))
        assert stats.env_steps == 100
        rows, _ = ray.get(recorder.snapshot.remote())
        assert rows[0] == stats.transitions > 0
        recent = ray.get(handle.stats.remote())
        assert recent.env_steps == 100 and recent.transitions == stats.transitions
        pid = ray.get(handle.ping.remote())
        info = ray.get(handle.info.remote())
        assert info == {"actor_index": 0, "node_id": ray.get_runtime_context().get_node_id(), "pid": pid}
        assert set(rows_pids := ray.get(recorder.snapshot.remote())[1]) == {0} and rows_pids[0] == [pid]
    finally:
        ray.kill(handle)


def test_pool_restarts_killed_actor_and_resizes():
    recorder = Recorder.remote()
    pool = ActorPool(
        2,
        make_kwargs_factory(recorder),
        restart_backoff_s=0.2,
        max_restarts_per_window=3,
        restart_window_s=60.0,
        chunk_s=0.3,
        actor_options={"num_cpus": 0.5},
    )
    pool.start()
    try:
        def rows():
            return ray.get(recorder.snapshot.remote())[0]

        wait_for(lambda: len(rows()) == 2 and pool.running == 2, what="2 actors inserting")
        # Stats arrive when a chunk returns, a little after its inserts.
        first = wait_for(lambda: (s := pool.stats()).env_steps > 0 and s, what="first stats")
        assert first.num_actors == 2 and first.running == 2 and first.restarts == 0
        assert first.transitions > 0 and first.errors == []

        victim = pool.handles()[0]
        ray.kill(victim)
        wait_for(lambda: pool.stats().restarts_total == 1, what="restart of the killed actor")
        wait_for(lambda: pool.running == 2 and pool.handles()[0] != victim, what="replacement actor")
        wait_for(lambda: len(ray.get(recorder.snapshot.remote())[1][0]) == 2, what="replacement inserting")

        pool.resize(3)
        wait_for(lambda: pool.running == 3 and 2 in rows(), what="third actor inserting")
        pool.resize(1)
        wait_for(lambda: pool.running == 1 and list(pool.handles()) == [0], what="retirement of actors 1 and 2")
        assert [a["actor_index"] for a in pool.placement()] == [0]
        stats = pool.stats()
        assert stats.num_actors == 1 and stats.running == 1 and stats.restarts_total == 1
        assert stats.env_steps > 0 and stats.steps_per_second > 0
        assert stats.num_episodes > 0 and np.isfinite(stats.mean_return("CartPole-v1"))
        pool.check()  # no crash loop
    finally:
        pool.stop()


def test_pool_gives_up_on_a_crash_loop():
    def broken(index):
        # The env id is invalid: Actor.__init__ raises inside the worker on every start.
        return dict(env_config=EnvConfig(id="NoSuchEnv-v0"),
                    policy=EpsilonGreedyPolicy(network=nn.Linear(4, 2), epsilon=ConstantEpsilon(0.5)),
                    adder=NStepAdder(CARTPOLE, num_envs=1, n=1, gamma=0.99), insert=print)

    pool = ActorPool(1, broken, restart_backoff_s=0.05, max_restarts_per_window=1, restart_window_s=60.0,
                     actor_options={"num_cpus": 0.5})
    pool.start()
    try:
        wait_for(lambda: pool.stats().errors, what="crash loop error")
        with pytest.raises(ActorPoolError, match=r"actor 0 crashed 2 times.*max_restarts_per_window=1.*NoSuchEnv"):
            pool.check()
        stats = pool.stats()
        assert stats.restarts_total == 1 and stats.running == 0
    finally:
        pool.stop()


def test_pool_bad_arguments():
    with pytest.raises(ValueError, match="number of actors"):
        ActorPool(-1, lambda i: {})
    with pytest.raises(ValueError, match="restart_backoff_s"):
        ActorPool(1, lambda i: {}, restart_backoff_s=0)
    with pytest.raises(ValueError, match="max_restarts_per_window"):
        ActorPool(1, lambda i: {}, max_restarts_per_window=-1)
    with pytest.raises(ValueError, match="make_actor_kwargs"):
        ActorPool(1, None)
    pool = ActorPool(1, lambda i: {})
    with pytest.raises(ValueError, match="number of actors"):
        pool.resize(2.5)


def test_weight_publisher_hands_the_newest_weights_to_actors_off_the_update_thread():
    import torch

    from evergreen.weights import RayWeightSource, WeightPublisher, WeightStore

    net = nn.Linear(3, 2)
    store = WeightStore.remote()
    publisher, source = WeightPublisher(store, actor_keys=set(net.state_dict())), RayWeightSource(store)
    assert source.get(0) is None and source.latest_version() == -1
    for version in range(1, 6):  # faster than the thread publishes: the newest one must win
        with torch.no_grad():
            net.weight.fill_(version)
        publisher(version, {k: v.clone() for k, v in net.state_dict().items()}, net)
    publisher.flush()
    assert source.latest_version() == 5
    state = source.get(5)
    assert set(state) == {"weight", "bias"} and isinstance(state["weight"], torch.Tensor)
    assert torch.equal(state["weight"], torch.full((2, 3), 5.0)) and torch.equal(state["bias"], net.bias.detach())
    state["weight"].add_(1)  # the actor's copy is its own, writable, and not the store's
    assert torch.equal(source.get(5)["weight"], torch.full((2, 3), 5.0))

    # An architecture the actors do not build travels as the whole network.
    wider = nn.Sequential(nn.Linear(3, 2))
    publisher(6, {k: v.clone() for k, v in wider.state_dict().items()}, wider)
    publisher.flush()
    payload = source.get(6)
    assert isinstance(payload, nn.Sequential) and torch.equal(payload[0].weight, wider[0].weight)

    # A store that died surfaces in the learner: at the latest by the publish after the failed one.
    ray.kill(store)
    with pytest.raises(RuntimeError, match="publishing weights to the weight store failed"):
        for version in range(7, 10):
            publisher(version, {k: v.clone() for k, v in net.state_dict().items()}, net)
            publisher.flush()
