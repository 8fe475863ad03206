"""The dataclass-config machinery: field docs, strict dict loading, generated CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from evergreen.configtools import add_flags, apply_flags, field_docs, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    """Learning rate."""
    sizes: tuple[int, ...] = (64, 64)
    """Hidden sizes."""
    mode: Literal["a", "b"] = "a"
    """Mode."""


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    """Run name."""
    steps: int = 10
    """Steps."""
    flag: bool = False
    """A flag."""
    limit: float | None = None
    """Optional limit."""
    options: dict = field(default_factory=dict)
    """Free-form options."""
    inner: Inner = field(default_factory=Inner)
    """Nested."""


def test_field_docs_are_read_from_source():
    assert field_docs(Inner) == {"lr": "Learning rate.", "sizes": "Hidden sizes.", "mode": "Mode."}
    assert field_docs(Outer)["limit"] == "Optional limit."


def test_from_dict_round_trip_and_coercion():
    cfg = from_dict(Outer, {"steps": "20", "flag": "true", "inner": {"sizes": [8, 4], "mode": "b"}})
    assert cfg.steps == 20 and cfg.flag is True
    assert cfg.inner == Inner(lr=1e-3, sizes=(8, 4), mode="b")
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 1}, "unknown option(s) ['stepz']"),
        ({"inner": {"lrr": 1}}, "inner: unknown option(s) ['lrr']"),
        ({"steps": 1.5}, "steps: expected an integer, got 1.5"),
        ({"flag": "maybe"}, "flag: 'maybe' is not a boolean"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of ['a', 'b']"),
        ({"name": None}, "name: null is not allowed"),
    ],
)
def test_from_dict_refuses_bad_values_naming_them(data, message):
    with pytest.raises(ValueError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


def test_flags_are_generated_per_leaf_and_applied():
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    args = parser.parse_args(["--steps", "5", "--inner.lr", "0.5", "--inner.sizes", "3,2", "--limit", "2",
                              "--options", '{"redo": {"period": 10}}'])
    cfg = apply_flags(Outer(), args, Outer)
    assert cfg.steps == 5 and cfg.inner.lr == 0.5 and cfg.inner.sizes == (3, 2) and cfg.limit == 2.0
    assert cfg.options == {"redo": {"period": 10}}
    assert "Learning rate." in parser.format_help()
    # flags not given keep the base values
    assert apply_flags(Outer(name="kept"), parser.parse_args([]), Outer).name == "kept"
