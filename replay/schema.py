"""Table schemas: named fixed-shape fields; a batch is a dict of arrays with one leading row axis.

Example::

    import numpy as np
    from replay.schema import Field, Schema

    schema = Schema.parse("obs:float32:4,action:int64,reward:float32")
    assert schema.fields[0] == Field("obs", "float32", (4,))
    rows = schema.validate_batch({
        "obs": np.zeros((2, 4), np.float32),
        "action": np.zeros(2, np.int64),
        "reward": np.zeros(2, np.float32),
    })
    assert rows == 2 and schema.row_nbytes() == 16 + 8 + 4
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from replay.errors import InvalidArgument

__all__ = ["Field", "Schema"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Only plain numeric kinds: they have a fixed item size and a byte layout the wire format can carry.
_ALLOWED_KINDS = {"b": "bool", "i": "signed int", "u": "unsigned int", "f": "float", "c": "complex"}


@dataclass(frozen=True)
class Field:
    """One named column: ``dtype`` is a numpy dtype name, ``shape`` the per-row shape (``()`` = scalar).

    The dtype is canonicalised (``"float"`` -> ``"float64"``) so that equal schemas compare equal.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"field name {self.name!r}: expected an identifier like 'obs' or 'next_obs'")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"field {self.name!r}: dtype {self.dtype!r} is not a numpy dtype name") from err
        if dt.kind not in _ALLOWED_KINDS:
            raise ValueError(
                f"field {self.name!r}: dtype {self.dtype!r} is not numeric; expected one of bool, intN, uintN, "
                "floatN, complexN"
            )
        # The name is byte-order free ('>f4' -> 'float32'): storage arrays are native, and batches must be too.
        object.__setattr__(self, "dtype", dt.name)
        try:
            shape = tuple(int(d) for d in self.shape)
        except (TypeError, ValueError) as err:
            raise ValueError(f"field {self.name!r}: shape {self.shape!r} is not a tuple of ints") from err
        if any(d <= 0 for d in shape) or any(int(d) != d for d in self.shape):
            raise ValueError(
                f"field {self.name!r}: shape {self.shape!r} must have positive integer dimensions"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def row_nbytes(self) -> int:
        """Bytes one row of this field occupies."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def spec(self) -> str:
        """The ``name:dtype[:AxBxC]`` form that :meth:`Schema.parse` reads."""
        if not self.shape:
            return f"{self.name}:{self.dtype}"
        return f"{self.name}:{self.dtype}:" + "x".join(str(d) for d in self.shape)


@dataclass(frozen=True)
class Schema:
    """An ordered set of uniquely named fields."""

    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        if not fields:
            raise ValueError("schema has no fields; expected at least one")
        for f in fields:
            if not isinstance(f, Field):
                raise ValueError(f"schema entry {f!r} is not a Field")
        names = [f.name for f in fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema has duplicate field names {dupes}; expected unique names")
        object.__setattr__(self, "fields", fields)

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in schema {self.spec()!r}")

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self.fields)

    def row_nbytes(self) -> int:
        """Bytes of one row summed over all fields."""
        return sum(f.row_nbytes() for f in self.fields)

    # --------------------------------------------------------------- validation
    def validate_batch(self, columns: Mapping[str, np.ndarray]) -> int:
        """Check a batch against the schema and return its row count.

        Raises InvalidArgument naming the field and expected vs got for: missing or extra fields,
        non-array values, wrong dtype (no implicit casts), wrong per-row shape, row counts that differ
        between fields, and an empty batch.
        """
        if not isinstance(columns, Mapping):
            raise InvalidArgument(
                f"batch must be a mapping of field name -> array, got {type(columns).__name__}"
            )
        expected = self.names
        missing = [n for n in expected if n not in columns]
        extra = sorted(str(n) for n in columns if n not in self)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing fields {missing}")
            if extra:
                parts.append(f"unknown fields {extra}")
            raise InvalidArgument(f"batch {' and '.join(parts)}; expected exactly {list(expected)}")
        rows: int | None = None
        first = ""
        for f in self.fields:
            arr = columns[f.name]
            if not isinstance(arr, np.ndarray):
                raise InvalidArgument(f"field {f.name!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype != f.np_dtype:
                got = arr.dtype.name if arr.dtype.name != f.dtype else f"{arr.dtype.str} (non-native byte order)"
                raise InvalidArgument(f"field {f.name!r}: expected dtype {f.dtype}, got {got}")
            if arr.ndim != 1 + len(f.shape) or tuple(arr.shape[1:]) != f.shape:
                want = "(" + ", ".join(["rows", *map(str, f.shape)]) + ")"
                raise InvalidArgument(f"field {f.name!r}: expected shape {want}, got {tuple(arr.shape)}")
            if rows is None:
                rows, first = int(arr.shape[0]), f.name
            elif arr.shape[0] != rows:
                raise InvalidArgument(
                    f"field {f.name!r} has {arr.shape[0]} rows but field {first!r} has {rows}; "
                    "expected the same row count in every field"
                )
        assert rows is not None
        if rows == 0:
            raise InvalidArgument("empty batch: expected at least one row")
        return rows

    # ------------------------------------------------------------ serialisation
    def to_json(self) -> list[dict]:
        return [{"name": f.name, "dtype": f.dtype, "shape": list(f.shape)} for f in self.fields]

    @classmethod
    def from_json(cls, data: Any) -> Schema:
        if not isinstance(data, (list, tuple)):
            raise ValueError(
                f"schema json must be a list of {{name, dtype, shape}} dicts, got {type(data).__name__}"
            )
        fields = []
        for i, d in enumerate(data):
            if not isinstance(d, Mapping) or "name" not in d or "dtype" not in d:
                raise ValueError(
                    f"schema json entry {i} = {d!r}: expected a dict with 'name', 'dtype', 'shape'"
                )
            fields.append(Field(d["name"], d["dtype"], tuple(d.get("shape", ()))))
        return cls(tuple(fields))

    def spec(self) -> str:
        return ",".join(f.spec() for f in self.fields)

    @classmethod
    def parse(cls, spec: str) -> Schema:
        """Parse ``"obs:float32:4,action:int64,next_obs:uint8:4x84x84"`` (``;`` also separates fields)."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"schema spec {spec!r}: expected 'name:dtype[:AxB],...'")
        fields = []
        for part in re.split(r"[,;]", spec):
            part = part.strip()
            if not part:
                continue
            bits = part.split(":")
            if len(bits) not in (2, 3):
                raise ValueError(f"schema field spec {part!r}: expected 'name:dtype' or 'name:dtype:AxBxC'")
            shape: tuple[int, ...] = ()
            if len(bits) == 3 and bits[2].strip():
                try:
                    shape = tuple(int(d) for d in bits[2].lower().split("x"))
                except ValueError as err:
                    raise ValueError(
                        f"schema field spec {part!r}: shape {bits[2]!r} is not like '4' or '4x84x84'"
                    ) from err
            fields.append(Field(bits[0].strip(), bits[1].strip(), shape))
        return cls(tuple(fields))
