"""Replay shards under failure: restores start a new key generation, a retried insert whose response was
lost is stored once (through a loopback proxy that drops responses), blocked callers never starve the
server and end with their clients, TLS, a rate limiter rebased after a resume, and a shard-level
poisoning scenario (no token: refused; bad values: refused; poisoned rows in a checkpoint: dropped)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import zlib

import grpc
import numpy as np
import pytest

from replay import checkpoint as ckpt
from replay import errors
from replay.auth import ClientTls, ServerTls, generate_token
from replay.client import ReplayClient
from replay.codec import encode_columns
from replay.keys import key_generation, key_index
from replay.proto import replay_pb2, replay_pb2_grpc
from replay.schema import Bounds, Field, Schema
from replay.server import ReplayServer
from replay.table import Table, TableConfig

SCHEMA = Schema((Field("obs", "float32", (2,)), Field("action", "int64", bounds=Bounds.index(2)),
                 Field("reward", "float32", bounds=Bounds())))
CONFIG = TableConfig(name="replay", schema=SCHEMA, capacity=64, sampler="prioritized", priority_exponent=1.0)


def _rows(first: int, n: int, action: int | None = None) -> dict[str, np.ndarray]:
    k = np.arange(first, first + n)
    return {"obs": np.stack([k, -k], axis=1).astype(np.float32),
            "action": (k % 2 if action is None else np.full(n, action)).astype(np.int64),
            "reward": np.ones(n, np.float32)}


def _server(tmp_path=None, **kw) -> ReplayServer:
    kw.setdefault("tables", [CONFIG])
    srv = ReplayServer(port=0, checkpoint_dir=None if tmp_path is None else tmp_path / "ckpt", **kw)
    srv.start()
    return srv


# ------------------------------------------------------------------------------------- generations
def test_keys_issued_after_the_last_checkpoint_never_change_rows_after_a_restore(tmp_path):
    token = generate_token()
    srv = _server(tmp_path, token=token)
    client = ReplayClient([srv.address], token=token, timeout=10)
    client.insert(_rows(0, 4), writer_key="w", priorities=np.ones(4))
    client.checkpoint()
    lost = client.insert(_rows(4, 2), writer_key="w", priorities=np.ones(2))   # lost with the "crash"
    assert key_index(lost).tolist() == [4, 5] and key_generation(lost).tolist() == [0, 0]
    srv.stop()                                      # no final checkpoint: as after SIGKILL

    srv = _server(tmp_path, token=token)
    try:
        client = ReplayClient([srv.address], token=token, timeout=10)
        new = client.insert(_rows(100, 2), writer_key="w", priorities=np.full(2, 3.0))
        assert key_index(new).tolist() == [4, 5]    # the same insert indices are issued again ...
        assert key_generation(new).tolist() == [1, 1]   # ... in a new generation
        mass = client.info()[0].priority_mass
        assert mass == 4 * 1.0 + 2 * 3.0
        # A late priority update for the lost rows must not touch the new rows 4 and 5.
        result = client.update_priorities_result(lost, np.array([1000.0, 1000.0]))
        assert result == {"updated": 0, "stale_generation": 2, "unknown": 0, "unavailable": 0}
        assert client.info()[0].priority_mass == mass
        assert client.update_priorities(new, np.array([5.0, 5.0])) == 2
        assert client.info()[0].priority_mass == 4.0 + 10.0
        info = client.info()[0]
        assert (info.generation, info.stale_generation_updates) == (1, 2)
        assert client.priority_update_counts == {"updated": 2, "stale_generation": 2, "unknown": 0, "unavailable": 0}
    finally:
        srv.stop()


def test_the_client_counts_exactly_the_acknowledged_rows_a_crashed_shard_lost(tmp_path):
    """Each writer's total is in the shard's checkpoints; at a writer's first insert after the restore the
    client compares it with what it was acknowledged: the difference is exactly the rows written since
    the checkpoint, per writer, and no other writer's rows are counted."""
    srv = _server(tmp_path)
    port = int(srv.address.rsplit(":", 1)[1])
    client = ReplayClient([srv.address], timeout=10)
    client.insert(_rows(0, 4), writer_key="w")
    client.insert(_rows(0, 3), writer_key="v")
    client.checkpoint()
    client.insert(_rows(4, 2), writer_key="w")       # acknowledged, then lost
    client.insert(_rows(6, 3), writer_key="w")
    client.insert(_rows(0, 5), writer_key="late")    # a writer the checkpoint never saw
    assert client.lost_rows == 0
    srv.stop()                                        # no final checkpoint: as after SIGKILL
    srv = ReplayServer(port=port, checkpoint_dir=tmp_path / "ckpt", tables=[CONFIG])
    srv.start()
    try:
        assert client.info()[0].size == 7
        client.insert(_rows(9, 1), writer_key="v")
        assert client.lost_rows == 0                  # v lost nothing
        client.insert(_rows(9, 1), writer_key="w")
        assert client.lost_rows == 5
        client.insert(_rows(9, 2), writer_key="late")
        assert client.lost_rows == 10                 # 5 + 5
        client.insert(_rows(11, 2), writer_key="w")
        assert client.lost_rows == 10 and client.info()[0].size == 7 + 1 + 1 + 2 + 2
    finally:
        srv.stop()


def test_a_shard_that_crashes_before_its_first_checkpoint_still_starts_a_new_generation(tmp_path):
    first = _server(tmp_path)
    assert first.generation == 0
    first.stop()
    second = _server(tmp_path)
    try:
        assert second.generation == 1 and (tmp_path / "ckpt" / "GENERATION").read_text() == "1\n"
    finally:
        second.stop()


# ------------------------------------------------------------------------------- dropped responses
class DroppingProxy:
    """A loopback TCP proxy; with ``drop = k`` it cuts the connection instead of forwarding the next k
    response starts (HTTP/2 HEADERS frames on a stream from the server), after the server handled them."""

    def __init__(self, target: str):
        self.target = target.rsplit(":", 1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.drop = 0
        self.dropped = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _cut(self, *socks):
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _pump(self, src, dst, from_server):
        buffer = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not from_server:
                    dst.sendall(data)
                    continue
                buffer += data
                # Forward whole frames (9-byte header: length, type, flags, stream id).
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    frame, buffer = buffer[:9 + length], buffer[9 + length:]
                    kind, stream = frame[3], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    with self._lock:
                        cut = kind == 0x1 and stream != 0 and self.drop > 0
                        if cut:
                            self.drop -= 1
                            self.dropped += 1
                    if cut:
                        self._cut(src, dst)
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        self._cut(src, dst)

    def close(self):
        self.listener.close()


def test_a_retried_insert_whose_response_was_lost_is_stored_once():
    token = generate_token()
    srv = _server(token=token)
    proxy = DroppingProxy(srv.address)
    try:
        client = ReplayClient([proxy.address], token=token, timeout=20)
        client.insert(_rows(0, 2), writer_key="w")           # connects; stored normally
        proxy.drop = 1
        keys = client.insert(_rows(2, 3), writer_key="w")    # applied, response cut, retried on a new connection
        assert proxy.dropped == 1
        info = client.info()[0]
        assert (info.size, info.inserts, info.duplicate_inserts) == (5, 5, 1)
        assert client.duplicate_inserts == 1
        assert key_index(keys).tolist() == [2, 3, 4]        # the keys the rows were first stored under
        batch = client.sample(64)
        assert sorted(set(batch.columns["obs"][:, 0].astype(int).tolist())) == [0, 1, 2, 3, 4]
        # The next insert of the writer is a new sequence number: stored.
        assert key_index(client.insert(_rows(5, 1), writer_key="w")).tolist() == [5]
        assert client.info()[0].inserts == 6
        assert client.lost_rows == 0                          # a repeat is not a loss
    finally:
        proxy.close()
        srv.stop()


def test_repeats_and_in_flight_inserts_over_the_wire():
    srv = _server()
    channel = grpc.insecure_channel(srv.address)
    stub = replay_pb2_grpc.ReplayServiceStub(channel)
    try:
        def insert(seq, first):
            request = replay_pb2.InsertRequest(table="replay", writer_key="w", writer_id="s.0", sequence=seq)
            encode_columns(_rows(first, 2), request.columns)
            return stub.Insert(request, timeout=10)

        assert not insert(1, 0).duplicate
        again = insert(1, 50)                                   # same sequence, other rows: not stored
        assert again.duplicate and np.frombuffer(again.keys.data, np.uint64).tolist() == [0, 1]
        assert insert(2, 2).table_size == 4
        older = insert(1, 60)
        assert older.duplicate and len(older.keys.data) == 0     # older than the last: acknowledged, no keys
        assert srv.tables["replay"].info().inserts == 4
    finally:
        channel.close()
        srv.stop()


# --------------------------------------------------------------------------------- blocked callers
def _waiting_table():
    return TableConfig(name="replay", schema=SCHEMA, capacity=64, min_size_to_sample=32)


def test_a_hundred_blocked_samplers_do_not_starve_info_insert_or_checkpoint(tmp_path):
    srv = _server(tmp_path, tables=[_waiting_table()], max_blocked_calls=64)
    channels = [grpc.insecure_channel(srv.address) for _ in range(4)]
    futures = []
    try:
        for i in range(100):
            stub = replay_pb2_grpc.ReplayServiceStub(channels[i % 4])
            request = replay_pb2.SampleRequest(table="replay", batch_size=4, timeout_s=60)
            futures.append(stub.Sample.future(request, timeout=60))
        deadline = time.monotonic() + 30
        while (srv.blocked_calls < 64 or sum(f.done() for f in futures) < 36) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)   # nothing more finishes: the other 64 wait
        assert srv.blocked_calls == 64
        refused = [f for f in futures if f.done()]
        assert len(refused) == 36            # beyond max_blocked_calls: refused at once, marked retryable
        for f in refused:
            assert f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("evergreen-retry", "1") in tuple(f.trailing_metadata())
            assert "max_blocked_calls=64" in f.details()
        client = ReplayClient([srv.address], timeout=10)
        start = time.monotonic()
        assert client.info()[0].size == 0
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        client.insert(_rows(0, 4), writer_key="w")
        client.checkpoint()
        assert time.monotonic() - start < 5.0
        assert srv.blocked_calls == 64                 # still waiting: 4 < min_size_to_sample
        # The clients give up: the server stops waiting for them at once.
        for f in futures:
            f.cancel()
        deadline = time.monotonic() + 5
        while srv.blocked_calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.blocked_calls == 0
        assert client.info()[0].samples == 0          # none of them sampled
    finally:
        for f in futures:
            f.cancel()
        for c in channels:
            c.close()
        srv.stop()


def test_a_blocked_call_ends_with_its_clients_deadline():
    srv = _server(tables=[_waiting_table()])
    channel = grpc.insecure_channel(srv.address)
    try:
        stub = replay_pb2_grpc.ReplayServiceStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:   # no server-side timeout at all: only the RPC deadline
            stub.Sample(replay_pb2.SampleRequest(table="replay", batch_size=1), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 2
        while srv.blocked_calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.blocked_calls == 0 and time.monotonic() - start < 2.5
    finally:
        channel.close()
        srv.stop()


def test_the_client_retries_a_refusal_for_too_many_blocked_callers():
    # Samples wait on the ratio band (not on the minimum size, which the client itself waits out).
    config = TableConfig(name="replay", schema=SCHEMA, capacity=64, samples_per_insert=1.0, error_buffer=1.0)
    srv = _server(tables=[config], max_blocked_calls=1)
    refused = 'evergreen_replay_request_errors_total{code="RESOURCE_EXHAUSTED",method="Sample",shard="0"}'
    try:
        srv.tables["replay"].insert(_rows(0, 1))          # diff 1, band [0, 2]
        ReplayClient([srv.address], timeout=10).sample(1)  # diff 0: the next sample waits
        clients = [ReplayClient([srv.address], timeout=20) for _ in range(2)]
        out = []
        threads = [threading.Thread(target=lambda c=c: out.append(c.sample(1).keys.size)) for c in clients]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while refused not in srv.metrics.exposition().decode() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.blocked_calls == 1 and refused in srv.metrics.exposition().decode()
        assert out == []                                   # the refused one is retrying, not failed
        srv.tables["replay"].insert(_rows(1, 2))          # diff 2: both samples fit
        for t in threads:
            t.join(20)
        assert out == [1, 1]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------- rebase on resume
def test_rebase_lets_both_sides_proceed_after_a_resume(tmp_path):
    config = TableConfig(name="replay", schema=SCHEMA, capacity=64, min_size_to_sample=4, samples_per_insert=1.0,
                         error_buffer=4.0)
    srv = _server(tmp_path, tables=[config])
    client = ReplayClient([srv.address], timeout=10)
    client.insert(_rows(0, 8), writer_key="w")                # diff 8 = max_diff: inserts are blocked
    with pytest.raises(errors.DeadlineExceeded):
        client.insert(_rows(8, 1), writer_key="w", timeout=0.2)
    srv.stop(checkpoint=True)
    srv = _server(tmp_path, tables=[config], rebase_limiter_on_restore=True)
    try:
        client = ReplayClient([srv.address], timeout=10)
        # The band is re-centred (diff = offset = 4): inserts may run 4 rows ahead again, samples 4 behind.
        assert client.insert(_rows(8, 4), writer_key="w").size == 4
        with pytest.raises(errors.DeadlineExceeded):
            client.insert(_rows(12, 1), writer_key="w", timeout=0.2)
        (text,) = client.rebase_rate_limiter()
        assert "inserts=12, samples=0" in text and "diff=inserts*spi-samples=4" in text
        assert client.sample(4).keys.size == 4                  # diff 4 -> 0 = min_diff
        with pytest.raises(errors.DeadlineExceeded):
            client.sample(1, timeout=0.2)
        info = client.info()[0]
        assert (info.inserts, info.samples) == (12, 4)        # the counters are never rewritten
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------- housekeeping
def test_stale_checkpoint_temporaries_are_removed_at_start_and_metrics_bind_loopback(tmp_path):
    stale = tmp_path / "ckpt" / ".tmp-ckpt-123-deadbeef"
    stale.mkdir(parents=True)
    (stale / "0-0.npy").write_bytes(b"half")
    (tmp_path / "ckpt" / ".tmp-ckpt-LATEST-9-cafe").write_text("x")
    srv = _server(tmp_path, metrics_port=0)
    try:
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["GENERATION"]
        assert srv.metrics.host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------- checkpoint
def test_a_checkpoint_written_while_inserts_overwrite_the_ring_restores_consistent_rows(tmp_path):
    config = TableConfig(name="replay", schema=SCHEMA, capacity=64, sampler="prioritized", priority_exponent=1.0)
    srv = _server(tmp_path, tables=[config])
    table = srv.tables["replay"]
    table.insert(_rows(0, 64), priorities=np.arange(1.0, 65.0))
    snapshot = table.snapshot()
    table.insert(_rows(64, 10), priorities=np.full(10, 100.0))   # overwrites the slots of keys 0..9
    meta, arrays = snapshot.finish()
    assert (snapshot.dropped, meta["oldest_key"], meta["next_key"]) == (10, 10, 64)
    restored = Table(config)
    restored.load_state_dict(meta, {**arrays, **{k: v.copy() for k, v in snapshot.live.items()}})
    # Keys 10..63 with their rows and priorities, nothing of the overwrite, the mass of 11..64.
    assert restored.info().priority_mass == sum(range(11, 65))
    r = restored.sample(64)
    np.testing.assert_array_equal(r.columns["obs"][:, 0], key_index(r.keys).astype(np.float32))
    assert key_index(r.keys).min() >= 10
    srv.stop()


# -------------------------------------------------------------------------------------------- TLS
def _make_cert(directory):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(directory / "key.pem"),
                    "-out", str(directory / "cert.pem")], check=True, capture_output=True, timeout=60)
    return directory / "cert.pem", directory / "key.pem"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_with_a_token(tmp_path):
    cert, key = _make_cert(tmp_path)
    token = generate_token()
    srv = _server(token=token, tls=ServerTls.from_files(cert, key))
    try:
        client = ReplayClient([srv.address], token=token, tls=ClientTls.from_files(cert), timeout=10)
        assert key_index(client.insert(_rows(0, 2), writer_key="w")).tolist() == [0, 1]
        assert client.sample(2).keys.size == 2
        assert "key" not in repr(client.tls) or "PRIVATE" not in repr(client.tls)
        with pytest.raises(errors.ReplayError) as err:       # a plain-text client cannot talk to it
            ReplayClient([srv.address], token=token, timeout=1).info()
        assert err.value.code == "UNAVAILABLE"
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------- poisoning
def test_poisoning_is_refused_and_poisoned_checkpoints_are_cleaned_on_restore(tmp_path):
    token = generate_token()
    srv = _server(tmp_path, token=token)
    try:
        # A process that found the port but not the token can do nothing.
        intruder = ReplayClient([srv.address], timeout=5)
        for call in (lambda: intruder.insert(_rows(0, 64, action=1), writer_key="x"), intruder.info,
                     lambda: intruder.sample(1), intruder.checkpoint):
            with pytest.raises(errors.Unauthenticated):
                call()
        # The run itself (or anyone with the token) cannot store meaningless values either.
        client = ReplayClient([srv.address], token=token, timeout=5)
        with pytest.raises(errors.InvalidArgument, match=r"field 'action' row 0 value 7: expected an integer in "
                                                         r"\[0, 1\]"):
            client.insert(_rows(0, 64, action=7), writer_key="x")
        bad_reward = _rows(0, 3)
        bad_reward["reward"][2] = np.nan
        with pytest.raises(errors.InvalidArgument, match="field 'reward' row 2 value nan: expected a finite number"):
            client.insert(bad_reward, writer_key="x")
        info = client.info()[0]
        assert (info.size, info.inserts, info.refused_inserts) == (0, 0, 2)
        assert 'evergreen_replay_unauthenticated_calls_total{shard="0"} 4.0' in srv.metrics.exposition().decode()
    finally:
        srv.stop()

    # A checkpoint from before the bounds existed holds 64 rows with action 7 among good ones.
    loose = TableConfig(name="replay", schema=Schema.parse("obs:float32:2,action:int64,reward:float32"),
                        capacity=64, sampler="prioritized", priority_exponent=1.0)
    old = Table(loose)
    old.insert(_rows(0, 10), priorities=np.arange(1.0, 11.0))
    old.insert(_rows(10, 20, action=7), priorities=np.full(20, 50.0))
    old.insert(_rows(30, 5), priorities=np.full(5, 2.0))
    poisoned = tmp_path / "poisoned"
    ckpt.write_checkpoint(poisoned, {"replay": old.state_dict()})
    srv = ReplayServer([CONFIG], port=0, checkpoint_dir=poisoned, token=token)
    srv.start()
    try:
        client = ReplayClient([srv.address], token=token, timeout=5)
        info = client.info()[0]
        assert (info.size, info.dropped_invalid_rows) == (15, 20)
        assert info.priority_mass == sum(range(1, 11)) + 5 * 2.0
        batch = client.sample(64)
        assert set(batch.columns["action"].tolist()) <= {0, 1}
        np.testing.assert_array_equal(np.sort(np.unique(batch.columns["obs"][:, 0])),
                                      np.unique(batch.columns["obs"][:, 0]))
        assert set(batch.columns["obs"][:, 0].astype(int).tolist()) <= set(range(10)) | set(range(30, 35))
    finally:
        srv.stop()


def test_writer_keys_route_to_distinct_shards_with_auth():
    token = generate_token()
    servers = [_server(token=token, shard_index=i) for i in range(2)]
    try:
        client = ReplayClient([s.address for s in servers], token=token, timeout=10)
        writers = {zlib.crc32(f"w{i}".encode()) % 2: f"w{i}" for i in range(20)}
        k0 = client.insert(_rows(0, 2), writer_key=writers[0])
        k1 = client.insert(_rows(0, 2), writer_key=writers[1])
        assert (k0 >> np.uint64(48)).tolist() == [0, 0] and (k1 >> np.uint64(48)).tolist() == [1, 1]
        assert client.update_priorities(np.concatenate([k0, k1]), np.full(4, 2.0)) == 4
    finally:
        for s in servers:
            s.stop()
