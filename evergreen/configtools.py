"""Generic machinery for frozen dataclass configs: field docs, dict round trips, CLI flags.

Every config class in Evergreen is a frozen dataclass with a docstring under each field::

    @dataclass(frozen=True)
    class ReplayConfig:
        num_shards: int = 1
        \"\"\"Replay shards, each a separate gRPC server process.\"\"\"

From such a tree this module derives: ``field_docs`` (the docstrings, read from the source with
``ast`` because Python drops attribute docstrings at runtime), ``to_dict``/``from_dict`` (strict:
unknown keys are refused with the list of valid ones), and argparse flags named by path
(``--replay.num_shards 2``) whose help text is the field's docstring.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` from the string literal that follows each field in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        # `str | Callable[...]` style unions: the CLI and JSON speak the first (plain) member.
        return args[0], optional
    return tp, False


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config tree (tuples become lists; callables are refused)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif callable(value):
            raise TypeError(f"config field {f.name!r} holds a callable ({value!r}); configs must be plain data")
        else:
            out[f.name] = value
    return out


def coerce(value: Any, tp: Any, *, path: str) -> Any:
    """Convert a JSON/CLI value to the annotated type, or raise ValueError naming ``path``."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{path}: null is not allowed (expected {_type_name(base)})")
    origin = typing.get_origin(base)
    try:
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ValueError(f"{path}: {value!r} is not one of {list(choices)}")
            return value
        if origin is tuple:
            if isinstance(value, str) and value.lstrip().startswith("["):
                value = json.loads(value)  # a JSON list on the command line (e.g. of objects)
            elif isinstance(value, str):
                value = [v for v in value.split(",") if v]
            args = typing.get_args(base)
            item = args[0] if args else str
            return tuple(coerce(v, item, path=f"{path}[{i}]") for i, v in enumerate(value))
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(f"{path}: expected a JSON object, got {value!r}")
            return value
        if base is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"{path}: {value!r} is not a boolean (true/false)")
            if not isinstance(value, bool):
                raise ValueError(f"{path}: expected true/false, got {value!r}")
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{path}: expected an integer, got {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(f"{path}: expected a number, got {value!r}")
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError(f"{path}: expected a string, got {value!r}")
            return value
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {value!r} as {_type_name(base)}: {exc}") from exc
    except ValueError as exc:
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: cannot read {value!r} as {_type_name(base)}") from exc
    return value


def from_dict(cls: type, data: dict[str, Any], *, base: Any = None, path: str = "") -> Any:
    """Build ``cls`` from a (partial) dict on top of ``base`` (default: the class defaults)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected an object, got {data!r}")
    base = base if base is not None else cls()
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid options are {sorted(names)}")
    changes = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        tp = hints[key]
        if _is_config(tp):
            changes[key] = from_dict(tp, value, base=getattr(base, key), path=sub)
        else:
            changes[key] = coerce(value, tp, path=sub)
    return dataclasses.replace(base, **changes)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def add_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """One ``--path.to.field`` flag per leaf field; values are parsed later by :func:`apply_flags`."""
    hints = _hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or "run") if prefix else parser
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            add_flags(parser, tp, prefix=f"{prefix}{f.name}.")
            continue
        base, _ = _strip_optional(tp)
        value = getattr(default, f.name)
        shown = json.dumps(list(value) if isinstance(value, tuple) else value) if not callable(value) else "?"
        group.add_argument(
            f"--{prefix}{f.name}",
            dest=f"{prefix}{f.name}",
            metavar=_type_name(base).upper(),
            default=argparse.SUPPRESS,
            help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"),
        )


def apply_flags(config: Any, namespace: argparse.Namespace, cls: type) -> Any:
    """Apply every ``--a.b`` flag present in ``namespace`` to ``config``."""
    nested: dict[str, Any] = {}
    for dotted, value in vars(namespace).items():
        if "." not in dotted and not hasattr(config, dotted):
            continue
        parts = dotted.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    known = {f.name for f in dataclasses.fields(cls)}
    nested = {k: v for k, v in nested.items() if k in known}
    return from_dict(cls, nested, base=config)
