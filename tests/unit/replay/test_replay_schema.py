"""Schema parsing, serialisation and batch validation (exact messages)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from replay.errors import InvalidArgument
from replay.schema import Field, Schema

SPEC = "obs:float32:4,action:int64,reward:float32,next_obs:uint8:4x84x84"


def _batch(n=3):
    return {
        "obs": np.zeros((n, 4), np.float32),
        "action": np.zeros(n, np.int64),
        "reward": np.zeros(n, np.float32),
        "next_obs": np.zeros((n, 4, 84, 84), np.uint8),
    }


def test_parse_fields_and_row_nbytes():
    s = Schema.parse(SPEC)
    assert s.fields == (
        Field("obs", "float32", (4,)),
        Field("action", "int64", ()),
        Field("reward", "float32", ()),
        Field("next_obs", "uint8", (4, 84, 84)),
    )
    assert s.row_nbytes() == 16 + 8 + 4 + 4 * 84 * 84
    assert Schema.parse(SPEC.replace(",", ";")) == s
    assert s.spec() == SPEC


def test_json_round_trip_and_canonical_dtype():
    s = Schema.parse(SPEC)
    assert Schema.from_json(s.to_json()) == s
    assert s.to_json()[3] == {"name": "next_obs", "dtype": "uint8", "shape": [4, 84, 84]}
    assert Field("x", "float").dtype == "float64"
    assert Field("x", "f4", [2]).shape == (2,)


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("", "expected 'name:dtype"),
        ("obs", "expected 'name:dtype'"),
        ("obs:float32:4x", "shape '4x'"),
        ("obs:notatype", "not a numpy dtype"),
        ("obs:object", "not numeric"),
        ("obs:float32:0", "positive integer"),
        ("1obs:float32", "expected an identifier"),
        ("a:int64,a:int32", "duplicate field names ['a']"),
    ],
)
def test_parse_refuses(spec, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        Schema.parse(spec)


def test_validate_ok_returns_rows():
    assert Schema.parse(SPEC).validate_batch(_batch(3)) == 3


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda b: b.pop("reward"), re.escape("batch missing fields ['reward']; expected exactly ['obs',")),
        (lambda b: b.update(extra=np.zeros(3)), re.escape("batch unknown fields ['extra']; expected exactly")),
        (lambda b: b.update(obs=np.zeros((3, 4), np.float64)), "field 'obs': expected dtype float32, got float64"),
        (lambda b: b.update(obs=np.zeros((3, 5), np.float32)), r"field 'obs': expected shape \(rows, 4\), got \(3, 5\)"),
        (lambda b: b.update(action=np.zeros((3, 1), np.int64)), r"field 'action': expected shape \(rows\), got \(3, 1\)"),
        (lambda b: b.update(reward=np.zeros(2, np.float32)), "field 'reward' has 2 rows but field 'obs' has 3"),
        (lambda b: b.update(obs=[[0.0] * 4] * 3), "field 'obs': expected a numpy array, got list"),
        (
            lambda b: b.update(obs=np.zeros((3, 4), ">f4")),
            re.escape("field 'obs': expected dtype float32, got >f4 (non-native byte order)"),
        ),
    ],
)
def test_validate_refuses(mutate, msg):
    b = _batch(3)
    mutate(b)
    with pytest.raises(InvalidArgument, match=msg):
        Schema.parse(SPEC).validate_batch(b)


def test_validate_empty_and_non_mapping():
    with pytest.raises(InvalidArgument, match="empty batch"):
        Schema.parse(SPEC).validate_batch(_batch(0))
    with pytest.raises(InvalidArgument, match="mapping of field name"):
        Schema.parse(SPEC).validate_batch([1, 2])
    assert InvalidArgument.code == "INVALID_ARGUMENT"
