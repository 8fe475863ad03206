"""Plasticity interventions, one module per family; :func:`build_interventions` selects them by name.

Example::

    ivs = build_interventions("layer_norm,weight_decay,redo", {"redo": {"period": 1000, "tau": 0.025}})
    overrides = network_overrides(ivs)      # {"norm": "layer_norm"}
    print(format_help())                    # every name, its summary and its options with defaults

    # What an algorithm uses: one instance per (intervention, target network), default every network.
    bound = bind_interventions("redo,reset", {"reset": {"networks": ["critic"]}}, networks=("actor", "critic"))
    bound.names                             # ['redo', 'redo', 'reset']

Options are the keyword-only constructor arguments of each class, typed by their annotations;
unknown names, unknown options and ill-typed values are refused with the valid choices listed.
Integers are accepted for float options; nothing else is converted (no string parsing).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from plasticity.base import Intervention, InterventionSet, network_overrides
from plasticity.interventions.activation_swaps import (
    CReLUActivation,
    FourierActivation,
    RationalActivationSwap,
)
from plasticity.interventions.architecture import SoftMoEIntervention
from plasticity.interventions.auxiliary import InFeR
from plasticity.interventions.injection import PlasticityInjection
from plasticity.interventions.normalization import ELRIncrease, LayerNormIntervention, NormalizeAndProject
from plasticity.interventions.regularization import L2, L2Init, Parseval, WeightClipping, WeightDecay
from plasticity.interventions.resets import Reset, ShrinkPerturb, SoftReset
from plasticity.interventions.units import ContinualBackprop, ReDo
from plasticity.interventions.weight_averaging import HareTortoise

#: name -> class, for every intervention ``build_interventions`` knows.
INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls
    for cls in (
        LayerNormIntervention,
        WeightDecay,
        L2,
        L2Init,
        NormalizeAndProject,
        HareTortoise,
        PlasticityInjection,
        InFeR,
        WeightClipping,
        ShrinkPerturb,
        ReDo,
        Reset,
        ContinualBackprop,
        CReLUActivation,
        FourierActivation,
        Parseval,
        SoftReset,
        RationalActivationSwap,
        ELRIncrease,
        SoftMoEIntervention,
    )
}


def _options(cls: type[Intervention]) -> dict[str, tuple[Any, Any]]:
    """option -> (type annotation, default) for the keyword-only constructor arguments of ``cls``."""
    hints = get_type_hints(cls.__init__)
    out = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            out[name] = (hints.get(name, Any), param.default)
    return out


def _type_name(hint) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _coerce(hint, value) -> tuple[bool, Any]:
    """(ok, value converted to the annotated type)."""
    origin = get_origin(hint)
    if hint is Any:
        return True, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint)), value
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            ok, converted = _coerce(option, value)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, Sequence, typing.Sequence) or hint is tuple:
        if isinstance(value, (list, tuple)) and not isinstance(value, str):
            args = [a for a in get_args(hint) if a is not Ellipsis]
            if not args:
                return True, tuple(value)
            converted = []
            for item in value:
                ok, item = _coerce(args[0], item)
                if not ok:
                    return False, value
                converted.append(item)
            return True, tuple(converted)
        return False, value
    return isinstance(value, hint), value


def _parse_spec(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        names = [part.strip() for part in spec.split(",")]
        names = [name for name in names if name]
        if names == ["none"]:
            return []
    elif isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        names = [n.strip() for n in spec]
    else:
        raise ValueError(f"intervention spec must be a comma-separated string or a list of names, got {spec!r}")
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        raise ValueError(f"unknown intervention(s) {unknown}; valid names: {', '.join(INTERVENTIONS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"intervention(s) {duplicates} listed more than once in {spec!r}")
    return names


def build_interventions(
    spec: str | Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Intervention]:
    """Instantiate the interventions named in ``spec`` (in that order) with per-name ``options``.

    ``spec``: ``"layer_norm,weight_decay,redo"`` or a list of names; ``""``/``"none"``/``[]`` = none.
    ``options``: ``{"redo": {"period": 1000, "tau": 0.025}}``; names must be selected in ``spec``.
    """
    names = _parse_spec(spec)
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for {stray}, which are not selected in {spec!r} (selected: {names})")
    built = []
    for name in names:
        cls = INTERVENTIONS[name]
        given = options.get(name) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"options for {name!r} must be a mapping of option -> value, got {given!r}")
        valid = _options(cls)
        kwargs = {}
        for key, value in given.items():
            if key not in valid:
                listing = ", ".join(f"{k}: {_type_name(h)} = {d!r}" for k, (h, d) in valid.items()) or "none"
                raise ValueError(f"{name}: unknown option {key!r}; valid options: {listing}")
            hint = valid[key][0]
            ok, converted = _coerce(hint, value)
            if not ok:
                raise ValueError(f"{name}: option {key!r} must be {_type_name(hint)}, got {value!r}")
            kwargs[key] = converted
        built.append(cls(**kwargs))
    network_overrides(built)  # refuse conflicting build-time overrides now, before anything is built
    return built


#: The option every intervention takes besides its own: which of the algorithm's networks it acts on.
NETWORKS_OPTION = "networks"


def bind_interventions(
    spec: str | Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    networks: Sequence[str],
) -> InterventionSet:
    """Build ``spec``'s interventions once per target network and bind them (see :class:`InterventionSet`).

    ``networks`` are the algorithm's plastic networks (those with hidden layers), e.g. ``("q",)``.
    An intervention's ``networks`` option (a list of those names) narrows its targets; by default
    it acts on all of them. Hooks run in ``spec`` order, and within one intervention in ``networks``
    order.
    """
    networks = tuple(networks)
    if not networks or not all(isinstance(n, str) and n for n in networks):
        raise ValueError(f"networks must be a non-empty list of network names, got {networks!r}")
    options = {name: dict(opts) if isinstance(opts, Mapping) else opts for name, opts in (options or {}).items()}
    targets: dict[str, tuple[str, ...]] = {}
    for name, opts in options.items():
        if not isinstance(opts, dict) or NETWORKS_OPTION not in opts:
            continue
        chosen = opts.pop(NETWORKS_OPTION)
        if isinstance(chosen, str):
            chosen = [chosen]
        if not isinstance(chosen, (list, tuple)) or not chosen or not all(isinstance(c, str) for c in chosen):
            raise ValueError(f"{name}: option 'networks' must be a non-empty list of network names, got {chosen!r}")
        unknown = [c for c in chosen if c not in networks]
        if unknown:
            raise ValueError(f"{name}: option 'networks' names {unknown}; this algorithm's networks are {list(networks)}")
        targets[name] = tuple(n for n in networks if n in chosen)
    names = [iv.name for iv in build_interventions(spec, options)]  # validates names and options once
    bound = []
    for name in names:
        for network in targets.get(name, networks):
            bound.append((network, build_interventions([name], {name: options.get(name) or {}})[0]))
    result = InterventionSet(bound, networks=networks)
    for network in networks:
        result.network_overrides(network)  # refuse conflicting build-time overrides before anything is built
    return result


def describe() -> dict[str, dict[str, Any]]:
    """name -> {"summary": one line, "options": {option: {"type": str, "default": value}}}."""
    out = {}
    for name, cls in INTERVENTIONS.items():
        doc = inspect.getdoc(cls) or ""
        out[name] = {
            "summary": doc.strip().splitlines()[0] if doc.strip() else name,
            "options": {k: {"type": _type_name(h), "default": d} for k, (h, d) in _options(cls).items()},
        }
    return out


def format_help() -> str:
    """Human-readable list of interventions and options (for ``--help`` and docs)."""
    lines = []
    for name, info in describe().items():
        lines.append(f"{name}: {info['summary']}")
        for option, meta in info["options"].items():
            lines.append(f"    {option} ({meta['type']}) = {meta['default']!r}")
    lines.append(f"every intervention also takes {NETWORKS_OPTION!r}: the networks it acts on "
                 "(default: all of the algorithm's networks with hidden layers)")
    return "\n".join(lines)


__all__ = [
    "INTERVENTIONS",
    "Intervention",
    "InterventionSet",
    "bind_interventions",
    "build_interventions",
    "describe",
    "format_help",
    "network_overrides",
]
