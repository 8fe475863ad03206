"""numpy <-> ``replay.proto`` ``Array`` conversion: raw bytes + dtype name + shape, never repeated numbers.

    >>> import numpy as np
    >>> from replay.codec import encode_array, decode_array
    >>> message = encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> (message.dtype, list(message.shape), len(message.data))
    ('float32', [2, 3], 24)
    >>> decode_array(message, name="obs").tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

Large messages (Insert requests, Sample responses) are written by hand in the protobuf wire format
(``encode_insert_request``, ``encode_sample_response``): the array bytes are joined into the message with
one copy, where building the message object and calling ``SerializeToString`` costs two more copies and,
for multi-megabyte map entries, about 100 ms per 14 MB in upb. The result parses into the same message
(tests check field-for-field equality with the generated classes).

Arrays travel little-endian in C order. Decoding is zero-copy: the result is a read-only view of the
message's bytes (callers that need to write copy, which they usually do anyway when they gather several
shards into one batch). Decoding refuses anything that does not describe a dense numeric array, with an
``InvalidArgument`` naming the field, so a malformed request never reaches a table.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

from replay.errors import InvalidArgument
from replay.proto import replay_pb2

# Kinds a replay column may have: bool, signed/unsigned int, float, complex. Object, string, void and
# datetime arrays have no portable raw-bytes form (object arrays would need pickle).
_NUMERIC_KINDS = frozenset("biufc")


def _wire_array(array: np.ndarray, *, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidArgument(
            f"{name}: dtype {array.dtype.name!r} cannot be sent; expected a numeric or bool numpy array"
        )
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)


def encode_array(array: np.ndarray, *, name: str = "array", out: replay_pb2.Array | None = None) -> replay_pb2.Array:
    """Fill ``out`` (or a new ``Array``) with ``array``'s bytes, dtype name and shape; return it."""
    array = _wire_array(array, name=name)
    message = replay_pb2.Array() if out is None else out
    message.data = array.tobytes()
    message.dtype = array.dtype.name
    del message.shape[:]
    message.shape.extend(array.shape)
    return message


def decode_array(message: replay_pb2.Array, *, name: str = "array") -> np.ndarray:
    """The array a message describes (read-only view); ``InvalidArgument`` naming ``name`` if malformed."""
    dtype_name = message.dtype
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        dtype = None
    # Only canonical names ("float32", not "f4" or "<f4") are accepted, so that what the schema says and
    # what the wire says compare as plain strings.
    if dtype is None or dtype.name != dtype_name or dtype.kind not in _NUMERIC_KINDS:
        raise InvalidArgument(
            f"{name}: dtype {dtype_name!r} is not a numeric numpy dtype name; expected e.g. 'float32', 'uint8'"
        )
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: shape {shape} has a negative dimension")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = message.data
    if len(data) != expected:
        raise InvalidArgument(
            f"{name}: {len(data)} data bytes do not match shape {shape} of {dtype_name} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)


def encode_columns(columns: Mapping[str, np.ndarray], target) -> int:
    """Encode named arrays into a proto ``map<string, Array>`` field ``target``; return the payload bytes."""
    total = 0
    for field_name, array in columns.items():
        message = encode_array(array, name=f"column {field_name!r}", out=target[field_name])
        total += len(message.data)
    return total


def decode_columns(source) -> dict[str, np.ndarray]:
    """Decode a proto ``map<string, Array>`` into a dict of read-only arrays (``InvalidArgument`` if malformed)."""
    return {field_name: decode_array(message, name=f"column {field_name!r}") for field_name, message in source.items()}


def payload_nbytes(columns: Mapping[str, np.ndarray]) -> int:
    """Bytes the columns occupy on the wire (what the message-size limit is checked against)."""
    return int(sum(np.asarray(a).nbytes for a in columns.values()))


# -- hand-written wire format for the large messages ---------------------------------------------------
# Wire types: 0 varint, 1 fixed64, 2 length-delimited. Field numbers follow replay.proto.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1   # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _string(field: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return _tag(field, 2) + _varint(len(raw)) + raw if raw else b""


class _Parts:
    """Chunks of a message (bytes and zero-copy memoryviews) and their total length."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list = []
        self.size = 0

    def add(self, chunk) -> None:
        if len(chunk):
            self.chunks.append(chunk)
            self.size += len(chunk)

    def add_message(self, field: int, inner: _Parts) -> None:
        self.add(_tag(field, 2) + _varint(inner.size))
        self.chunks.extend(inner.chunks)
        self.size += inner.size


def _array_parts(array: np.ndarray, *, name: str) -> _Parts:
    array = _wire_array(array, name=name)
    parts = _Parts()
    if array.nbytes:
        parts.add(_tag(1, 2) + _varint(array.nbytes))
        parts.add(memoryview(array.reshape(-1).view(np.uint8)))
    parts.add(_string(2, array.dtype.name))
    if array.ndim:
        packed = b"".join(_varint(d) for d in array.shape)
        parts.add(_tag(3, 2) + _varint(len(packed)) + packed)
    return parts


def _columns_parts(parts: _Parts, field: int, columns: Mapping[str, np.ndarray]) -> None:
    for column, array in columns.items():
        entry = _Parts()
        entry.add(_string(1, column))
        entry.add_message(2, _array_parts(array, name=f"column {column!r}"))
        parts.add_message(field, entry)


def encode_sample_response(*, columns: Mapping[str, np.ndarray], keys: np.ndarray, probabilities: np.ndarray,
                           table_size: int, priority_mass: float) -> bytes:
    """A serialized ``SampleResponse`` with one copy of the column bytes."""
    parts = _Parts()
    _columns_parts(parts, 1, columns)
    parts.add_message(2, _array_parts(np.asarray(keys, dtype=np.uint64), name="keys"))
    parts.add_message(3, _array_parts(np.asarray(probabilities, dtype=np.float64), name="probabilities"))
    if table_size:
        parts.add(_tag(4, 0) + _varint(int(table_size)))
    if priority_mass:
        parts.add(_tag(5, 1) + struct.pack("<d", float(priority_mass)))
    return b"".join(parts.chunks)


class InsertRequestParts:
    """An ``InsertRequest`` encoded once; ``to_bytes(timeout_s)`` adds the timeout (one copy per call).

    The timeout is the last field so that a retry can send the time left without re-encoding the arrays.
    """

    def __init__(self, *, table: str, writer_key: str, columns: Mapping[str, np.ndarray],
                 priorities: np.ndarray | None = None):
        parts = _Parts()
        parts.add(_string(1, table))
        parts.add(_string(2, writer_key))
        _columns_parts(parts, 3, columns)
        if priorities is not None:
            parts.add_message(4, _array_parts(np.asarray(priorities), name="priorities"))
        self._parts = parts

    @property
    def nbytes(self) -> int:
        return self._parts.size

    def to_bytes(self, timeout_s: float | None = None) -> bytes:
        tail = [] if timeout_s is None else [_tag(5, 1) + struct.pack("<d", float(timeout_s))]
        return b"".join(self._parts.chunks + tail)
