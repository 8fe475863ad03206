"""Table schemas: named fixed-shape fields; a batch is a dict of arrays with one leading row axis.

A field may declare :class:`Bounds` on its values (an integer range, finite floats, a float range);
an insert with a value outside them is refused with ``InvalidArgument`` naming the field, the row and
the value, so that a schema-valid but meaningless row (``action = 7`` for a two-action env, a NaN
reward) never reaches the table. Bounds are inclusive on both ends; ``Bounds.index(n)`` is the
``[0, n)`` of a discrete action.

Example::

    import numpy as np
    from replay.schema import Bounds, Field, Schema

    schema = Schema((
        Field("obs", "float32", (4,)),
        Field("action", "int64", bounds=Bounds.index(2)),            # 0 or 1
        Field("reward", "float32", bounds=Bounds()),                 # finite
        Field("discount", "float32", bounds=Bounds(low=0, high=1)),  # finite, in [0, 1]
    ))
    assert schema == Schema.parse("obs:float32:4,action:int64::0..1,reward:float32::finite,"
                                  "discount:float32::0..1")
    rows = schema.validate_batch({
        "obs": np.zeros((2, 4), np.float32),
        "action": np.array([0, 1]),
        "reward": np.zeros(2, np.float32),
        "discount": np.ones(2, np.float32),
    })
    assert rows == 2 and schema.row_nbytes() == 16 + 8 + 4 + 4
    # an action of 7 is refused: "field 'action' row 1 value 7: expected an integer in [0, 1]"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from replay.errors import InvalidArgument
from replay.frames import INDEX_DTYPE, SharedFrames
from replay.limits import MAX_COLUMNS, MAX_NAME_CHARS, MAX_NDIM, clip

__all__ = ["Bounds", "Field", "Schema"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Only plain numeric kinds: they have a fixed item size and a byte layout the wire format can carry.
_ALLOWED_KINDS = {"b": "bool", "i": "signed int", "u": "unsigned int", "f": "float", "c": "complex"}


def _number(value: Any, what: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"bounds {what} {value!r}: expected a number or None")
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"bounds {what} {value!r}: expected a finite number (leave it None for no bound)")
    return value


@dataclass(frozen=True)
class Bounds:
    """Allowed values of a field: ``low <= value <= high`` (either may be None) and, for float
    fields, ``finite`` (the default) refuses NaN and +-inf. NaN never satisfies a range.

    >>> Bounds.index(4)
    Bounds(low=0, high=3, finite=True)
    >>> Bounds.parse("0..1"), Bounds.parse("finite"), Bounds.parse("..0.5").spec()
    (Bounds(low=0, high=1, finite=True), Bounds(low=None, high=None, finite=True), '..0.5')
    """

    low: float | int | None = None
    high: float | int | None = None
    finite: bool = True

    def __post_init__(self) -> None:
        low, high = _number(self.low, "low"), _number(self.high, "high")
        if low is not None and high is not None and low > high:
            raise ValueError(f"bounds low {low!r} > high {high!r}: expected low <= high")
        if not isinstance(self.finite, bool):
            raise ValueError(f"bounds finite {self.finite!r}: expected True or False")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def index(cls, n: int) -> Bounds:
        """An integer in ``[0, n)``: a discrete action of an ``n``-action env."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"Bounds.index({n!r}): expected an int >= 1")
        return cls(low=0, high=int(n) - 1)

    def fits(self, dtype: np.dtype) -> None:
        """ValueError unless these bounds make sense for ``dtype`` (integers need integer bounds)."""
        if dtype.kind not in "iuf":
            raise ValueError(f"bounds on a {dtype.name} field: expected an integer or float field")
        if dtype.kind in "iu":
            for what, v in (("low", self.low), ("high", self.high)):
                if v is not None and not float(v).is_integer():
                    raise ValueError(f"bounds {what} {v!r} on a {dtype.name} field: expected an integer")

    def describe(self, dtype: np.dtype) -> str:
        """What a value must be, e.g. ``an integer in [0, 1]``, ``a finite number >= 0``."""
        kind = "an integer" if dtype.kind in "iu" else ("a finite number" if self.finite else "a number")
        low, high = repr(self.low), repr(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in [{low}, {high}]"
        if self.low is not None:
            return f"{kind} >= {low}"
        if self.high is not None:
            return f"{kind} <= {high}"
        return kind

    def check(self, array: np.ndarray, *, field: str) -> None:
        """InvalidArgument naming ``field``, the first offending row and its value."""
        if array.size == 0:
            return
        kind = array.dtype.kind
        # Fast path: min and max decide it (NaN propagates through both, so it fails every test).
        lo, hi = array.min(), array.max()
        if kind == "f":
            ok = bool(np.isfinite(lo) and np.isfinite(hi)) if self.finite else not bool(np.isnan(lo) or np.isnan(hi))
        else:
            ok = True
        if ok and self.low is not None:
            ok = bool(lo >= self.low)
        if ok and self.high is not None:
            ok = bool(hi <= self.high)
        if ok:
            return
        flat = array.reshape(array.shape[0], -1)
        bad = self._bad(flat)
        row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)
        value = flat[row, col].item()
        where = f" element {col}" if flat.shape[1] > 1 else ""
        raise InvalidArgument(
            f"field {field!r} row {row}{where} value {value!r}: expected {self.describe(array.dtype)}"
        )

    def _bad(self, flat: np.ndarray) -> np.ndarray:
        bad = np.zeros(flat.shape, dtype=bool)
        if flat.dtype.kind == "f":
            bad |= ~np.isfinite(flat) if self.finite else np.isnan(flat)
        if self.low is not None:
            bad |= ~(flat >= self.low)
        if self.high is not None:
            bad |= ~(flat <= self.high)
        return bad

    def invalid_rows(self, array: np.ndarray) -> np.ndarray:
        """bool ``[rows]``: which rows of ``array`` (``[rows, *shape]``) hold a value outside the bounds."""
        if array.size == 0:
            return np.zeros(array.shape[0], dtype=bool)
        return self._bad(array.reshape(array.shape[0], -1)).any(axis=1)

    def spec(self) -> str:
        """The form :meth:`parse` reads: ``finite``, ``LOW..HIGH``, ``LOW..``, ``..HIGH`` (a range of a
        float field is finite too; ``nonfinite:`` prefixes a range that allows +-inf)."""
        if self.low is None and self.high is None:
            return "finite" if self.finite else "any"
        text = ("" if self.low is None else f"{self.low!r}") + ".." + ("" if self.high is None else f"{self.high!r}")
        return text if self.finite else "nonfinite:" + text

    @classmethod
    def parse(cls, text: str) -> Bounds:
        text = text.strip()
        finite = True
        if text.startswith("nonfinite:"):
            finite, text = False, text[len("nonfinite:"):]
        if text == "finite" and finite:
            return cls()
        if text == "any" and finite:
            return cls(finite=False)
        if ".." not in text:
            raise ValueError(f"bounds {clip(text)}: expected 'finite', 'LOW..HIGH', 'LOW..' or '..HIGH'")
        low_text, high_text = text.split("..", 1)

        def num(t: str) -> float | int | None:
            t = t.strip()
            if not t:
                return None
            try:
                return int(t)
            except ValueError:
                try:
                    return float(t)
                except ValueError:
                    raise ValueError(f"bounds {clip(text)}: {clip(t)} is not a number") from None

        return cls(low=num(low_text), high=num(high_text), finite=finite)

    def to_json(self) -> dict:
        return {"low": self.low, "high": self.high, "finite": self.finite}

    @classmethod
    def from_json(cls, data: Any) -> Bounds:
        if not isinstance(data, Mapping) or set(data) - {"low", "high", "finite"}:
            raise ValueError(f"bounds json {clip(data)}: expected a dict with 'low', 'high', 'finite'")
        return cls(low=data.get("low"), high=data.get("high"), finite=data.get("finite", True))


@dataclass(frozen=True)
class Field:
    """One named column: ``dtype`` is a numpy dtype name, ``shape`` the per-row shape (``()`` = scalar),
    ``bounds`` the values it may hold (None: any value of the dtype).

    The dtype is canonicalised (``"float"`` -> ``"float64"``) so that equal schemas compare equal.
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    bounds: Bounds | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_CHARS or not _NAME_RE.match(self.name):
            raise ValueError(
                f"field name {clip(self.name)}: expected an identifier like 'obs' or 'next_obs' of at most "
                f"{MAX_NAME_CHARS} characters"
            )
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
        if len(shape) > MAX_NDIM - 1:
            raise ValueError(f"field {self.name!r}: shape {shape} has more than {MAX_NDIM - 1} dimensions")
        object.__setattr__(self, "shape", shape)
        if self.bounds is not None:
            if not isinstance(self.bounds, Bounds):
                raise ValueError(f"field {self.name!r}: bounds {self.bounds!r} is not a replay.schema.Bounds")
            try:
                self.bounds.fits(dt)
            except ValueError as err:
                raise ValueError(f"field {self.name!r}: {err}") from None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def row_nbytes(self) -> int:
        """Bytes one row of this field occupies."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def spec(self) -> str:
        """The ``name:dtype[:AxBxC][:bounds]`` form that :meth:`Schema.parse` reads."""
        text = f"{self.name}:{self.dtype}"
        if self.shape or self.bounds is not None:
            text += ":" + "x".join(str(d) for d in self.shape)
        if self.bounds is not None:
            text += ":" + self.bounds.spec()
        return text

    def layout(self) -> dict:
        """Name, dtype and shape: what the stored arrays depend on (bounds only decide what is accepted)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _check_shared(column: SharedFrames, f: Field) -> None:
    """A column sent as shared frames: frames ``[U, *shape[1:]]`` of the field's dtype, an int32 index
    ``[rows, shape[0]]`` with every entry in ``[0, U)`` (so that it describes ``[rows, *shape]``)."""
    frames, index = column.frames, column.index
    if not isinstance(frames, np.ndarray) or not isinstance(index, np.ndarray):
        raise InvalidArgument(f"field {f.name!r}: shared frames and index must be numpy arrays")
    if not f.shape:
        raise InvalidArgument(f"field {f.name!r} is a scalar; only a field of shape (stack, ...) can be sent as "
                              "shared frames")
    if frames.dtype != f.np_dtype:
        raise InvalidArgument(f"field {f.name!r}: shared frames have dtype {frames.dtype.name}; expected {f.dtype}")
    if frames.ndim != len(f.shape) or tuple(frames.shape[1:]) != f.shape[1:] or frames.shape[0] < 1:
        want = "(" + ", ".join(["frames >= 1", *map(str, f.shape[1:])]) + ")"
        raise InvalidArgument(f"field {f.name!r}: shared frames have shape {tuple(frames.shape)}; expected {want}")
    if index.dtype != INDEX_DTYPE or index.ndim != 2 or index.shape[1] != f.shape[0]:
        raise InvalidArgument(f"field {f.name!r}: shared-frame index is {index.dtype.name} {tuple(index.shape)}; "
                              f"expected {INDEX_DTYPE.name} (rows, {f.shape[0]})")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= frames.shape[0]):
        bad = np.flatnonzero((index < 0) | (index >= frames.shape[0]))[0]
        row, pos = divmod(int(bad), index.shape[1])
        raise InvalidArgument(f"field {f.name!r} row {row} stack position {pos}: frame index "
                              f"{int(index.reshape(-1)[bad])} is outside the {frames.shape[0]} shared frames")


@dataclass(frozen=True)
class Schema:
    """An ordered set of uniquely named fields."""

    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        if not fields:
            raise ValueError("schema has no fields; expected at least one")
        if len(fields) > MAX_COLUMNS:
            raise ValueError(f"schema has {len(fields)} fields; expected at most {MAX_COLUMNS}")
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
        between fields, an empty batch, and values outside a field's bounds (naming the row and value).
        Names a client sent are echoed cut to a short prefix.
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
                shown = ", ".join(clip(n) for n in extra[:4]) + (f", ... ({len(extra)} in all)" if len(extra) > 4 else "")
                parts.append(f"unknown fields [{shown}]")
            raise InvalidArgument(f"batch {' and '.join(parts)}; expected exactly {list(expected)}")
        rows: int | None = None
        first = ""
        for f in self.fields:
            arr = columns[f.name]
            if isinstance(arr, SharedFrames):
                _check_shared(arr, f)
            elif not isinstance(arr, np.ndarray):
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
        for f in self.fields:
            if f.bounds is not None:
                column = columns[f.name]
                if isinstance(column, SharedFrames):   # every frame sent, referenced or not
                    f.bounds.check(column.frames, field=f"{f.name} (shared frames; row = frame)")
                else:
                    f.bounds.check(column, field=f.name)
        return rows

    def layout(self) -> list[dict]:
        """Each field's name, dtype and shape (what a checkpoint's arrays must match; bounds excluded)."""
        return [f.layout() for f in self.fields]

    # ------------------------------------------------------------ serialisation
    def to_json(self) -> list[dict]:
        out = []
        for f in self.fields:
            entry = f.layout()
            if f.bounds is not None:  # absent rather than null: schemas without bounds keep their old form
                entry["bounds"] = f.bounds.to_json()
            out.append(entry)
        return out

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
            bounds = d.get("bounds")
            fields.append(Field(d["name"], d["dtype"], tuple(d.get("shape", ())),
                                None if bounds is None else Bounds.from_json(bounds)))
        return cls(tuple(fields))

    def spec(self) -> str:
        return ",".join(f.spec() for f in self.fields)

    @classmethod
    def parse(cls, spec: str) -> Schema:
        """Parse ``"obs:float32:4,action:int64::0..1,next_obs:uint8:4x84x84"`` (``;`` also separates fields).

        A field is ``name:dtype``, ``name:dtype:AxBxC`` or ``name:dtype:AxBxC:BOUNDS`` (the shape empty
        for a scalar), with ``BOUNDS`` as in :meth:`Bounds.parse`: ``finite``, ``0..1``, ``0..``, ``..5``.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"schema spec {spec!r}: expected 'name:dtype[:AxB],...'")
        fields = []
        for part in re.split(r"[,;]", spec):
            part = part.strip()
            if not part:
                continue
            bits = part.split(":", 3)
            if len(bits) not in (2, 3, 4):
                raise ValueError(f"schema field spec {part!r}: expected 'name:dtype' or 'name:dtype:AxBxC'")
            shape: tuple[int, ...] = ()
            if len(bits) >= 3 and bits[2].strip():
                try:
                    shape = tuple(int(d) for d in bits[2].lower().split("x"))
                except ValueError as err:
                    raise ValueError(
                        f"schema field spec {part!r}: shape {bits[2]!r} is not like '4' or '4x84x84'"
                    ) from err
            bounds = None
            if len(bits) == 4:
                try:
                    bounds = Bounds.parse(bits[3])
                except ValueError as err:
                    raise ValueError(f"schema field spec {part!r}: {err}") from None
            fields.append(Field(bits[0].strip(), bits[1].strip(), shape, bounds))
        return cls(tuple(fields))
