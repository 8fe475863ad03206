"""A real ReplayServer on port 0, driven through the raw gRPC stub: every RPC, and every bad input
mapped to the right status code with a message that names the problem (and stores nothing)."""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replay.codec import decode_array, decode_columns, encode_array, encode_columns
from replay.errors import FailedPrecondition
from replay.keys import key_generation, key_index
from replay.proto import replay_pb2, replay_pb2_grpc
from replay.schema import Schema
from replay.server import SERVICE_NAME, ReplayServer
from replay.table import TableConfig

SCHEMA = Schema.parse("obs:float32:2,action:int64")
UNIFORM = TableConfig(name="uni", schema=SCHEMA, capacity=8)
PRIORITIZED = TableConfig(name="pri", schema=SCHEMA, capacity=8, sampler="prioritized", priority_exponent=1.0)


def _rows(first: int, n: int) -> dict[str, np.ndarray]:
    keys = np.arange(first, first + n)
    return {"obs": np.stack([2 * keys, 2 * keys + 1], axis=1).astype(np.float32), "action": keys.astype(np.int64)}


def _insert_request(table: str, columns, priorities=None, timeout_s=None) -> replay_pb2.InsertRequest:
    request = replay_pb2.InsertRequest(table=table, writer_key="w")
    encode_columns(columns, request.columns)
    if priorities is not None:
        encode_array(np.asarray(priorities), out=request.priorities)
    if timeout_s is not None:
        request.timeout_s = timeout_s
    return request


@pytest.fixture
def server(tmp_path):
    srv = ReplayServer(tables=[UNIFORM, PRIORITIZED], port=0, metrics_port=0, checkpoint_dir=tmp_path / "ckpt",
                       max_message_bytes=1 << 20)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield replay_pb2_grpc.ReplayServiceStub(channel)
    channel.close()


def _info(stub, name):
    return next(t for t in stub.Info(replay_pb2.InfoRequest(), timeout=10).tables if t.name == name)


def test_port_zero_picks_a_free_port(server):
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"
    assert server.metrics_port > 0


def test_insert_then_sample_uniform(stub):
    response = stub.Insert(_insert_request("uni", _rows(0, 3)), timeout=10)
    assert decode_array(response.keys).tolist() == [0, 1, 2]
    assert (response.table_size, response.priority_mass) == (3, 3.0)
    sample = stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=5, timeout_s=5), timeout=10)
    keys = decode_array(sample.keys)
    columns = decode_columns(sample.columns)
    assert keys.dtype == np.uint64 and keys.shape == (5,)
    assert set(keys.tolist()) <= {0, 1, 2}
    k = keys.astype(np.int64)
    np.testing.assert_array_equal(columns["obs"], np.stack([2 * k, 2 * k + 1], axis=1).astype(np.float32))
    np.testing.assert_array_equal(columns["action"], k)
    np.testing.assert_allclose(decode_array(sample.probabilities), np.full(5, 1 / 3))
    assert (sample.table_size, sample.priority_mass) == (3, 3.0)


def test_prioritized_probabilities_and_priority_updates(stub):
    response = stub.Insert(_insert_request("pri", _rows(0, 3), priorities=[1.0, 2.0, 5.0]), timeout=10)
    assert response.priority_mass == 8.0
    sample = stub.Sample(replay_pb2.SampleRequest(table="pri", batch_size=8), timeout=10)
    keys = decode_array(sample.keys).astype(np.int64)
    np.testing.assert_allclose(decode_array(sample.probabilities), np.array([1.0, 2.0, 5.0])[keys] / 8.0)
    update = replay_pb2.UpdatePrioritiesRequest(table="pri")
    encode_array(np.array([0, 2], np.uint64), out=update.keys)
    encode_array(np.array([8.0, 1.0]), out=update.priorities)
    result = stub.UpdatePriorities(update, timeout=10)
    assert (result.updated, result.table_size, result.priority_mass) == (2, 3, 11.0)
    assert _info(stub, "pri").priority_mass == 11.0


def test_info_reports_every_table(stub):
    stub.Insert(_insert_request("uni", _rows(0, 3)), timeout=10)
    stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=4), timeout=10)
    response = stub.Info(replay_pb2.InfoRequest(), timeout=10)
    assert sorted(t.name for t in response.tables) == ["pri", "uni"]
    assert response.max_message_bytes == 1 << 20
    uni = _info(stub, "uni")
    assert (uni.size, uni.capacity, uni.inserts, uni.samples) == (3, 8, 3, 4)
    assert (uni.storage, uni.sampler) == ("ring", "uniform")
    assert uni.nbytes >= 8 * SCHEMA.row_nbytes()
    assert uni.insert_blocked_s == 0.0 and uni.sample_blocked_s == 0.0  # no limiter ever held these calls
    assert TableConfig.from_json(json.loads(uni.config_json)) == UNIFORM
    assert _info(stub, "pri").size == 0


def test_checkpoint_and_restore(server, stub, tmp_path):
    stub.Insert(_insert_request("pri", _rows(0, 3), priorities=[1.0, 2.0, 5.0]), timeout=10)
    stub.Insert(_insert_request("uni", _rows(0, 2)), timeout=10)
    path = stub.Checkpoint(replay_pb2.CheckpointRequest(), timeout=30).path
    assert path == str(tmp_path / "ckpt" / "ckpt-000001")
    server.stop()
    restored = ReplayServer(tables=[UNIFORM, PRIORITIZED], port=0, checkpoint_dir=tmp_path / "ckpt")
    restored.start()
    try:
        assert str(restored.restored_from) == path
        channel = grpc.insecure_channel(restored.address)
        stub2 = replay_pb2_grpc.ReplayServiceStub(channel)
        pri = _info(stub2, "pri")
        assert (pri.size, pri.inserts, pri.priority_mass) == (3, 3, 8.0)
        assert _info(stub2, "uni").size == 2
        assert (pri.generation, restored.generation) == (1, 1)   # the first start was generation 0
        sample = stub2.Sample(replay_pb2.SampleRequest(table="pri", batch_size=6), timeout=10)
        keys = decode_array(sample.keys)
        assert set(key_generation(keys).tolist()) == {1}
        np.testing.assert_array_equal(decode_columns(sample.columns)["action"], key_index(keys))
        # Insert indices continue after the restored ones, in the new generation.
        assert decode_array(stub2.Insert(_insert_request("pri", _rows(3, 1), priorities=[1.0]), timeout=10)
                            .keys).tolist() == [(1 << 40) + 3]
        channel.close()
    finally:
        restored.stop()


def test_restore_with_a_different_schema_is_refused(server, stub, tmp_path):
    stub.Insert(_insert_request("uni", _rows(0, 2)), timeout=10)
    stub.Checkpoint(replay_pb2.CheckpointRequest(), timeout=30)
    other = TableConfig(name="uni", schema=Schema.parse("obs:float32:3,action:int64"), capacity=8)
    with pytest.raises(FailedPrecondition, match=r"checkpoint .*ckpt-000001, table 'uni'"):
        ReplayServer(tables=[other, PRIORITIZED], port=0, checkpoint_dir=tmp_path / "ckpt").start()
    with pytest.raises(FailedPrecondition, match=r"holds tables \['pri', 'uni'\] but this server is configured "
                                                 r"with tables \['uni'\]"):
        ReplayServer(tables=[UNIFORM], port=0, checkpoint_dir=tmp_path / "ckpt").start()


def _expect(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), (fragment, info.value.details())


@pytest.mark.parametrize(
    ("columns", "priorities", "code", "fragments"),
    [
        ({"obs": np.zeros((2, 2), np.float32)}, None, "INVALID_ARGUMENT", ["missing fields ['action']"]),
        ({**_rows(0, 2), "extra": np.zeros(2, np.int64)}, None, "INVALID_ARGUMENT", ["unknown fields ['extra']"]),
        ({"obs": np.zeros((2, 2), np.float64), "action": np.zeros(2, np.int64)}, None, "INVALID_ARGUMENT",
         ["field 'obs': expected dtype float32, got float64"]),
        ({"obs": np.zeros((2, 3), np.float32), "action": np.zeros(2, np.int64)}, None, "INVALID_ARGUMENT",
         ["field 'obs': expected shape (rows, 2), got (2, 3)"]),
        ({"obs": np.zeros((2, 2), np.float32), "action": np.zeros(3, np.int64)}, None, "INVALID_ARGUMENT",
         ["field 'action' has 3 rows but field 'obs' has 2"]),
        ({"obs": np.zeros((0, 2), np.float32), "action": np.zeros(0, np.int64)}, None, "INVALID_ARGUMENT",
         ["empty batch"]),
        (_rows(0, 2), [1.0, float("nan")], "INVALID_ARGUMENT", ["priority[1]", "nan"]),
        (_rows(0, 2), [1.0, -2.0], "INVALID_ARGUMENT", ["priority[1]", "-2.0", "expected a finite value >= 0"]),
        (_rows(0, 2), [1.0], "INVALID_ARGUMENT", ["priorities have shape (1,); expected (2,)"]),
    ],
    ids=["missing-field", "extra-field", "dtype", "shape", "ragged-rows", "empty", "nan-priority",
         "negative-priority", "priority-count"],
)
def test_bad_inserts_are_refused_and_store_nothing(stub, columns, priorities, code, fragments):
    table = "uni" if priorities is None else "pri"
    _expect(lambda: stub.Insert(_insert_request(table, columns, priorities), timeout=10),
            getattr(grpc.StatusCode, code), *fragments)
    info = _info(stub, table)
    assert (info.size, info.inserts) == (0, 0)


def test_malformed_arrays_are_refused(stub):
    request = _insert_request("uni", _rows(0, 2))
    request.columns["obs"].dtype = "floaty"
    _expect(lambda: stub.Insert(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
            "column 'obs'", "'floaty' is not a numeric numpy dtype name")
    request = _insert_request("uni", _rows(0, 2))
    request.columns["obs"].data = request.columns["obs"].data[:-1]
    _expect(lambda: stub.Insert(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
            "column 'obs'", "15 data bytes do not match shape (2, 2) of float32 (expected 16 bytes)")
    assert _info(stub, "uni").size == 0


def test_garbage_insert_bytes_are_invalid_argument(server):
    channel = grpc.insecure_channel(server.address)
    raw = channel.unary_unary("/evergreen.replay.ReplayService/Insert", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    _expect(lambda: raw(b"\x1a\xff\xff\x7f", timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
            "malformed message: field 3 of 2097151 bytes runs past the end")
    channel.close()


def test_unknown_table_is_not_found(stub):
    for call in (
        lambda: stub.Insert(_insert_request("nope", _rows(0, 1)), timeout=10),
        lambda: stub.Sample(replay_pb2.SampleRequest(table="nope", batch_size=1), timeout=10),
        lambda: stub.UpdatePriorities(replay_pb2.UpdatePrioritiesRequest(table="nope"), timeout=10),
    ):
        _expect(call, grpc.StatusCode.NOT_FOUND, "unknown table 'nope'", "['pri', 'uni']")


def test_bad_samples(stub):
    _expect(lambda: stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=1, timeout_s=0), timeout=10),
            grpc.StatusCode.DEADLINE_EXCEEDED, "blocked by the rate limiter", "size=0, min_size_to_sample=1")
    stub.Insert(_insert_request("uni", _rows(0, 3)), timeout=10)
    _expect(lambda: stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=0), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "batch_size 0: expected an int >= 1")
    _expect(lambda: stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=-3), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "batch_size -3: expected an int >= 1")
    _expect(lambda: stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=9), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "batch_size 9 exceeds table 'uni' capacity 8")
    # 1 MiB limit, 12 + 32 bytes per row: 100k rows cannot fit; refused before anything is sampled.
    _expect(lambda: stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=100_000), timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "batch_size=100000", "1048576-byte message limit")
    assert _info(stub, "uni").samples == 0


def test_bad_priority_updates(stub):
    stub.Insert(_insert_request("pri", _rows(0, 2), priorities=[1.0, 1.0]), timeout=10)
    for priorities, fragment in (([float("nan")], "nan"), ([-1.0], "-1.0")):
        update = replay_pb2.UpdatePrioritiesRequest(table="pri")
        encode_array(np.array([0], np.uint64), out=update.keys)
        encode_array(np.array(priorities), out=update.priorities)
        _expect(lambda u=update: stub.UpdatePriorities(u, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                "priority[0]", fragment, "expected a finite value >= 0")
    assert _info(stub, "pri").priority_mass == 2.0


def test_insert_over_the_message_limit_is_resource_exhausted(server):
    # A client whose own limit is higher than the server's 1 MiB: gRPC itself refuses the message.
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)])
    stub = replay_pb2_grpc.ReplayServiceStub(channel)
    rows = 100_000
    big = {"obs": np.zeros((rows, 2), np.float32), "action": np.zeros(rows, np.int64)}
    _expect(lambda: stub.Insert(_insert_request("uni", big), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max")
    assert _info(stub, "uni").size == 0
    channel.close()


def test_checkpoint_without_a_directory_is_failed_precondition():
    srv = ReplayServer(tables=[UNIFORM], port=0)
    srv.start()
    try:
        channel = grpc.insecure_channel(srv.address)
        stub = replay_pb2_grpc.ReplayServiceStub(channel)
        _expect(lambda: stub.Checkpoint(replay_pb2.CheckpointRequest(), timeout=10),
                grpc.StatusCode.FAILED_PRECONDITION, "no checkpoint directory")
        channel.close()
    finally:
        srv.stop()


def test_health_service_reports_serving(server):
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME == "evergreen.replay.ReplayService"
    channel.close()


def test_metrics_endpoint_serves_every_family(server, stub):
    stub.Insert(_insert_request("uni", _rows(0, 3)), timeout=10)
    stub.Sample(replay_pb2.SampleRequest(table="uni", batch_size=4), timeout=10)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    lines = set(text.splitlines())
    assert 'evergreen_replay_size{shard="0",table="uni"} 3.0' in lines
    assert 'evergreen_replay_size{shard="0",table="pri"} 0.0' in lines
    assert 'evergreen_replay_capacity{shard="0",table="uni"} 8.0' in lines
    assert 'evergreen_replay_inserts_total{shard="0",table="uni"} 3.0' in lines
    assert 'evergreen_replay_samples_total{shard="0",table="uni"} 4.0' in lines
    assert 'evergreen_replay_priority_mass{shard="0",table="uni"} 3.0' in lines
    assert any(line.startswith('evergreen_replay_bytes{shard="0",table="uni"} ') for line in lines)
    for side in ("insert", "sample"):
        assert any(line.startswith(f'evergreen_replay_rate_limiter_blocked_seconds_total{{shard="0",side="{side}",'
                                   f'table="uni"}} ') for line in lines), side
    assert 'evergreen_replay_request_duration_seconds_count{method="Insert",shard="0"} 1.0' in lines
    assert 'evergreen_replay_request_duration_seconds_count{method="Sample",shard="0"} 1.0' in lines
    assert 'evergreen_replay_request_duration_seconds_count{method="Checkpoint",shard="0"} 0.0' in lines
