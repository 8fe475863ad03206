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

Decoding is bounded (``replay.limits``): every string's length, every array's number of dimensions and
each dimension, and the number of columns are checked on the raw bytes before anything is built from
them; a dtype must be one of the canonical names in :data:`DTYPE_NAMES` (checked as a plain string, so a
hostile dtype never reaches numpy's parser); the element count is computed with Python integers, so no
shape can overflow. Messages repeat a client's values only as a short prefix (``replay.limits.clip``).
Any malformed input raises ``InvalidArgument``, never another exception.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping

import numpy as np

from replay.errors import InvalidArgument
from replay.frames import SharedFrames
from replay.limits import (
    MAX_COLUMNS,
    MAX_DIM,
    MAX_DTYPE_CHARS,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_WRITER_KEY_CHARS,
    clip,
)
from replay.proto import replay_pb2

# Kinds a replay column may have: bool, signed/unsigned int, float, complex. Object, string, void and
# datetime arrays have no portable raw-bytes form (object arrays would need pickle).
_NUMERIC_KINDS = frozenset("biufc")
DTYPE_NAMES = frozenset([
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
])
"""The dtype names the wire accepts: numpy's canonical names of the fixed-size numeric dtypes."""
_DTYPES = {name: np.dtype(name) for name in DTYPE_NAMES}


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
    data = message.data
    return _checked_view(message, data, (0, len(data)), name=name)


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


def payload_nbytes(columns: Mapping[str, np.ndarray | SharedFrames]) -> int:
    """Bytes the columns occupy on the wire (what the message-size limit is checked against); shared
    frames count once however many columns refer to them."""
    dense = sum(np.asarray(a).nbytes for a in columns.values() if not isinstance(a, SharedFrames))
    shared = [a for a in columns.values() if isinstance(a, SharedFrames)]
    frames = {id(a.frames): a.frames.nbytes for a in shared}
    return int(dense + sum(a.index.nbytes for a in shared) + sum(frames.values()))


def _split_shared(columns: Mapping[str, np.ndarray | SharedFrames]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray]]:
    """(dense columns, the one frames array, index per shared column) of an insert's columns."""
    dense = {k: v for k, v in columns.items() if not isinstance(v, SharedFrames)}
    shared = {k: v for k, v in columns.items() if isinstance(v, SharedFrames)}
    if not shared:
        return dense, None, {}
    frames = next(iter(shared.values())).frames
    if any(v.frames is not frames for v in shared.values()):
        raise ValueError(f"columns {sorted(shared)} refer to different frames arrays; an insert carries one "
                         "(build them with replay.frames.share_frames)")
    return dense, frames, {k: v.index for k, v in shared.items()}


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
                 priorities: np.ndarray | None = None, writer_id: str = "", sequence: int = 0):
        parts = _Parts()
        parts.add(_string(1, table))
        parts.add(_string(2, writer_key))
        dense, frames, frame_index = _split_shared(columns)
        _columns_parts(parts, 3, dense)
        if frames is not None:
            parts.add_message(8, _array_parts(frames, name="frames"))
            _columns_parts(parts, 9, frame_index)
        if priorities is not None:
            parts.add_message(4, _array_parts(np.asarray(priorities), name="priorities"))
        parts.add(_string(6, writer_id))
        if sequence:
            parts.add(_tag(7, 0) + _varint(int(sequence)))
        self._parts = parts

    @property
    def nbytes(self) -> int:
        return self._parts.size

    def to_bytes(self, timeout_s: float | None = None) -> bytes:
        tail = [] if timeout_s is None else [_tag(5, 1) + struct.pack("<d", float(timeout_s))]
        return b"".join(self._parts.chunks + tail)


# -- zero-copy parsing of the large messages -----------------------------------------------------------
# The inverse of the encoders above: arrays come back as read-only numpy views into the received bytes
# (upb's parse + ``.data`` would copy every array twice). Any valid serialization of the message parses,
# whatever the field order, and unknown fields are skipped, as protobuf parsers do.


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise InvalidArgument("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """Yield (field number, wire type, value, value end); length-delimited values are (start, end) spans."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire_type == 1:
            if pos + 8 > end:
                raise InvalidArgument("malformed message: truncated fixed64 field")
            value, pos = (pos, pos + 8), pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise InvalidArgument(f"malformed message: field {field} of {length} bytes runs past the end")
            value, pos = (pos, pos + length), pos + length
        elif wire_type == 5:
            if pos + 4 > end:
                raise InvalidArgument("malformed message: truncated fixed32 field")
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise InvalidArgument(f"malformed message: unsupported wire type {wire_type} for field {field}")
        yield field, wire_type, value


def _text(buf, span: tuple[int, int], *, limit: int, what: str) -> str:
    """The UTF-8 string at ``span``, refused (before it is copied) if longer than ``limit`` bytes."""
    length = span[1] - span[0]
    if length > limit:
        raise InvalidArgument(f"{what} of {length} bytes (starting {clip(bytes(buf[span[0]:span[0] + 16]), 16)}); "
                              f"expected at most {limit}")
    raw = bytes(buf[span[0]:span[1]])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} {clip(raw)} is not valid UTF-8") from None


def _double(buf, span: tuple[int, int]) -> float:
    return struct.unpack_from("<d", buf, span[0])[0]


def _add_dim(shape: list[int], value: int, *, name: str) -> None:
    if len(shape) >= MAX_NDIM:
        raise InvalidArgument(f"{name}: more than {MAX_NDIM} dimensions; expected at most {MAX_NDIM}")
    shape.append(value - (1 << 64) if value >> 63 else value)


def _array_view(data: bytes, buf, span: tuple[int, int], *, name: str) -> np.ndarray:
    data_span, dtype_name, shape = (0, 0), "", []
    for field, wire_type, value in _fields(buf, *span):
        if field == 1 and wire_type == 2:
            data_span = value
        elif field == 2 and wire_type == 2:
            dtype_name = _text(buf, value, limit=MAX_DTYPE_CHARS, what=f"{name}: dtype")
        elif field == 3 and wire_type == 2:      # packed
            pos, end = value
            while pos < end:
                d, pos = _read_varint(buf, pos, end)
                _add_dim(shape, d, name=name)
        elif field == 3 and wire_type == 0:      # unpacked (also valid protobuf)
            _add_dim(shape, value, name=name)
    message = _ArrayFields(dtype_name, shape)
    return _checked_view(message, data, data_span, name=name)


class _ArrayFields:
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: str, shape: list[int]):
        self.dtype = dtype
        self.shape = shape


def _checked_view(message, data: bytes, span: tuple[int, int], *, name: str) -> np.ndarray:
    """A view of ``data[span]`` as ``message.dtype``/``message.shape``, after checking that they fit."""
    # Only canonical names ("float32", not "f4" or "<f4") are accepted, so that what the schema says and
    # what the wire says compare as plain strings; and only from a fixed set, so numpy never parses them.
    dtype = _DTYPES.get(message.dtype) if isinstance(message.dtype, str) else None
    if dtype is None:
        raise InvalidArgument(
            f"{name}: dtype {clip(message.dtype)} is not a numeric numpy dtype name; expected e.g. 'float32', 'uint8'"
        )
    if len(message.shape) > MAX_NDIM:
        raise InvalidArgument(f"{name}: {len(message.shape)} dimensions; expected at most {MAX_NDIM}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: shape {shape} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise InvalidArgument(f"{name}: shape {shape} has a dimension above {MAX_DIM}")
    count = 1
    for d in shape:     # Python ints: no shape can overflow the product
        count *= d
    expected = count * dtype.itemsize
    length = span[1] - span[0]
    if length != expected:
        raise InvalidArgument(
            f"{name}: {length} data bytes do not match shape {shape} of {message.dtype} (expected {expected} bytes)"
        )
    count = expected // dtype.itemsize if dtype.itemsize else 0
    wire_dtype = dtype if sys.byteorder == "little" else dtype.newbyteorder("<")
    return np.frombuffer(data, dtype=wire_dtype, count=count, offset=span[0]).reshape(shape)


def _columns_entry(data: bytes, buf, span: tuple[int, int]) -> tuple[str, np.ndarray]:
    key, value_span = "", None
    for field, wire_type, value in _fields(buf, *span):
        if field == 1 and wire_type == 2:
            key = _text(buf, value, limit=MAX_NAME_CHARS, what="column name")
        elif field == 2 and wire_type == 2:
            value_span = value
    if value_span is None:
        value_span = (span[1], span[1])    # an entry without a value is an empty Array
    return key, _array_view(data, buf, value_span, name=f"column {clip(key)}")


def _add_column(columns: dict[str, np.ndarray], entry: tuple[str, np.ndarray]) -> None:
    name, array = entry
    if name in columns:
        raise InvalidArgument(f"column {clip(name)} appears twice; expected each column once")
    if len(columns) >= MAX_COLUMNS:
        raise InvalidArgument(f"more than {MAX_COLUMNS} columns; expected at most {MAX_COLUMNS}")
    columns[name] = array


class InsertRequestView:
    """A parsed ``InsertRequest`` whose arrays are read-only views into the request bytes."""

    __slots__ = ("table", "writer_key", "columns", "priorities", "timeout_s", "writer_id", "sequence")

    def __init__(self, data: bytes):
        buf = memoryview(data)
        self.table = ""
        self.writer_key = ""
        self.columns: dict[str, np.ndarray] = {}
        self.priorities: np.ndarray | None = None
        self.timeout_s: float | None = None
        self.writer_id = ""
        self.sequence = 0
        frames: np.ndarray | None = None
        frame_index: dict[str, np.ndarray] = {}
        for field, wire_type, value in _fields(buf, 0, len(buf)):
            if field == 1 and wire_type == 2:
                self.table = _text(buf, value, limit=MAX_NAME_CHARS, what="table name")
            elif field == 2 and wire_type == 2:
                self.writer_key = _text(buf, value, limit=MAX_WRITER_KEY_CHARS, what="writer key")
            elif field == 3 and wire_type == 2:
                _add_column(self.columns, _columns_entry(data, buf, value))
            elif field == 4 and wire_type == 2:
                self.priorities = _array_view(data, buf, value, name="priorities")
            elif field == 5 and wire_type == 1:
                self.timeout_s = _double(buf, value)
            elif field == 6 and wire_type == 2:
                self.writer_id = _text(buf, value, limit=MAX_WRITER_KEY_CHARS, what="writer id")
            elif field == 7 and wire_type == 0:
                self.sequence = value
            elif field == 8 and wire_type == 2:
                if frames is not None:
                    raise InvalidArgument("frames appear twice; expected at most one frames array per insert")
                frames = _array_view(data, buf, value, name="frames")
            elif field == 9 and wire_type == 2:
                _add_column(frame_index, _columns_entry(data, buf, value))
        if frame_index or frames is not None:
            self._add_shared(frames, frame_index)

    def _add_shared(self, frames: np.ndarray | None, frame_index: dict[str, np.ndarray]) -> None:
        """The shared-frame columns, each ``SharedFrames(frames, index)`` (checked against the schema later)."""
        if frames is None:
            raise InvalidArgument(f"columns {', '.join(clip(k) for k in sorted(frame_index))} are sent as frame indices "
                                  "but the insert carries no frames")
        if not frame_index:
            raise InvalidArgument("the insert carries frames but no column refers to them; expected frame_index "
                                  "entries or no frames")
        for name, index in frame_index.items():
            if name in self.columns:
                raise InvalidArgument(f"column {clip(name)} is sent both dense and as frame indices; expected one")
            _add_column(self.columns, (name, SharedFrames(frames, index)))


class UpdatePrioritiesRequestView:
    """A parsed ``UpdatePrioritiesRequest`` (bounded like :class:`InsertRequestView`)."""

    __slots__ = ("table", "keys", "priorities")

    def __init__(self, data: bytes):
        buf = memoryview(data)
        self.table = ""
        self.keys = np.zeros(0, np.uint64)
        self.priorities = np.zeros(0, np.float64)
        for field, wire_type, value in _fields(buf, 0, len(buf)):
            if field == 1 and wire_type == 2:
                self.table = _text(buf, value, limit=MAX_NAME_CHARS, what="table name")
            elif field == 2 and wire_type == 2:
                self.keys = _array_view(data, buf, value, name="keys")
            elif field == 3 and wire_type == 2:
                self.priorities = _array_view(data, buf, value, name="priorities")


class SampleResponseView:
    """A parsed ``SampleResponse`` whose arrays are read-only views into the response bytes."""

    __slots__ = ("columns", "keys", "probabilities", "table_size", "priority_mass")

    def __init__(self, data: bytes):
        buf = memoryview(data)
        self.columns: dict[str, np.ndarray] = {}
        self.keys = np.zeros(0, np.uint64)
        self.probabilities = np.zeros(0, np.float64)
        self.table_size = 0
        self.priority_mass = 0.0
        for field, wire_type, value in _fields(buf, 0, len(buf)):
            if field == 1 and wire_type == 2:
                _add_column(self.columns, _columns_entry(data, buf, value))
            elif field == 2 and wire_type == 2:
                self.keys = _array_view(data, buf, value, name="keys")
            elif field == 3 and wire_type == 2:
                self.probabilities = _array_view(data, buf, value, name="probabilities")
            elif field == 4 and wire_type == 0:
                self.table_size = value - (1 << 64) if value >> 63 else value
            elif field == 5 and wire_type == 1:
                self.priority_mass = _double(buf, value)
