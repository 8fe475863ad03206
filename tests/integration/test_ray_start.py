"""The trainer's local Ray: a start that fails once (Ray's GCS server timing out, seen in a loaded CI run) is
tried again with a fresh Ray; one that fails twice stops the run with Ray's own error."""

from __future__ import annotations

import pytest
import ray

from evergreen.config import load_config
from evergreen.train import Trainer


def _trainer(tmp_path) -> Trainer:
    from evergreen.scenario import Scenario

    config = load_config(preset="cartpole", overrides={"ray": {"num_cpus": 2}}).validate()
    trainer = Trainer(config, run_dir=tmp_path / "run")
    trainer.scenario = Scenario.from_config(config)   # what run() sets before it starts Ray
    return trainer


def test_a_local_ray_that_fails_to_start_once_is_started_again(tmp_path, monkeypatch, capsys):
    real_init, calls = ray.init, []

    def flaky_init(**options):
        calls.append(options)
        if len(calls) == 1:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")
        return real_init(**options)

    monkeypatch.setattr(ray, "init", flaky_init)
    trainer = _trainer(tmp_path)
    try:
        trainer._start_ray()
        assert ray.is_initialized() and len(calls) == 2 and calls[0] == calls[1]
        assert "the local Ray did not start (Timed out waiting for file" in capsys.readouterr().err
    finally:
        ray.shutdown()
        if trainer._guard is not None:
            trainer._guard.release()


def test_a_local_ray_that_fails_twice_stops_with_its_error(tmp_path, monkeypatch):
    def broken_init(**_options):
        raise RuntimeError("Timed out waiting for file gcs_server_port")

    monkeypatch.setattr(ray, "init", broken_init)
    trainer = _trainer(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="gcs_server_port"):
            trainer._start_ray()
    finally:
        if trainer._guard is not None:
            trainer._guard.release()
