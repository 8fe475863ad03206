"""Bookkeeping's stop rule: the mean return over ``stop_window`` episodes, the records' over 100."""

from __future__ import annotations

import numpy as np
import pytest

from actors.ray_actor import PoolStats
from evergreen.bookkeeping import Bookkeeping
from evergreen.config import load_config


def _episodes(returns):
    return PoolStats(env_steps=200 * len(returns), episode_returns={"Pendulum-v1": np.asarray(returns, float)},
                     episode_lengths={"Pendulum-v1": np.full(len(returns), 200)})


def test_the_stop_window_decides_solved_while_the_mean_return_stays_over_100_episodes(tmp_path):
    books = Bookkeeping(tmp_path, stop_at_return=-200.0, stop_window=20)
    try:
        books.add_actor_stats(_episodes([-1500.0] * 19))
        assert not books.solved                                # 19 < 20 episodes
        books.add_actor_stats(_episodes([-150.0] * 19))
        assert not books.solved                                # the last 20 hold one -1500
        books.add_actor_stats(_episodes([-150.0]))
        assert books.solved and books.mean_return == pytest.approx((19 * -1500 + 20 * -150) / 39)
        books.add_actor_stats(_episodes([-1500.0]))
        assert not books.solved                                # the window moves on
    finally:
        books.close()
    (tmp_path / "default").mkdir()
    default = Bookkeeping(tmp_path / "default", stop_at_return=-200.0)
    try:
        default.add_actor_stats(_episodes([-150.0] * 99))
        assert not default.solved and len(default.returns) == 99
        default.add_actor_stats(_episodes([-150.0]))
        assert default.solved
    finally:
        default.close()


def test_a_bad_stop_window_is_refused_by_name():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"learner.stop_window.*expected an integer"):
            load_config(preset="cartpole", overrides={"learner": {"stop_window": bad}}).validate()
