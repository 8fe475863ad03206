"""Shards as real processes (ShardProcess / `python -m replay.server` / `evergreen replay serve`):
READY line, kill + restart under a client that keeps working, restore from checkpoint, SIGTERM's final
checkpoint, a refused schema mismatch, metrics over HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
import zlib

import numpy as np
import psutil
import pytest

from replay import errors
from replay.auth import write_token_file
from replay.checkpoint import latest_checkpoint, read_checkpoint
from replay.client import ReplayClient
from replay.launch import ShardProcess
from replay.schema import Schema
from replay.table import TableConfig

CONFIG = TableConfig(name="replay", schema=Schema.parse("obs:float32:2,action:int64"), capacity=100)


def _rows(first: int, n: int) -> dict[str, np.ndarray]:
    keys = np.arange(first, first + n)
    return {"obs": np.stack([keys, keys], axis=1).astype(np.float32), "action": keys.astype(np.int64)}


def test_killed_shard_restarts_restores_and_the_client_reconnects(tmp_path):
    shards = [ShardProcess([CONFIG], checkpoint_dir=tmp_path / f"s{i}", shard_index=i) for i in range(2)]
    try:
        client = ReplayClient([s.address for s in shards], timeout=30.0)
        writers = {zlib.crc32(f"w{i}".encode()) % 2: f"w{i}" for i in range(20)}
        client.insert(_rows(0, 5), writer_key=writers[0])
        client.insert(_rows(100, 3), writer_key=writers[1])
        paths = client.checkpoint()
        assert [p.rsplit("/", 1)[-1] for p in paths] == ["ckpt-000001", "ckpt-000001"]
        client.insert(_rows(5, 2), writer_key=writers[0])      # after the checkpoint: lost with the crash
        old_pid, port = shards[0].pid, shards[0].port
        shards[0].kill()
        assert not shards[0].alive

        restarter = threading.Timer(1.0, shards[0].restart)
        restarter.start()
        # Issued while shard 0 is down: retried with backoff until the restarted shard answers.
        keys = client.insert(_rows(7, 1), writer_key=writers[0])
        restarter.join()
        assert shards[0].pid != old_pid and shards[0].port == port
        # The restored table continues from its checkpointed insert index, in a new key generation.
        assert keys.tolist() == [(1 << 40) + 5]
        assert [i.size for i in client.info()] == [6, 3]
        batch = client.sample(9)
        assert set((batch.keys >> np.uint64(48)).tolist()) <= {0, 1}
        assert set(batch.columns["action"].tolist()) <= {0, 1, 2, 3, 4, 7, 100, 101, 102}
    finally:
        for s in shards:
            s.stop()


def test_sigterm_writes_a_final_checkpoint_and_restart_restores_it(tmp_path):
    shard = ShardProcess([CONFIG], checkpoint_dir=tmp_path, metrics_port=0)
    try:
        client = ReplayClient([shard.address])
        client.insert(_rows(0, 4), writer_key="w")
        with urllib.request.urlopen(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'evergreen_replay_size{shard="0",table="replay"} 4.0' in text
        assert shard.stop() == 0
        path = latest_checkpoint(tmp_path)
        assert path is not None and path.name == "ckpt-000001"
        meta, _ = read_checkpoint(path)["replay"]
        assert meta["next_key"] == 4
        shard.restart()
        assert [i.size for i in client.info()] == [4]
    finally:
        shard.stop()


def test_schema_mismatch_is_refused_with_a_clear_error(tmp_path):
    shard = ShardProcess([CONFIG], checkpoint_dir=tmp_path)
    ReplayClient([shard.address]).insert(_rows(0, 1), writer_key="w")
    assert shard.stop() == 0
    other = TableConfig(name="replay", schema=Schema.parse("obs:float32:3,action:int64"), capacity=100)
    with pytest.raises(RuntimeError, match=r"(?s)exited \(exit status 1\).*table 'replay': saved state has "
                                           r"schema=.* but this table has schema="):
        ShardProcess([other], checkpoint_dir=tmp_path)


def _serve(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_evergreen_replay_serve_prints_ready_and_stops_on_sigterm(tmp_path):
    spec = "name=replay,capacity=10,schema=obs:float32:2;action:int64"
    token = write_token_file(tmp_path / "replay.token")
    proc = _serve(["-m", "evergreen", "replay", "serve", "--port", "0", "--table", spec,
                   "--token-file", str(tmp_path / "replay.token")])
    try:
        line = proc.stdout.readline()
        assert line.startswith("REPLAY_SERVER_READY port="), line + proc.stderr.read()
        fields = dict(part.split("=") for part in line.split()[1:])
        assert fields["metrics_port"] == "none"
        with pytest.raises(errors.Unauthenticated, match="requires its run's token"):
            ReplayClient([f"127.0.0.1:{fields['port']}"]).insert(_rows(0, 2), writer_key="w")
        client = ReplayClient([f"127.0.0.1:{fields['port']}"], token=token)
        assert client.insert(_rows(0, 2), writer_key="w").tolist() == [0, 1]
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert token not in proc.stdout.read() + proc.stderr.read()   # never printed nor logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "at least one --table is required"),
        (["--table", "name=x,capacity=0,schema=obs:float32"], "bad table spec"),
        (["--table", "name=x,capacity=4,schema=obs:float32"], "--token-file FILE is required"),
        (["--table", "name=x,capacity=4,schema=obs:float32", "--token-file", "/nonexistent/token"],
         "replay token file /nonexistent/token: No such file"),
        (["--table", "name=x,capacity=4,schema=obs:float32", "--insecure-no-auth", "--tls-cert-file", "c.pem"],
         "TLS needs both --tls-cert-file and --tls-key-file"),
    ],
)
def test_bad_command_lines_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "replay.server", "--port", "0", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_shard_that_cannot_bind_reports_its_stderr():
    first = ShardProcess([CONFIG])
    try:
        with pytest.raises(RuntimeError, match=rf"(?s)replay shard 0 \(127.0.0.1:{first.port}\) exited "
                                               r"\(exit status 1\).*cannot bind"):
            ShardProcess([CONFIG], port=first.port)
    finally:
        first.stop()


def test_shard_stops_and_checkpoints_when_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from replay.launch import ShardProcess\n"
         "from replay.table import TableConfig\n"
         "from replay.schema import Schema\n"
         "shard = ShardProcess([TableConfig(name='replay', schema=Schema.parse('obs:float32:2,action:int64'), "
         "capacity=100)], checkpoint_dir=sys.argv[1])\n"
         "print(shard.pid, flush=True)\n"
         "time.sleep(600)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    shard = None
    try:
        shard = psutil.Process(int(launcher.stdout.readline()))
        launcher.kill()   # no chance to stop its shard
        launcher.wait()
        shard.wait(timeout=60)   # psutil.TimeoutExpired if it keeps running (not our child: no exit status)
        assert not shard.is_running()
        assert latest_checkpoint(tmp_path) is not None
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if shard is not None and shard.is_running():
            shard.kill()


def test_a_shard_process_with_a_token_refuses_others_and_keeps_the_token_off_the_command_line(tmp_path):
    from replay.auth import generate_token
    from replay.ray_shard import ShardHost

    token = generate_token()
    host = ShardHost([CONFIG], checkpoint_dir=str(tmp_path), shard_index=0, host="127.0.0.1", token=token,
                     rebase_limiter_on_restore=True, max_blocked_calls=4)
    shard = host._shard
    try:
        cmdline = " ".join(psutil.Process(shard.pid).cmdline())
        assert token not in cmdline and "--token-file" in cmdline and "--max-blocked-calls 4" in cmdline
        assert "--rebase-limiter-on-restore" in cmdline
        assert oct(shard.token_file.stat().st_mode & 0o777) == "0o600"
        assert oct(shard.token_file.parent.stat().st_mode & 0o777) == "0o700"
        address, metrics_port = host.endpoint()
        with pytest.raises(errors.Unauthenticated):
            ReplayClient([address], timeout=5).info()
        client = ReplayClient([address], token=token, timeout=10)
        client.insert(_rows(0, 3), writer_key="w")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert 'evergreen_replay_size{shard="0",table="replay"} 3.0' in r.read().decode()
        shard.restart()                                         # restarts with the same token file
        assert client.info()[0].size == 3 and client.info()[0].generation == 1
        assert token not in shard.stderr_tail()
    finally:
        host.stop()
    private = shard.token_file.parent
    shard._stderr_thread.join(10)    # its reader threads hold the object until the process's pipes close
    del host, shard
    import gc

    gc.collect()
    assert not private.exists()                                  # the private directory goes with the shard


def test_a_shard_without_a_token_says_so_on_the_command_line():
    shard = ShardProcess([CONFIG])
    try:
        assert "--insecure-no-auth" in psutil.Process(shard.pid).cmdline()
        assert ReplayClient([shard.address]).insert(_rows(0, 1), writer_key="w").tolist() == [0]
    finally:
        shard.stop()
