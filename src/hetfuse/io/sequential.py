"""A plain ``nn.Sequential`` of standard torch layers, recorded as data (a checkpoint's ``{"sequential": ...}`` base).

``sequential_spec(model)`` describes an ``nn.Sequential`` (nested ones included) whose every layer is one of
:data:`LAYERS` — its exact type, not a subclass — by each layer's constructor arguments; ``sequential_from_spec``
builds it again. The description is plain JSON: a list of ``[child name, SPEC]`` pairs, a SPEC being
``{"type": "Linear", "args": {...}}`` or ``{"type": "Sequential", "children": [...]}``. Loading validates every
type, argument name and value and builds nothing but the listed layers, so an untrusted file can describe a
network but never run code.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from ..errors import CheckpointError
from ..graph.ops import spec_types
from ..graph.rewrite import module_from_spec

# type name -> (class, constructor arguments recorded): the module types of the description's op table
LAYERS: dict[str, tuple[type, tuple[str, ...]]] = spec_types()
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_LAYERS = 10_000
MAX_NESTING = 32
_STR_VALUES = {"zeros", "reflect", "replicate", "circular", "same", "valid", "none", "tanh"}  # padding(_mode), GELU


def _value(v):
    """A constructor argument as JSON (tuples as lists); None when it cannot be recorded."""
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return v if len(v) <= 4 and all(x is None or type(x) in (int, bool) for x in v) else None
    return v if v is None or type(v) in (int, float, bool, str) else None


def _layer_spec(module: nn.Module, depth: int) -> dict | None:
    if type(module) is nn.Sequential:
        if depth >= MAX_NESTING:
            return None
        children = []
        for name, child in module.named_children():
            spec = _layer_spec(child, depth + 1)
            if spec is None:
                return None
            children.append([name, spec])
        return {"type": "Sequential", "children": children}
    name = type(module).__name__
    if name not in LAYERS or type(module) is not LAYERS[name][0]:
        return None
    args = {}
    for a in LAYERS[name][1]:
        v = (module.bias is not None) if a == "bias" else getattr(module, a)
        rec = _value(v)
        if rec is None and v is not None:
            return None
        args[a] = rec
    return {"type": name, "args": args}


def sequential_spec(model: nn.Module) -> dict | None:
    """The base description ``{"sequential": [[name, SPEC], ...]}`` (plus ``"dtype"`` when the parameters are not
    float32) of a plain ``nn.Sequential`` of :data:`LAYERS`, or None when ``model`` is anything else (a subclass,
    an unsupported layer, a buffer or parameter of its own, several dtypes)."""
    if type(model) is not nn.Sequential:
        return None
    spec = _layer_spec(model, 0)
    if spec is None or sum(1 for _ in model.modules()) > MAX_LAYERS:
        return None
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if len(dtypes) > 1 or not dtypes <= set(DTYPES.values()):
        return None
    desc: dict = {"sequential": spec["children"]}
    if dtypes and dtypes != {torch.float32}:
        desc["dtype"] = next(k for k, v in DTYPES.items() if v in dtypes)
    try:  # what loading will build must hold exactly the model's tensors (nothing registered on the side)
        with torch.device("meta"):
            rebuilt = sequential_from_spec(desc)
    except CheckpointError:
        return None
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if {k: (tuple(v.shape), v.dtype) for k, v in rebuilt.state_dict().items()} != want:
        return None
    return desc


def _check(v, where: str) -> None:
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, int):
        if abs(v) > 2**40:
            raise CheckpointError(f"{where}: value {v} out of range")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise CheckpointError(f"{where}: value {v} is not finite")
    elif isinstance(v, str):
        if v not in _STR_VALUES:
            raise CheckpointError(f"{where}: unsupported value {v!r}")
    elif isinstance(v, list) and len(v) <= 4:
        for x in v:
            if x is not None and type(x) is not int:
                raise CheckpointError(f"{where}: unsupported value {v!r}")
            _check(x, where)
    else:
        raise CheckpointError(f"{where}: unsupported value {v!r}")


def _build(children, depth: int, count: list[int]) -> nn.Sequential:
    if depth > MAX_NESTING:
        raise CheckpointError(f"the Sequential is nested more than {MAX_NESTING} levels deep")
    if not isinstance(children, list):
        raise CheckpointError("a Sequential's children must be a list of [name, layer] pairs")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for item in children:
        count[0] += 1
        if count[0] > MAX_LAYERS:
            raise CheckpointError(f"the Sequential has more than {MAX_LAYERS} layers")
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)):
            raise CheckpointError(f"malformed Sequential child {item!r}")
        name, spec = item
        if not (name.isidentifier() or name.isdigit()) or name.startswith("_") or name in layers:
            raise CheckpointError(f"bad or repeated layer name {name!r}")
        kind = spec.get("type")
        if kind == "Sequential":
            layers[name] = _build(spec.get("children"), depth + 1, count)
            continue
        if kind not in LAYERS:
            raise CheckpointError(f"layer {name!r} is a {kind!r}; a Sequential checkpoint may hold only "
                                  f"{', '.join(LAYERS)} and nested Sequentials")
        layers[name] = module_from_spec(spec, types=LAYERS, where=f"layer {name!r}", check=_check)
    try:
        return nn.Sequential(layers)
    except (KeyError, TypeError, ValueError) as e:  # e.g. a layer named like an attribute of nn.Sequential
        raise CheckpointError(f"bad layer names {list(layers)}: {e}") from None


def sequential_from_spec(desc: dict) -> nn.Sequential:
    """The ``nn.Sequential`` a ``{"sequential": ...}`` base describes (validated; see the module docstring), built
    on the current default device."""
    dtype = desc.get("dtype", "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}")
    model = _build(desc.get("sequential"), 0, [0])
    return model.to(DTYPES[dtype]) if dtype != "float32" else model


def base_and_edits(model: nn.Module) -> tuple[dict, list]:
    """What a checkpoint records to rebuild ``model``: its base and its edits (:mod:`hetfuse.graph.rewrite`), except
    that a plain ``nn.Sequential`` of :data:`LAYERS` is recorded as it is now, as data, instead of by its class name
    (its edits, replaced layers, are then part of the description)."""
    from ..graph.rewrite import base_of, edits_of

    base = base_of(model)
    if "class" in base and type(model) is nn.Sequential:
        spec = sequential_spec(model)
        if spec is not None:
            return spec, []
    return base, edits_of(model)


def remember_sequential_base(model: nn.Module) -> nn.Module:
    """Record a plain ``nn.Sequential``'s description as its base (in place), so that a network made from it by
    edits (a balanced or fused graph) saves as that description plus the edits and loads without ``base=``."""
    from ..graph.rewrite import set_history

    base, edits = base_and_edits(model)
    if "sequential" in base and type(model) is nn.Sequential:
        set_history(model, base, edits)
    return model
