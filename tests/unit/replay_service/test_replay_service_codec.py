"""numpy <-> proto Array codec: exact round trips and every malformed message refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from replay.codec import (
    InsertRequestParts,
    InsertRequestView,
    SampleResponseView,
    decode_array,
    decode_columns,
    encode_array,
    encode_columns,
    encode_sample_response,
    payload_nbytes,
)
from replay.errors import InvalidArgument
from replay.proto import replay_pb2


@pytest.mark.parametrize("dtype", ["uint8", "int64", "uint64", "float32", "float64", "bool", "int16"])
def test_round_trip_is_exact(dtype):
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    message = encode_array(array)
    assert message.dtype == dtype
    assert list(message.shape) == [2, 3, 4]
    assert len(message.data) == 24 * np.dtype(dtype).itemsize
    decoded = decode_array(message)
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)


def test_wire_bytes_are_little_endian_c_order():
    message = encode_array(np.array([[1, 2], [3, 4]], dtype=np.uint16).T)  # non-contiguous input
    assert message.data == bytes([1, 0, 3, 0, 2, 0, 4, 0])
    big = np.array([1, 258], dtype=">u2")
    message = encode_array(big)
    assert message.dtype == "uint16"
    assert message.data == bytes([1, 0, 2, 1])
    assert decode_array(message).tolist() == [1, 258]


def test_scalar_and_empty_arrays():
    assert decode_array(encode_array(np.float32(2.5))).tolist() == 2.5
    empty = decode_array(encode_array(np.zeros((0, 4), np.float32)))
    assert empty.shape == (0, 4)


def test_decoded_array_is_a_read_only_view():
    decoded = decode_array(encode_array(np.arange(3, dtype=np.int64)))
    assert not decoded.flags.writeable


@pytest.mark.parametrize("dtype", ["floaty", "f4", "<f4", "object", "str", "", "datetime64"])
def test_bad_dtype_names_are_refused(dtype):
    message = replay_pb2.Array(data=b"\0" * 8, dtype=dtype, shape=[2])
    with pytest.raises(InvalidArgument, match=r"column 'obs': dtype .* is not a numeric numpy dtype name"):
        decode_array(message, name="column 'obs'")


def test_data_length_must_match_shape():
    message = replay_pb2.Array(data=b"\0" * 12, dtype="float32", shape=[2, 2])
    with pytest.raises(InvalidArgument, match=r"obs: 12 data bytes do not match shape \(2, 2\) of float32 "
                                              r"\(expected 16 bytes\)"):
        decode_array(message, name="obs")


def test_negative_dimension_is_refused():
    message = replay_pb2.Array(data=b"", dtype="float32", shape=[-1, 0])
    with pytest.raises(InvalidArgument, match=r"shape \(-1, 0\) has a negative dimension"):
        decode_array(message, name="obs")


def test_non_numeric_arrays_cannot_be_encoded():
    with pytest.raises(InvalidArgument, match="dtype 'object' cannot be sent"):
        encode_array(np.array([object()]), name="obs")
    with pytest.raises(InvalidArgument, match="dtype 'str96' cannot be sent"):
        encode_array(np.array(["abc"]), name="obs")


def test_columns_round_trip_through_a_map_field():
    request = replay_pb2.InsertRequest()
    columns = {"obs": np.ones((3, 4), np.float32), "action": np.array([0, 1, 2], np.int64)}
    assert encode_columns(columns, request.columns) == 48 + 24 == payload_nbytes(columns)
    parsed = replay_pb2.InsertRequest.FromString(request.SerializeToString())
    decoded = decode_columns(parsed.columns)
    assert sorted(decoded) == ["action", "obs"]
    np.testing.assert_array_equal(decoded["obs"], columns["obs"])
    np.testing.assert_array_equal(decoded["action"], columns["action"])


def _reference_sample_response(columns, keys, probabilities, table_size, priority_mass):
    message = replay_pb2.SampleResponse(table_size=table_size, priority_mass=priority_mass)
    encode_columns(columns, message.columns)
    encode_array(keys, out=message.keys)
    encode_array(probabilities, out=message.probabilities)
    return message


@pytest.mark.parametrize(("table_size", "priority_mass"), [(300, 2.5), (0, 0.0), (1 << 40, -1.0)])
def test_hand_written_sample_response_parses_to_the_same_message(table_size, priority_mass):
    columns = {"obs": np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5), "action": np.array([7, -1]),
               "flag": np.array([True, False]), "empty": np.zeros((2, 0), np.float32)}
    keys = np.array([3, 1 << 50], np.uint64)
    probabilities = np.array([0.25, 0.75])
    wire = encode_sample_response(columns=columns, keys=keys, probabilities=probabilities, table_size=table_size,
                                  priority_mass=priority_mass)
    parsed = replay_pb2.SampleResponse.FromString(wire)
    assert parsed == _reference_sample_response(columns, keys, probabilities, table_size, priority_mass)
    np.testing.assert_array_equal(decode_array(parsed.columns["obs"]), columns["obs"])
    assert decode_array(parsed.keys).tolist() == [3, 1 << 50]


@pytest.mark.parametrize("timeout_s", [None, 0.0, 2.5])
def test_hand_written_insert_request_parses_to_the_same_message(timeout_s):
    columns = {"obs": np.ones((2, 4), np.float32), "action": np.array([1, 2], np.int64)}
    parts = InsertRequestParts(table="replay", writer_key="actor-é", columns=columns, priorities=np.array([1.0, 0.5]))
    parsed = replay_pb2.InsertRequest.FromString(parts.to_bytes(timeout_s))
    reference = replay_pb2.InsertRequest(table="replay", writer_key="actor-é")
    encode_columns(columns, reference.columns)
    encode_array(np.array([1.0, 0.5]), out=reference.priorities)
    if timeout_s is not None:
        reference.timeout_s = timeout_s
    assert parsed == reference
    assert parsed.HasField("timeout_s") == (timeout_s is not None)
    assert parts.nbytes == len(parts.to_bytes(None))


def test_hand_written_encoders_refuse_non_numeric_columns():
    with pytest.raises(InvalidArgument, match="column 'obs': dtype 'object' cannot be sent"):
        InsertRequestParts(table="t", writer_key="w", columns={"obs": np.array([object()])})


def test_views_parse_what_the_generated_classes_serialize():
    columns = {"obs": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "action": np.array([-1, 5])}
    request = replay_pb2.InsertRequest(table="t", writer_key="w", timeout_s=0.0)
    encode_columns(columns, request.columns)
    encode_array(np.array([0.5, 2.0]), out=request.priorities)
    view = InsertRequestView(request.SerializeToString())
    assert (view.table, view.writer_key, view.timeout_s) == ("t", "w", 0.0)
    assert sorted(view.columns) == ["action", "obs"]
    np.testing.assert_array_equal(view.columns["obs"], columns["obs"])
    assert view.columns["action"].dtype == np.int64 and view.columns["action"].tolist() == [-1, 5]
    assert view.priorities.tolist() == [0.5, 2.0]
    assert InsertRequestView(replay_pb2.InsertRequest(table="t").SerializeToString()).timeout_s is None

    response = _reference_sample_response(columns, np.array([1, 2], np.uint64), np.array([0.5, 0.5]), 7, 1.5)
    view = SampleResponseView(response.SerializeToString())
    assert (view.table_size, view.priority_mass) == (7, 1.5)
    assert view.keys.tolist() == [1, 2] and view.keys.dtype == np.uint64
    np.testing.assert_array_equal(view.columns["obs"], columns["obs"])
    assert not view.columns["obs"].flags.writeable


def test_views_refuse_malformed_bytes():
    wire = InsertRequestParts(table="t", writer_key="w", columns={"obs": np.ones((2, 2), np.float32)}).to_bytes()
    with pytest.raises(InvalidArgument, match="malformed message"):
        InsertRequestView(wire[:-3])
    with pytest.raises(InvalidArgument, match="malformed message"):
        InsertRequestView(b"\xff\xff\xff")
    request = replay_pb2.InsertRequest(table="t")
    request.columns["obs"].dtype = "float32"
    request.columns["obs"].shape.extend([2])
    request.columns["obs"].data = b"\0" * 7
    with pytest.raises(InvalidArgument, match=r"column 'obs': 7 data bytes do not match shape \(2,\) of float32"):
        InsertRequestView(request.SerializeToString())
