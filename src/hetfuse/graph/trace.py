"""Derive a network's description by tracing it with torch.fx.

Supported now: ``nn.Linear`` (with or without bias), ReLU (module, ``F.relu``, ``torch.relu``,
``.relu()``), dropout, identity, and flatten/view/reshape of an already flat tensor. Anything else
raises :class:`~hetfuse.errors.UnsupportedModelError` naming the node and its op. The walk keeps,
for every value in the graph, the neuron space it lives in, so new layer types (convolutions,
BatchNorm, residual additions) only add cases here.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .spec import NetworkGraph, NeuronSpace, ParamAxis

_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.dropout, torch.flatten}
_PASS_METHODS = {"relu", "view", "reshape", "flatten", "contiguous"}
_INPUT = -1
_META = -2  # a shape or size value (x.shape, x.size(0)): allowed as an argument of view/reshape only


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


def describe(model: nn.Module) -> NetworkGraph:
    """Trace ``model`` and return its :class:`NetworkGraph`.

    The neuron space that reaches the model's output is the output layer: it is never permuted.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported Python constructs...
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "hetfuse needs a model without data-dependent control flow") from exc
    modules = dict(gm.named_modules())
    space_of: dict[fx.Node, int] = {}
    spaces: list[NeuronSpace] = []
    linear_order: list[str] = []
    consumers: dict[int, list[str]] = {}
    output_space: int | None = None

    def source(node: fx.Node, arg) -> int:
        if not isinstance(arg, fx.Node) or arg not in space_of:
            raise UnsupportedModelError(
                f"node '{node.name}' ({_op_name(node, modules)}): unsupported input {arg!r}")
        return space_of[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if space_of:
                raise UnsupportedModelError(f"node '{node.name}': models with several inputs are not supported")
            space_of[node] = _INPUT
        elif node.op == "get_attr":
            raise UnsupportedModelError(f"node '{node.name}': direct use of the tensor attribute "
                                        f"'{node.target}' in forward is not supported")
        elif node.op == "output":
            arg = node.args[0]
            output_space = source(node, arg)
        elif node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            lin: nn.Linear = modules[node.target]
            s_in = source(node, node.args[0])
            name = node.target
            if s_in == _META:
                raise UnsupportedModelError(f"node '{node.name}': Linear '{name}' applied to a shape value")
            if s_in != _INPUT:
                if spaces[s_in].size != lin.in_features:
                    raise UnsupportedModelError(
                        f"node '{node.name}': Linear '{name}' takes {lin.in_features} inputs but its input "
                        f"layer has {spaces[s_in].size} neurons")
                spaces[s_in].members.append(ParamAxis(f"{name}.weight", 1, "in"))
                consumers.setdefault(s_in, []).append(name)
            members = [ParamAxis(f"{name}.weight", 0, "out")]
            if lin.bias is not None:
                members.append(ParamAxis(f"{name}.bias", 0, "out"))
            spaces.append(NeuronSpace(name=name, size=lin.out_features, kind="linear", producers=[name],
                                      act_module=name, members=members))
            space_of[node] = len(spaces) - 1
            linear_order.append(name)
        elif (node.op == "call_module" and isinstance(modules[node.target], _PASS_MODULES)) or \
                (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _PASS_METHODS):
            src = source(node, node.args[0])
            if src == _META:
                raise UnsupportedModelError(f"node '{node.name}': unsupported use of a shape value")
            if node.op in ("call_method", "call_function") and node.target in ("view", "reshape", "flatten",
                                                                               torch.flatten):
                if src != _INPUT:
                    _check_flat_reshape(node, spaces[src].size)
            space_of[node] = src
        elif (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or \
                (node.op == "call_method" and node.target in ("size", "dim")):
            source(node, node.args[0])
            space_of[node] = _META
        elif node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and space_of.get(node.args[0]) == _META:
            space_of[node] = _META
        elif node.op == "call_function" and node.target is operator.getitem:
            raise UnsupportedModelError(f"node '{node.name}': indexing ({_op_name(node, modules)}) is not supported")
        else:
            raise UnsupportedModelError(
                f"node '{node.name}': unsupported op {_op_name(node, modules)}; hetfuse supports Linear, "
                "ReLU, dropout, identity and flatten for now")

    if output_space is None or output_space in (_INPUT, _META):
        raise UnsupportedModelError(f"{type(model).__name__}: the output does not come from a Linear layer")
    out = spaces[output_space]
    if output_space != len(spaces) - 1 or consumers.get(output_space):
        raise UnsupportedModelError(f"{type(model).__name__}: the output layer '{out.name}' must be the last layer")
    hidden = spaces[:output_space]
    for i, s in enumerate(hidden):
        if i not in consumers:
            raise UnsupportedModelError(f"hidden layer '{s.name}' is never used by a later layer")
    first = modules[linear_order[0]]
    chain = all(len(consumers.get(i, [])) == 1 and consumers[i][0] == linear_order[i + 1] for i in range(len(hidden)))
    return NetworkGraph(spaces=hidden, input_dim=first.in_features, output_dim=out.size, chain=chain,
                        layer_modules=linear_order)


def _check_flat_reshape(node: fx.Node, size: int) -> None:
    """A view/reshape/flatten of a hidden layer is only allowed as a no-op on (batch, features)."""
    args = [a for a in node.args[1:]]
    if node.target in ("flatten", torch.flatten):
        return
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(dims) == 2 and (dims[1] in (-1, size)):
        return
    raise UnsupportedModelError(f"node '{node.name}': reshaping a hidden layer to {tuple(dims)} is not supported")
