"""Structural edits of a network, recorded as data so they can be replayed without executing code.

Balancing (identity layers, zero residual blocks, folded layers), width changes (zipping to new widths)
and bias parameters added by repair are all edits of a base model. Each edit is a JSON-able dict and is
applied by :func:`apply_edit` — the same function when the edit is made and when a checkpoint is loaded:

* ``{"op": "replace_module", "target": NAME, "module": SPEC}`` — swap the submodule at ``NAME`` for a new
  one built from ``SPEC`` (e.g. a resized layer, or the same layer with a bias);
* ``{"op": "insert", "after": NODE, "nodes": [...], "modules": {NAME: SPEC}}`` — insert a small graph after
  fx node ``NODE``; its input is ``NODE``'s value and its output replaces that value for every node that
  used it (an identity layer, a zero residual block);
* ``{"op": "resize_param", "target": NAME, "shape": [...]}`` — replace the tensor attribute ``NAME`` (a position
  embedding, a class token) by zeros of ``shape`` (the fused values are loaded after);
* ``{"op": "fold", "consumer": NODE, "source": NODE, "module": SPEC}`` — the layer called at ``consumer``
  now reads ``source`` (skipping the layers between them, which are removed) and is rebuilt from
  ``SPEC`` (a folded layer).

A ``SPEC`` is ``{"type": "Conv2d", "args": {...}}`` for a module type from :data:`MODULE_TYPES` only, and
inserted nodes call only modules listed in the edit or functions from :data:`FUNCTIONS`: replaying an
untrusted checkpoint's edits can build modules but never run anything else. The first graph edit turns
the model into a ``torch.fx.GraphModule`` (its trace); the model remembers its base (what to build it
from) and its edits (:func:`base_of`, :func:`edits_of`), also through ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, HetfuseError
from . import ops

class ParamHolder(nn.Module):
    """Holds copies of tensor attributes that a copied block reads directly in forward (``get_attr``: the packed
    ``in_proj_weight`` / ``in_proj_bias`` of a multi-head attention), under their own local names."""

    def __init__(self, names: list[str], shapes: list[list[int]]) -> None:
        super().__init__()
        if len(names) != len(shapes) or any(not str(n).isidentifier() for n in names):
            raise CheckpointError(f"bad ParamHolder names {names!r}")
        self.names, self.shapes = list(names), [list(sh) for sh in shapes]
        if sum(math.prod(sh) for sh in self.shapes) > 1 << 28:
            raise CheckpointError(f"ParamHolder of shapes {shapes!r} is too large")
        for n, sh in zip(self.names, self.shapes, strict=True):
            self.register_parameter(n, nn.Parameter(torch.zeros(*sh)))


class Unmerge(nn.Module):
    """Copies fused features back into one model's neurons: output channel j is input channel ``index[j]`` (the
    unmerge of ZipIt!, as the input of a partially zipped network's head)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = int(features)
        self.register_buffer("index", torch.zeros(self.features, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


# what edits may record: the op table's module types, functions and methods (graph.ops), and Unmerge
MODULE_TYPES: dict[str, tuple[type, tuple[str, ...]]] = {"Unmerge": (Unmerge, ("features",)),
                                                         "ParamHolder": (ParamHolder, ("names", "shapes")),
                                                         **ops.spec_types()}
FUNCTIONS: dict[str, Any] = {
    "operator.add": operator.add, "operator.iadd": operator.iadd, "torch.add": torch.add,
    "torch.relu": torch.relu, "torch.nn.functional.relu": F.relu, "torch.nn.functional.dropout": F.dropout,
    "torch.flatten": torch.flatten, **ops.edit_functions()}
METHODS = {"relu", "contiguous", "view", "reshape", "flatten", "size", "dim"} | ops.edit_methods()
_FUNCTION_NAMES = {v: k for k, v in FUNCTIONS.items()}
MAX_EDITS = 10_000


# subclasses that only mark a layer for other tools (quantisation) and are recorded, and rebuilt, as their base
_EQUIVALENT: dict[type, str] = {nn.modules.linear.NonDynamicallyQuantizableLinear: "Linear"}


def module_spec(module: nn.Module) -> dict:
    """The SPEC of a module of a supported type (its constructor arguments)."""
    name = _EQUIVALENT.get(type(module), type(module).__name__)
    if name not in MODULE_TYPES or not (type(module) is MODULE_TYPES[name][0] or type(module) in _EQUIVALENT):
        raise HetfuseError(f"cannot record a {name} module in an edit; supported: {', '.join(MODULE_TYPES)}")
    _, argnames = MODULE_TYPES[name]
    args = {}
    for a in argnames:
        v = getattr(module, a)
        if a == "bias":
            v = module.bias is not None
        if isinstance(v, tuple):
            v = list(v)
        args[a] = v
    return {"type": name, "args": args}


def _check_value(v, where: str) -> None:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return
    if isinstance(v, int):
        if not -64 <= v <= 2**40:  # small negatives: dimensions counted from the end (Flatten's end_dim=-1)
            raise CheckpointError(f"{where}: value {v} out of range")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise CheckpointError(f"{where}: value {v} is not finite")
        return
    if isinstance(v, list) and len(v) <= 4:
        for x in v:
            _check_value(x, where)
        return
    raise CheckpointError(f"{where}: unsupported value {v!r}")


def module_from_spec(spec: dict, *, types: dict | None = None, where: str = "edit", check=None) -> nn.Module:
    """Build a module from its SPEC (validated: a type of ``types`` — default :data:`MODULE_TYPES` — known
    arguments, plain values passing ``check(value, where)``, default :func:`_check_value`). ``where`` names the
    spec in errors. Also the builder of :mod:`hetfuse.io.sequential`'s layers."""
    types = MODULE_TYPES if types is None else types
    check = _check_value if check is None else check
    if not isinstance(spec, dict) or spec.get("type") not in types:
        raise CheckpointError(f"{where} names an unsupported module {spec!r}; supported: {', '.join(types)}")
    kind = spec["type"]
    cls, argnames = types[kind]
    args = spec.get("args") or {}
    if not isinstance(args, dict) or set(args) - set(argnames):
        raise CheckpointError(f"{where} gives {kind} unknown arguments {sorted(set(args) - set(argnames))}")
    for k, v in args.items():
        check(v, f"{where}: {kind}.{k}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()}
    groups = kwargs.get("groups", 1)
    if kind == "Conv2d" and groups != 1 and not (groups == kwargs.get("in_channels") == kwargs.get("out_channels")):
        raise CheckpointError(f"{where}: only ungrouped or depthwise convolutions can be built (groups = 1 or groups "
                              "= in = out channels)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: cannot build {kind}({kwargs}): {e}") from None


# ----------------------------------------------------------------------------------------------- model state


def _history(model: nn.Module) -> dict | None:
    if isinstance(model, fx.GraphModule):  # a GraphModule's deepcopy keeps only .meta of its own attributes
        return getattr(model, "meta", {}).get("hetfuse")
    return getattr(model, "_hetfuse_history", None)


def set_history(model: nn.Module, base: dict, edits: list[dict]) -> None:
    """Record what ``model`` is built from and the edits made to it (kept through ``copy.deepcopy``)."""
    record = {"base": dict(base), "edits": list(edits)}
    if isinstance(model, fx.GraphModule):
        if not hasattr(model, "meta"):
            model.meta = {}
        model.meta["hetfuse"] = record
    else:
        object.__setattr__(model, "_hetfuse_history", record)


def base_of(model: nn.Module) -> dict:
    """What the model is built from: ``{"zoo": arch}`` for a zoo model (it has ``arch()``), else
    ``{"class": "module.QualName"}`` (a user's class, rebuilt from an instance given when loading)."""
    hist = _history(model)
    if hist is not None:
        return dict(hist["base"])
    if hasattr(model, "arch") and callable(model.arch):
        return {"zoo": model.arch()}
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}"}


def edits_of(model: nn.Module) -> list[dict]:
    hist = _history(model)
    return list(hist["edits"]) if hist is not None else []


def editable_copy(model: nn.Module) -> nn.Module:
    """A deep copy that remembers its base and its edits so far (of a model only torch.export could trace: a copy
    of that trace, since the copy of the model itself could not be traced without an example)."""
    from .trace import exported

    new = copy.deepcopy(exported(model) or model)
    set_history(new, base_of(model), edits_of(model))
    return new


def _as_graph_module(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    from .trace import trace

    gm = trace(model)
    set_history(gm, base_of(model), edits_of(model))
    gm.train(model.training)
    return gm


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    owner = root
    if parent:
        try:
            owner = root.get_submodule(parent)
        except AttributeError:
            if not isinstance(root, fx.GraphModule):
                raise
            root.add_submodule(target, module)
            return
    setattr(owner, attr, module)


# ----------------------------------------------------------------------------------------------- edits


def apply_edit(model: nn.Module, edit: dict, modules: dict[str, nn.Module] | None = None) -> nn.Module:
    """Apply one edit (see the module docstring) and record it; returns the edited model (a new
    ``GraphModule`` after the first graph edit, else ``model`` itself, changed in place).

    ``modules`` gives ready-made instances (with their values) for the modules the edit creates; without
    it they are built from their SPECs (when replaying a checkpoint, whose tensors are loaded after).
    """
    if not isinstance(edit, dict) or "op" not in edit:
        raise CheckpointError(f"malformed edit {edit!r}")
    op = edit["op"]
    modules = modules or {}
    base, before = base_of(model), edits_of(model)  # read before the model changes (a zoo arch() may follow it)
    if op == "replace_module":
        target = edit["target"]
        new = modules.get(target) or module_from_spec(edit["module"])
        try:
            old = model.get_submodule(target)
        except AttributeError:
            raise CheckpointError(f"edit replaces module {target!r}, which the model does not have") from None
        if type(old).__name__ not in MODULE_TYPES:
            raise CheckpointError(f"edit replaces {target!r}, a {type(old).__name__}; only supported layer types "
                                  "can be replaced")
        _set_module(model, target, new)
        out = model
    elif op == "insert":
        out = _as_graph_module(model)
        _insert(out, edit, modules)
    elif op == "fold":
        out = _as_graph_module(model)
        _fold(out, edit, modules)
    elif op == "resize_param":
        target, shape = edit.get("target"), edit.get("shape")
        owner_name, _, local = str(target).rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
            old = owner.get_parameter(local)
        except AttributeError:
            raise CheckpointError(f"edit resizes {target!r}, which is not a parameter of the model") from None
        good = isinstance(shape, list) and len(shape) == old.dim() and \
            all(isinstance(d, int) and 0 < d <= 1 << 20 for d in shape)
        if not good or math.prod(shape) > 1 << 28:
            raise CheckpointError(f"edit resizes {target!r} to a bad shape {shape!r}")
        setattr(owner, local, nn.Parameter(torch.zeros(*shape, dtype=old.dtype, device=old.device)))
        out = model
    elif op == "truncate":
        out = _as_graph_module(model)
        _truncate(out, edit)
    elif op == "tail":
        out = _as_graph_module(model)
        _tail(out, edit, modules)
    else:
        raise CheckpointError(f"unknown edit operation {op!r}")
    set_history(out, base, before + [edit])
    return out


def apply_edits(model: nn.Module, edits: list[dict]) -> nn.Module:
    """Replay a list of edits on a freshly built base model (see :func:`apply_edit`)."""
    if not isinstance(edits, list) or len(edits) > MAX_EDITS:
        raise CheckpointError("the checkpoint's edits must be a list (of at most 10000 edits)")
    for e in edits:
        model = apply_edit(model, e)
    return model


def _node_map(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _insert(gm: fx.GraphModule, edit: dict, modules: dict[str, nn.Module]) -> None:
    nodes = _node_map(gm)
    anchor = nodes.get(edit.get("after"))
    if anchor is None:
        raise CheckpointError(f"edit inserts after node {edit.get('after')!r}, which the model does not have")
    specs = edit.get("modules") or {}
    for name, spec in specs.items():
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise CheckpointError(f"edit creates a module with a bad name {name!r}")
        try:
            gm.get_submodule(name)
            raise CheckpointError(f"edit creates module {name!r}, which exists already")
        except AttributeError:
            pass
        gm.add_submodule(name, modules.get(name) or module_from_spec(spec))
    old_users = list(anchor.users)
    made: dict[str, fx.Node] = {}

    def ref(a):
        if isinstance(a, dict) and set(a) == {"node"}:
            if a["node"] == "$in":
                return anchor
            if a["node"] not in made:
                raise CheckpointError(f"inserted node refers to unknown node {a['node']!r}")
            return made[a["node"]]
        if isinstance(a, dict) and set(a) == {"slice"}:
            parts = a["slice"]
            if not (isinstance(parts, list) and len(parts) == 3):
                raise CheckpointError(f"inserted node has a bad slice {parts!r}")
            _check_value(parts, "inserted node slice")
            return slice(*parts)
        if isinstance(a, list):
            return tuple(ref(x) for x in a)
        _check_value(a, "inserted node argument")
        return a

    last = anchor
    cursor = anchor
    for spec in edit.get("nodes") or []:
        op, target = spec.get("op"), spec.get("target")
        args = tuple(ref(a) for a in spec.get("args", []))
        kwargs = {k: ref(v) for k, v in (spec.get("kwargs") or {}).items()}
        with gm.graph.inserting_after(cursor):
            if op == "call_module":
                if target not in specs:
                    raise CheckpointError(f"inserted node calls module {target!r}, not created by the edit")
                node = gm.graph.call_module(target, args, kwargs)
            elif op == "call_function":
                if target not in FUNCTIONS:
                    raise CheckpointError(f"inserted node calls {target!r}; allowed: {', '.join(FUNCTIONS)}")
                if FUNCTIONS[target] is getattr and (len(args) != 2 or args[1] != "shape"):
                    raise CheckpointError("inserted getattr nodes may only read a tensor's shape")
                node = gm.graph.call_function(FUNCTIONS[target], args, kwargs)
            elif op == "call_method":
                if target not in METHODS:
                    raise CheckpointError(f"inserted node calls method {target!r}; allowed: {', '.join(METHODS)}")
                node = gm.graph.call_method(target, args, kwargs)
            elif op == "get_attr":
                owner, _, local = str(target).rpartition(".")
                if owner not in specs or not hasattr(gm.get_submodule(owner), local):
                    raise CheckpointError(f"inserted node reads {target!r}, not a tensor of a module the edit creates")
                node = gm.graph.get_attr(target)
            else:
                raise CheckpointError(f"inserted node has unsupported op {op!r}")
        made[spec.get("name", node.name)] = node
        cursor = node
        last = node
    for u in old_users:
        u.replace_input_with(anchor, last)
    gm.graph.lint()
    gm.recompile()


def _fold(gm: fx.GraphModule, edit: dict, modules: dict[str, nn.Module]) -> None:
    nodes = _node_map(gm)
    consumer, source = nodes.get(edit.get("consumer")), nodes.get(edit.get("source"))
    if consumer is None or source is None or consumer.op != "call_module":
        raise CheckpointError(f"fold edit names nodes the model does not have: {edit.get('consumer')!r}, "
                              f"{edit.get('source')!r}")
    old_input = consumer.args[0]
    consumer.args = (source,) + tuple(consumer.args[1:])
    target = str(consumer.target)
    _set_module(gm, target, modules.get(target) or module_from_spec(edit["module"]))
    # remove the now unused chain that led from source to the consumer
    stack = [old_input]
    while stack:
        n = stack.pop()
        if isinstance(n, fx.Node) and not n.users and n.op != "placeholder":
            inputs = list(n.all_input_nodes)
            gm.graph.erase_node(n)
            stack.extend(inputs)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _truncate(gm: fx.GraphModule, edit: dict) -> None:
    """The network up to node ``at``: its value becomes the output (what a partially zipped network's trunk is)."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    at = by_name.get(edit.get("at"))
    if at is None:
        raise CheckpointError(f"truncate edit names node {edit.get('at')!r}, which the model does not have")
    out = next(n for n in nodes if n.op == "output")
    out.args = (at,)
    for n in reversed(nodes[nodes.index(at) + 1:]):
        if n.op != "output":
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _tail(gm: fx.GraphModule, edit: dict, modules: dict[str, nn.Module]) -> None:
    """The network after node ``after``, reading fused features that an :class:`Unmerge` of ``features`` channels
    copies back into the network's neurons (a partially zipped network's head). Refused when a later node reads
    anything from before the cut other than through ``after``."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    cut = by_name.get(edit.get("after"))
    if cut is None:
        raise CheckpointError(f"tail edit names node {edit.get('after')!r}, which the model does not have")
    name = edit.get("module", "hetfuse_unmerge")
    if not str(name).isidentifier():
        raise CheckpointError(f"tail edit names a bad module {name!r}")
    gm.add_submodule(name, modules.get(name) or Unmerge(int(edit.get("features", 1))))
    first = next(n for n in nodes if n.op == "placeholder")
    with gm.graph.inserting_before(first):
        inp = gm.graph.placeholder("features")
    with gm.graph.inserting_after(inp):
        unmerged = gm.graph.call_module(name, (inp,))
    before = set(nodes[:nodes.index(cut) + 1])
    later = nodes[nodes.index(cut) + 1:]
    for n in later:
        for a in n.all_input_nodes:
            if a in before and a is not cut:
                raise HetfuseError(f"cannot cut the network after node '{cut.name}': node '{n.name}' also reads "
                                   f"'{a.name}' from before it")
    cut.replace_all_uses_with(unmerged)
    for n in reversed(nodes[:nodes.index(cut) + 1]):
        gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------------------------- builders


def node_spec(node: fx.Node, names: dict[fx.Node, str], input_node: fx.Node, module_names: dict[str, str]) -> dict:
    """The SPEC of an existing node, with its inputs renamed (for copying a template subgraph)."""

    def arg(a):
        if isinstance(a, fx.Node):
            if a is input_node:
                return {"node": "$in"}
            if a not in names:
                raise HetfuseError(f"node '{node.name}' reads '{a.name}', outside the copied part of the graph")
            return {"node": names[a]}
        if isinstance(a, (tuple, list)):
            return [arg(x) for x in a]
        if isinstance(a, slice):
            return {"slice": [a.start, a.stop, a.step]}
        return a

    spec: dict = {"name": names[node], "op": node.op, "args": [arg(a) for a in node.args]}
    if node.kwargs:
        spec["kwargs"] = {k: arg(v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        spec["target"] = module_names[str(node.target)]
    elif node.op == "call_function":
        if node.target not in _FUNCTION_NAMES:
            raise HetfuseError(f"cannot copy node '{node.name}' calling {node.target}")
        spec["target"] = _FUNCTION_NAMES[node.target]
    elif node.op == "call_method":
        spec["target"] = str(node.target)
    elif node.op == "get_attr":
        owner, _, local = str(node.target).rpartition(".")
        spec["target"] = f"{module_names[owner]}.{local}"
    else:
        raise HetfuseError(f"cannot copy node '{node.name}' ({node.op})")
    return spec


def fresh_prefix(model: nn.Module, stem: str = "hetfuse") -> str:
    """A top-level module name not used yet (``hetfuse0``, ``hetfuse1``, ...)."""
    names = {n.split(".")[0] for n, _ in model.named_modules() if n}
    k = 0
    while f"{stem}{k}" in names:
        k += 1
    return f"{stem}{k}"
