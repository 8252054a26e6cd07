"""Registries of named fusion methods, one per pipeline stage (mergekit-style).

A method is a class with a ``family`` (the stage it belongs to), a ``name``, a one-line ``description``,
a ``reference`` and a typed ``Params`` dataclass; registering it (the :func:`register` decorator) is all it
takes for it to appear in :class:`~hetfuse.config.FusionConfig` validation, the CLI's choices and flags,
``hetfuse methods`` and the README's method table. Adding a method means one file in its family's package
(``hetfuse/<family package>/<method>.py``, imported by that package's ``__init__``) and its tests.

Parameters are declared as dataclass fields with a default and ``metadata={"help": ...}``; their
annotations (``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``, ``list[int]``) are what
values are checked against. A ``Params`` class may add a ``check(self)`` method for constraints between
values; it raises :class:`~hetfuse.errors.HetfuseError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

from .errors import HetfuseError

# stage -> (package holding its methods, human name); in pipeline order
FAMILIES: dict[str, tuple[str, str]] = {
    "similarity": ("hetfuse.similarity", "similarity"),
    "depth_align": ("hetfuse.align", "depth aligner"),
    "balance": ("hetfuse.balance", "depth balancer"),
    "match": ("hetfuse.match", "neuron matcher"),
    "repair": ("hetfuse.repair", "statistics repair"),
}

_REGISTRY: dict[str, dict[str, type[Method]]] = {f: {} for f in FAMILIES}


@dataclass
class NoParams:
    """A method without parameters."""


class Method:
    """Base class of every registered method."""

    family: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    rank: ClassVar[int] = 100  # listing order within the family (then registration order)

    def __init__(self, params: Any = None, **values: Any) -> None:
        if params is not None and values:
            raise HetfuseError(f"{self.family} method {self.name!r}: give params or keyword values, not both")
        if params is None:
            params = make_params(type(self), values)
        elif not isinstance(params, self.Params):
            params = make_params(type(self), dict(params))
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to its family's registry (names are unique per family)."""
    if cls.family not in FAMILIES:
        raise ValueError(f"unknown method family {cls.family!r}; known: {', '.join(FAMILIES)}")
    if not cls.name or not cls.description:
        raise ValueError(f"{cls.__name__} needs a name and a description")
    if not dataclasses.is_dataclass(cls.Params):
        raise ValueError(f"{cls.__name__}.Params must be a dataclass")
    for f in dataclasses.fields(cls.Params):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}.Params.{f.name} needs a default")
    known = _REGISTRY[cls.family]
    if cls.name in known and known[cls.name] is not cls:
        raise ValueError(f"{cls.family} method {cls.name!r} is registered twice")
    known[cls.name] = cls
    return cls


def _load(family: str) -> None:
    if family not in FAMILIES:
        raise HetfuseError(f"unknown method family {family!r}; known: {', '.join(FAMILIES)}")
    importlib.import_module(FAMILIES[family][0])


def methods(family: str) -> dict[str, type[Method]]:
    """Every registered method of ``family`` (name -> class), in registration order."""
    _load(family)
    items = list(_REGISTRY[family].items())
    return dict(sorted(items, key=lambda kv: kv[1].rank))


def get_method(family: str, name: str) -> type[Method]:
    known = methods(family)
    if name not in known:
        raise HetfuseError(f"{name!r} is not a {FAMILIES[family][1]} method; known: {', '.join(known)}")
    return known[name]


def build(family: str, name: str, params: dict | None = None) -> Method:
    """An instance of method ``name`` of ``family`` with validated ``params``."""
    return get_method(family, name)(**(params or {}))


# ------------------------------------------------------------------------------------------------ params


@dataclass(frozen=True)
class ParamInfo:
    """What is declared about one parameter (for validation, docs and the CLI)."""

    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    @property
    def choices(self) -> tuple | None:
        args = [a for a in union_args(self.annotation) if get_origin(a) is Literal]
        return tuple(v for a in args for v in get_args(a)) or None


def param_infos(cls: type[Method]) -> list[ParamInfo]:
    hints = typing.get_type_hints(cls.Params)
    out = []
    for f in dataclasses.fields(cls.Params):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(ParamInfo(f.name, hints[f.name], default, f.metadata.get("help", "")))
    return out


def union_args(ann) -> tuple:
    """The members of a union annotation (``(ann,)`` for anything else)."""
    if get_origin(ann) in (typing.Union, types.UnionType):
        return get_args(ann)
    return (ann,)


def _type_name(ann) -> str:
    parts = []
    for a in union_args(ann):
        if a is type(None):
            parts.append("none")
        elif get_origin(a) is Literal:
            parts.append("|".join(str(v) for v in get_args(a)))
        elif get_origin(a) is list:
            parts.append(f"list of {_type_name(get_args(a)[0])}")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    return " or ".join(parts)


def _conforms(value, ann) -> tuple[bool, Any]:
    """(ok, normalised value) for ``value`` against the annotation ``ann``."""
    for a in union_args(ann):
        if a is type(None):
            if value is None:
                return True, None
        elif get_origin(a) is Literal:
            if any(value == v and type(value) is type(v) for v in get_args(a)):
                return True, value
        elif get_origin(a) is list:
            if isinstance(value, (list, tuple)):
                items = [_conforms(v, get_args(a)[0]) for v in value]
                if all(ok for ok, _ in items):
                    return True, [v for _, v in items]
        elif a is bool:
            if isinstance(value, bool):
                return True, value
        elif a is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, int(value)
        elif a is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return True, float(value)
        elif a is str and isinstance(value, str):
            return True, value
    return False, value


def make_params(cls: type[Method], values: dict) -> Any:
    """Validate ``values`` (a subset of ``cls.Params``'s fields) and return a ``Params`` instance."""
    infos = {p.name: p for p in param_infos(cls)}
    unknown = sorted(set(values) - set(infos))
    where = f"{cls.family} method {cls.name!r}"
    if unknown:
        known = ", ".join(infos) or "none"
        raise HetfuseError(f"{where} has no parameter {', '.join(unknown)} (its parameters: {known})")
    clean = {}
    for k, v in values.items():
        ok, norm = _conforms(v, infos[k].annotation)
        if not ok:
            raise HetfuseError(f"{where}: {k}={v!r} is not a valid value (expected {infos[k].type_name})")
        clean[k] = norm
    params = cls.Params(**clean)
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def parse_param(info: ParamInfo, text: str) -> Any:
    """A parameter value from its command-line text, by the parameter's annotation."""
    text = text.strip()
    for a in union_args(info.annotation):
        if a is type(None) and text.lower() in ("none", ""):
            return None
        if get_origin(a) is Literal:
            for v in get_args(a):
                if str(v) == text:
                    return v
        if a is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if a is int:
            try:
                return int(text)
            except ValueError:
                pass
        if a is float:
            try:
                return float(text)
            except ValueError:
                pass
        if get_origin(a) is list:
            try:
                return [int(x) for x in text.split(",")]
            except ValueError:
                pass
        if a is str:
            return text
    expected = info.type_name.replace("list of int", "comma-separated integers (e.g. 64,32)")
    raise HetfuseError(f"--{info.name.replace('_', '-')} {text!r}: expected {expected}")


def iter_methods() -> Iterator[tuple[str, type[Method]]]:
    """(family, class) for every method of every family, in pipeline order."""
    for family in FAMILIES:
        for cls in methods(family).values():
            yield family, cls


def describe_methods() -> list[dict]:
    """Every family and its methods with description, reference and parameters (``hetfuse methods --json``)."""
    out = []
    for family, (_, title) in FAMILIES.items():
        out.append({"family": family, "title": title, "methods": [
            {"name": cls.name, "description": cls.description, "reference": cls.reference,
             "params": [{"name": p.name, "type": p.type_name, "default": p.default, "help": p.help}
                        for p in param_infos(cls)]}
            for cls in methods(family).values()]})
    return out


def methods_markdown() -> str:
    """The method table of the README, generated from the registries."""
    lines = ["| stage | method | what it does | parameters (default) |", "|---|---|---|---|"]
    for fam in describe_methods():
        for m in fam["methods"]:
            params = "; ".join(f"`{p['name']}` ({p['default']!r})" for p in m["params"]) or "–"
            ref = f" [{m['reference']}]" if m["reference"] else ""
            lines.append(f"| {fam['title']} | `{m['name']}` | {m['description']}{ref} | {params} |")
    return "\n".join(lines)
