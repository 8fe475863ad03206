"""NStepAdder: exact n-step returns and discounts at every kind of episode end."""

from __future__ import annotations

import numpy as np
import pytest

from actors.adder import TRANSITION_FIELDS, EnvStep, NStepAdder, schema
from actors.envs import BoxActions, DiscreteActions, EnvSpec

F = np.array([False])
T = np.array([True])
VECTOR = EnvSpec((1,), np.dtype(np.float32), DiscreteActions(8))


def make(num_envs, n, gamma, spec=VECTOR, **kwargs):
    return NStepAdder(spec, num_envs=num_envs, n=n, gamma=gamma, **kwargs)


def add(adder, obs, actions, rewards, terminated, truncated, next_obs, policy_version=0, extras=None):
    return adder.add(EnvStep(obs, actions, rewards, terminated, truncated, next_obs, policy_version), extras)


def o(*values):
    """Observation batch [N, 1] float32 whose single feature names the state."""
    return np.array(values, dtype=np.float32).reshape(-1, 1)


def add1(adder, obs, reward, next_obs, *, term=False, trunc=False, action=0, version=0):
    return add(adder, o(obs), np.array([action]), np.array([reward], dtype=np.float32),
               np.array([term]), np.array([trunc]), o(next_obs), version)


def assert_rows(rows, *, obs, action, reward, discount, next_obs, version):
    assert rows is not None
    assert list(rows) == list(TRANSITION_FIELDS)
    np.testing.assert_array_equal(rows["obs"][:, 0], np.array(obs, dtype=np.float32))
    np.testing.assert_array_equal(rows["action"], np.array(action, dtype=np.int64))
    np.testing.assert_allclose(rows["reward"], np.array(reward, dtype=np.float32), rtol=1e-6)
    np.testing.assert_allclose(rows["discount"], np.array(discount, dtype=np.float32), rtol=1e-6)
    np.testing.assert_array_equal(rows["next_obs"][:, 0], np.array(next_obs, dtype=np.float32))
    np.testing.assert_array_equal(rows["policy_version"], np.array(version, dtype=np.int64))
    assert rows["obs"].dtype == np.float32 and rows["next_obs"].dtype == np.float32
    assert rows["action"].dtype == np.int64 and rows["policy_version"].dtype == np.int64
    assert rows["reward"].dtype == np.float32 and rows["discount"].dtype == np.float32
    for v in rows.values():
        assert v.flags["C_CONTIGUOUS"]


def test_n1_plain_terminal_truncation_and_autoreset():
    a = make(1, 1, 0.9)
    assert_rows(add1(a, 0, 1.0, 1, action=1), obs=[0], action=[1], reward=[1.0], discount=[0.9], next_obs=[1],
                version=[0])
    assert_rows(add1(a, 1, 2.0, 2, term=True), obs=[1], action=[0], reward=[2.0], discount=[0.0], next_obs=[2],
                version=[0])
    assert add1(a, 2, 0.0, 100) is None  # autoreset step: reset observation 100 arrives, no transition
    assert_rows(add1(a, 100, 3.0, 101, trunc=True), obs=[100], action=[0], reward=[3.0], discount=[0.9],
                next_obs=[101], version=[0])
    assert add1(a, 101, 0.0, 200) is None
    assert_rows(add1(a, 200, -1.0, 201), obs=[200], action=[0], reward=[-1.0], discount=[0.9], next_obs=[201],
                version=[0])


def test_n3_full_windows():
    a = make(1, 3, 0.9)
    assert add1(a, 0, 1.0, 1, action=0) is None
    assert add1(a, 1, 2.0, 2, action=1) is None
    # 1 + 0.9*2 + 0.81*3 = 5.23
    assert_rows(add1(a, 2, 3.0, 3, action=2), obs=[0], action=[0], reward=[5.23], discount=[0.729], next_obs=[3],
                version=[0])
    # 2 + 0.9*3 + 0.81*4 = 7.94
    assert_rows(add1(a, 3, 4.0, 4), obs=[1], action=[1], reward=[7.94], discount=[0.729], next_obs=[4], version=[0])
    np.testing.assert_array_equal(a.pending, [2])


def test_n3_terminal_mid_window_then_autoreset_skipped():
    a = make(1, 3, 0.9)
    assert add1(a, 0, 1.0, 1, action=3) is None
    rows = add1(a, 1, 2.0, 2, term=True, action=4)
    # 1 + 0.9*2 = 2.8 and 2, both reach the terminal: discount 0, next_obs the final observation.
    assert_rows(rows, obs=[0, 1], action=[3, 4], reward=[2.8, 2.0], discount=[0.0, 0.0], next_obs=[2, 2],
                version=[0, 0])
    np.testing.assert_array_equal(a.pending, [0])
    assert add1(a, 2, 0.0, 100, action=5) is None  # autoreset step
    np.testing.assert_array_equal(a.pending, [0])
    assert add1(a, 100, 1.0, 101) is None
    assert add1(a, 101, 1.0, 102) is None
    assert_rows(add1(a, 102, 1.0, 103), obs=[100], action=[0], reward=[2.71], discount=[0.729], next_obs=[103],
                version=[0])


def test_n3_terminal_on_full_window_flushes_all_with_zero_discount():
    a = make(1, 3, 0.9)
    add1(a, 0, 1.0, 1)
    add1(a, 1, 1.0, 2)
    rows = add1(a, 2, 1.0, 3, term=True)
    # 1 + .9 + .81 = 2.71; 1 + .9 = 1.9; 1
    assert_rows(rows, obs=[0, 1, 2], action=[0, 0, 0], reward=[2.71, 1.9, 1.0], discount=[0, 0, 0],
                next_obs=[3, 3, 3], version=[0, 0, 0])


def test_n3_truncation_mid_window_bootstraps():
    a = make(1, 3, 0.9)
    add1(a, 0, 1.0, 1)
    add1(a, 1, 2.0, 2)
    add1(a, 2, 3.0, 3)
    rows = add1(a, 3, 4.0, 4, trunc=True)
    # obs1: 2 + 2.7 + 3.24 = 7.94 (k=3); obs2: 3 + 3.6 = 6.6 (k=2); obs3: 4 (k=1)
    assert_rows(rows, obs=[1, 2, 3], action=[0, 0, 0], reward=[7.94, 6.6, 4.0], discount=[0.729, 0.81, 0.9],
                next_obs=[4, 4, 4], version=[0, 0, 0])
    assert add1(a, 4, 0.0, 50) is None


def test_terminated_and_truncated_together_counts_as_terminal():
    a = make(1, 2, 0.5)
    add1(a, 0, 1.0, 1)
    rows = add1(a, 1, 1.0, 2, term=True, trunc=True)
    assert_rows(rows, obs=[0, 1], action=[0, 0], reward=[1.5, 1.0], discount=[0, 0], next_obs=[2, 2], version=[0, 0])


def test_policy_version_tags_the_acting_step():
    a = make(1, 2, 0.9)
    assert add1(a, 0, 1.0, 1, version=5) is None
    assert_rows(add1(a, 1, 1.0, 2, version=6), obs=[0], action=[0], reward=[1.9], discount=[0.81], next_obs=[2],
                version=[5])
    assert_rows(add1(a, 2, 1.0, 3, version=7, term=True), obs=[1, 2], action=[0, 0], reward=[1.9, 1.0],
                discount=[0, 0], next_obs=[3, 3], version=[6, 7])


def test_several_envs_with_different_episode_ends():
    # n=2, gamma=0.9. Env 0 terminates at t=1, env 1 truncates at t=2, env 2 never ends.
    a = make(3, 2, 0.9)
    no = np.zeros(3, dtype=bool)

    def step(obs, rewards, next_obs, term=no, trunc=no, version=(0, 0, 0)):
        return add(a, o(*obs), np.array([0, 1, 2]), np.array(rewards, dtype=np.float32), np.array(term),
                   np.array(trunc), o(*next_obs), np.array(version))

    assert step([0, 10, 20], [1, 2, 3], [1, 11, 21], version=(1, 1, 1)) is None
    rows = step([1, 11, 21], [1, 2, 3], [2, 12, 22], term=np.array([True, False, False]), version=(2, 2, 2))
    # full windows (env order): env1 obs10: 2+1.8=3.8, env2 obs20: 3+2.7=5.7; then env0 flush: 1.9, 1 (discount 0)
    assert_rows(rows, obs=[10, 20, 0, 1], action=[1, 2, 0, 0], reward=[3.8, 5.7, 1.9, 1.0],
                discount=[0.81, 0.81, 0, 0], next_obs=[12, 22, 2, 2], version=[1, 1, 1, 2])
    # env0 autoreset (reward 0, reset obs 100); env1 truncates with reward 5.
    rows = step([2, 12, 22], [0, 5, 3], [100, 13, 23], trunc=np.array([False, True, False]), version=(3, 3, 3))
    # env2 obs21: 3+2.7=5.7 (0.81); env1 flush: obs11: 2+4.5=6.5 (0.81), obs12: 5 (0.9)
    assert_rows(rows, obs=[21, 11, 12], action=[2, 1, 1], reward=[5.7, 6.5, 5.0], discount=[0.81, 0.81, 0.9],
                next_obs=[23, 13, 13], version=[2, 2, 3])
    rows = step([100, 13, 23], [1, 0, 3], [101, 200, 24], version=(4, 4, 4))
    # env0 first step of new episode: pending; env1 autoreset: nothing; env2 obs22: 5.7
    assert_rows(rows, obs=[22], action=[2], reward=[5.7], discount=[0.81], next_obs=[24], version=[3])
    np.testing.assert_array_equal(a.pending, [1, 0, 1])


def test_image_observations_keep_dtype_and_shape():
    spec = EnvSpec((4, 3, 3), np.dtype(np.uint8), DiscreteActions(6))
    a = make(2, 1, 0.99, spec)
    obs = np.arange(2 * 4 * 3 * 3, dtype=np.uint8).reshape(2, 4, 3, 3)
    rows = add(a, obs, np.array([1, 2]), np.array([0.5, 1.5]), np.array([False, False]), np.array([False, False]),
               obs + 1, 0)
    assert rows["obs"].dtype == np.uint8 and rows["obs"].shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(rows["obs"], obs)
    np.testing.assert_array_equal(rows["next_obs"], obs + 1)
    assert a.schema() == schema(spec)


def test_continuous_actions_are_float_rows_of_the_box_shape():
    spec = EnvSpec((3,), np.dtype(np.float32), BoxActions((2,), (-1.0, -1.0), (1.0, 1.0)))
    a = make(1, 1, 0.9, spec)
    assert a.schema()[1] == ("action", np.dtype(np.float32), (2,))
    rows = add(a, np.zeros((1, 3), np.float32), np.array([[0.25, -0.5]]), np.array([1.0]), F, F,
               np.ones((1, 3), np.float32))
    assert rows["action"].dtype == np.float32
    np.testing.assert_array_equal(rows["action"], [[0.25, -0.5]])
    with pytest.raises(ValueError, match=r"actions must be floats of shape \(1, 2\), got dtype int64 shape \(1,\)"):
        add(a, np.zeros((1, 3), np.float32), np.array([1]), np.array([1.0]), F, F, np.ones((1, 3), np.float32))


def test_extras_are_stored_with_the_step_that_chose_the_action():
    a = make(1, 2, 0.5, extras=[("log_prob", np.float32, ())])
    assert [f[0] for f in a.schema()] == [*TRANSITION_FIELDS, "log_prob"]
    assert add(a, o(0), np.array([1]), np.array([1.0]), F, F, o(1), extras={"log_prob": np.array([-0.5])}) is None
    rows = add(a, o(1), np.array([2]), np.array([1.0]), T, F, o(2), extras={"log_prob": np.array([-1.5])})
    np.testing.assert_array_equal(rows["log_prob"], np.array([-0.5, -1.5], np.float32))
    with pytest.raises(ValueError, match=r"policy extras \[\] differ from the adder's declared extras \['log_prob'\]"):
        add(a, o(3), np.array([1]), np.array([1.0]), F, F, o(4))
    with pytest.raises(ValueError, match="clashes with a transition field"):
        make(1, 1, 0.9, extras=[("reward", np.float32, ())])


def test_an_unpickled_adder_owns_writable_buffers_and_keeps_its_pending_steps():
    import pickle

    a = make(1, 2, 0.9)
    add1(a, 0, 1.0, 1, action=3)
    b = pickle.loads(pickle.dumps(a))
    for array in (b._obs, b._action, b._reward):
        array.setflags(write=False)  # what a zero-copy transport hands over
    b.__setstate__(dict(b.__dict__))
    assert_rows(add1(b, 1, 2.0, 2), obs=[0], action=[3], reward=[2.8], discount=[0.81], next_obs=[2], version=[0])


def test_schema_matches_columns():
    assert schema(EnvSpec((4,), np.dtype(np.float32), DiscreteActions(2))) == [
        ("obs", np.dtype(np.float32), (4,)),
        ("action", np.dtype(np.int64), ()),
        ("reward", np.dtype(np.float32), ()),
        ("discount", np.dtype(np.float32), ()),
        ("next_obs", np.dtype(np.float32), (4,)),
        ("policy_version", np.dtype(np.int64), ()),
        ("task", np.dtype(np.int64), ()),
    ]
    with pytest.raises(ValueError, match="observation shape must have positive dimensions"):
        schema(EnvSpec((0, 4), np.dtype(np.uint8), DiscreteActions(2)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_envs": 0, "n": 1, "gamma": 0.9}, "num_envs"),
        ({"num_envs": 1, "n": 0, "gamma": 0.9}, "n must"),
        ({"num_envs": 1, "n": 1, "gamma": 1.5}, "gamma"),
        ({"num_envs": 1, "n": 2.0, "gamma": 0.9}, "n must"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NStepAdder(VECTOR, **kwargs)


def test_bad_add_leaves_state_untouched():
    a = make(2, 2, 0.9)
    good = dict(obs=o(0, 10), actions=np.array([0, 0]), rewards=np.array([1.0, 1.0]),
                terminated=np.array([False, False]), truncated=np.array([False, False]), next_obs=o(1, 11))
    assert add(a, **good) is None
    bad_cases = [
        ({"obs": o(0, 10, 20)}, "obs must have leading dimension"),
        ({"next_obs": o(1, 11).astype(np.float64)}, "next_obs must match"),
        ({"actions": np.array([0.0, 1.0])}, "actions"),
        ({"rewards": np.array([1.0, np.nan])}, "finite"),
        ({"terminated": np.array([0, 1])}, "terminated"),
        ({"truncated": np.array([False])}, "truncated"),
        ({"obs": np.zeros((2, 2), np.float32), "next_obs": np.zeros((2, 2), np.float32)}, "the env spec"),
    ]
    for change, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            add(a, **{**good, **change})
    with pytest.raises(ValueError, match="policy_version"):
        add(a, **good, policy_version=np.array([1, 2, 3]))
    np.testing.assert_array_equal(a.pending, [1, 1])
    rows = add(a, **{**good, "obs": o(1, 11), "next_obs": o(2, 12)})
    np.testing.assert_array_equal(rows["obs"][:, 0], [0, 10])
    np.testing.assert_allclose(rows["reward"], [1.9, 1.9], rtol=1e-6)


def test_rows_carry_their_task_and_a_task_change_needs_a_reset_first():
    a = make(1, 2, 0.9)
    spec = a.spec
    obs = np.zeros((1, *spec.observation_shape), dtype=spec.observation_dtype)
    no = np.zeros(1, dtype=bool)

    def step(task, done=False):
        return a.add(EnvStep(obs, np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.float32),
                             np.array([done]), no, obs, 0, task))

    assert step(3) is None
    rows = step(3)
    assert rows["task"].tolist() == [3] and rows["task"].dtype == np.int64
    with pytest.raises(ValueError, match="task changed from 3 to 4 with 1 steps pending; call reset"):
        step(4)
    assert a.pending.tolist() == [1]  # the refused step changed nothing
    a.reset()
    assert step(4) is None and step(4, done=True)["task"].tolist() == [4, 4]
    with pytest.raises(ValueError, match="task must be an integer >= 0, got -1"):
        step(-1)
