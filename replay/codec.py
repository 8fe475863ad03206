"""numpy <-> ``replay.proto`` ``Array`` conversion: raw bytes + dtype name + shape, never repeated numbers.

    >>> import numpy as np
    >>> from replay.codec import encode_array, decode_array
    >>> message = encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> (message.dtype, list(message.shape), len(message.data))
    ('float32', [2, 3], 24)
    >>> decode_array(message, name="obs").tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

Arrays travel little-endian in C order. Decoding is zero-copy: the result is a read-only view of the
message's bytes (callers that need to write copy, which they usually do anyway when they gather several
shards into one batch). Decoding refuses anything that does not describe a dense numeric array, with an
``InvalidArgument`` naming the field, so a malformed request never reaches a table.
"""

from __future__ import annotations

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
