"""Derive a network's description by tracing it with torch.fx.

Supported: ``nn.Linear``; ``nn.Conv2d`` (groups = 1, any kernel/stride/padding, with or without
bias); ``nn.BatchNorm1d/2d`` (weight, bias, running mean and variance tied to the channel); ReLU
(module, ``F.relu``, ``torch.relu``, ``.relu()``); max/avg/adaptive-avg pooling; dropout; identity;
flatten/view/reshape (from a conv map to a linear layer each channel ties a block of H·W input
columns); residual addition (both operands share one neuron space: a residual stream spans the
stem or previous stage output, every block's last conv/BN and the shortcut projection). Anything
else raises :class:`~hetfuse.errors.UnsupportedModelError` naming the node and its op.

The walk keeps, for every value in the graph, the neuron space it lives in; additions merge spaces
(union-find). Activations of a space are read at its ``act_nodes``: the producing layer (or the
BatchNorm that follows it) for an ordinary layer, and every point where a residual stream is formed
(the stem's output and each addition) for a stream.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .spec import INPUT, OUTPUT, ModuleInfo, NetworkGraph, NeuronSpace, ParamAxis

_ACT_MODULES = (nn.ReLU, nn.Dropout, nn.Identity)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.dropout}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_FLATTEN_FUNCTIONS = {torch.flatten}
_ACT_METHODS = {"relu", "contiguous"}
_FLATTEN_METHODS = {"view", "reshape", "flatten"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_INPUT = -1
_META = -2  # a shape or size value (x.shape, x.size(0)): allowed as an argument of view/reshape only


@dataclass
class _Val:
    space: int            # index into the provisional spaces, _INPUT or _META
    spatial: bool = False  # N x C x H x W (channels are the neurons)
    hw: int | None = None  # H * W when known
    block: int | None = 1  # after flattening a conv map: input columns per channel (None: H*W not yet known)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's fx graph. A ``GraphModule`` (a model hetfuse balanced, say) is its own trace: its node
    names are the ones its recorded edits refer to, so it is not traced again."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported Python constructs...
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "hetfuse needs a model without data-dependent control flow") from exc


class TensorShape(NamedTuple):
    """The shape (and dtype) of a node's output on the example inputs, as ``node.meta["tensor_meta"]``."""

    shape: tuple
    dtype: torch.dtype


class _ShapeRecorder(fx.Interpreter):
    """Record every node's output shape (torch's ShapeProp does the same but imports sympy, a third of a second
    of every process's start-up)."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(tuple(result.shape), result.dtype)
        return result


def describe(model: nn.Module, example: torch.Tensor | None = None) -> NetworkGraph:
    """Trace ``model`` and return its :class:`NetworkGraph`.

    ``example`` (a batch of inputs) lets the tracer measure feature-map sizes; without it, the number of
    input columns per channel of a flattened conv map is read off the consuming Linear's fan-in. The
    neuron space that reaches the model's output is the output layer: it is never permuted.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    if example is not None:
        was = model.training
        gm.eval()
        with torch.no_grad():
            _ShapeRecorder(gm).run(example[:2])
        model.train(was)
    vals: dict[fx.Node, _Val] = {}
    spaces: list[NeuronSpace] = []
    parent: list[int] = []
    consumers: dict[int, list[str]] = {}
    layer_order: list[str] = []
    module_records: list[tuple[str, str, str, int, int]] = []  # name, kind, node, in space, out space
    called: set[str] = set()
    output: _Val | None = None

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def source(node: fx.Node, arg) -> _Val:
        if not isinstance(arg, fx.Node) or arg not in vals:
            raise UnsupportedModelError(f"node '{node.name}' ({_op_name(node, modules)}): unsupported input {arg!r}")
        return vals[arg]

    def hw_of(node: fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        if meta is not None and len(meta.shape) == 4:
            return int(meta.shape[2] * meta.shape[3])
        return None

    def new_space(node: fx.Node, name: str, size: int, kind: str, members: list[ParamAxis]) -> int:
        spaces.append(NeuronSpace(name=name, size=size, kind=kind, producers=[name], act_module=name,
                                  members=members, act_nodes=[node.name]))
        parent.append(len(spaces) - 1)
        return len(spaces) - 1

    def consume(node: fx.Node, v: _Val, weight: str, in_features: int, block: int = 1) -> None:
        if v.space == _META:
            raise UnsupportedModelError(f"node '{node.name}': layer applied to a shape value")
        if v.space == _INPUT:
            return
        s = find(v.space)
        if spaces[s].size * block != in_features:
            raise UnsupportedModelError(
                f"node '{node.name}': '{node.target}' takes {in_features} inputs but its input layer has "
                f"{spaces[s].size} neurons" + (f" x {block} positions" if block > 1 else ""))
        spaces[s].members.append(ParamAxis(weight, 1, "in", block))
        consumers.setdefault(s, []).append(str(node.target))

    def in_space(v: _Val) -> int:
        return INPUT if v.space == _INPUT else v.space

    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            if node.target in called:
                raise UnsupportedModelError(f"node '{node.name}': module '{node.target}' is called more than once "
                                            "(shared weights are not supported)")
            called.add(node.target)
        if node.op == "placeholder":
            if vals:
                raise UnsupportedModelError(f"node '{node.name}': models with several inputs are not supported")
            vals[node] = _Val(_INPUT, spatial=False)
        elif node.op == "get_attr":
            raise UnsupportedModelError(f"node '{node.name}': direct use of the tensor attribute "
                                        f"'{node.target}' in forward is not supported")
        elif node.op == "output":
            output = source(node, node.args[0])
        elif isinstance(mod, nn.Linear):
            v = source(node, node.args[0])
            if v.spatial:
                raise UnsupportedModelError(f"node '{node.name}': Linear '{node.target}' applied to a conv feature "
                                            "map without flattening")
            block = v.block
            if block is None:  # flattened map of unknown size: NCHW flattening is channel-major
                c = spaces[find(v.space)].size
                if mod.in_features % c:
                    raise UnsupportedModelError(
                        f"node '{node.name}': Linear '{node.target}' takes {mod.in_features} inputs, not a multiple "
                        f"of the {c} channels flattened into it")
                block = mod.in_features // c
            consume(node, v, f"{node.target}.weight", mod.in_features, block)
            members = [ParamAxis(f"{node.target}.weight", 0, "out")]
            if mod.bias is not None:
                members.append(ParamAxis(f"{node.target}.bias", 0, "out"))
            vals[node] = _Val(new_space(node, node.target, mod.out_features, "linear", members))
            layer_order.append(node.target)
            module_records.append((node.target, "linear", node.name, in_space(v), vals[node].space))
        elif isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise UnsupportedModelError(f"node '{node.name}': grouped convolution '{node.target}' "
                                            f"(groups={mod.groups}) is not supported")
            v = source(node, node.args[0])
            if v.space != _INPUT and not v.spatial:
                raise UnsupportedModelError(f"node '{node.name}': Conv2d '{node.target}' applied to a flat tensor")
            consume(node, v, f"{node.target}.weight", mod.in_channels)
            members = [ParamAxis(f"{node.target}.weight", 0, "out")]
            if mod.bias is not None:
                members.append(ParamAxis(f"{node.target}.bias", 0, "out"))
            vals[node] = _Val(new_space(node, node.target, mod.out_channels, "conv", members), spatial=True,
                              hw=hw_of(node))
            layer_order.append(node.target)
            module_records.append((node.target, "conv", node.name, in_space(v), vals[node].space))
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            v = source(node, node.args[0])
            if v.space in (_INPUT, _META):
                raise UnsupportedModelError(f"node '{node.name}': BatchNorm '{node.target}' on the raw input is "
                                            "not supported")
            s = find(v.space)
            if spaces[s].size != mod.num_features:
                raise UnsupportedModelError(f"node '{node.name}': BatchNorm '{node.target}' has {mod.num_features} "
                                            f"channels, its input {spaces[s].size}")
            names = [n for n in ("weight", "bias", "running_mean", "running_var")
                     if getattr(mod, n, None) is not None]
            spaces[s].members.extend(ParamAxis(f"{node.target}.{n}", 0, "out") for n in names)
            spaces[s].norms.append(node.target)
            src = node.args[0]
            post_norm = (src.op == "call_module" and isinstance(modules.get(src.target), (nn.Linear, nn.Conv2d))
                         and len(src.users) == 1)
            if post_norm:
                # a layer's own normalisation (conv -> BN): the layer is now read after it
                if src.name in spaces[s].act_nodes:
                    spaces[s].act_nodes[spaces[s].act_nodes.index(src.name)] = node.name
                else:
                    spaces[s].act_nodes.append(node.name)
                if spaces[s].act_module == spaces[s].producers[-1]:
                    spaces[s].act_module = node.target
            # else a pre-activation norm (BN -> ReLU -> conv) of a value used elsewhere too, e.g. a residual
            # stream: its entries move with the space, but the space is still read where it is formed
            vals[node] = _Val(v.space, spatial=v.spatial, hw=v.hw)
            module_records.append((node.target, "norm", node.name, v.space, v.space))
        elif isinstance(mod, _ACT_MODULES) or (node.op == "call_function" and node.target in _ACT_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _ACT_METHODS):
            v = source(node, node.args[0])
            if v.space == _META:
                raise UnsupportedModelError(f"node '{node.name}': unsupported use of a shape value")
            vals[node] = v
        elif isinstance(mod, _POOL_MODULES) or (node.op == "call_function" and node.target in _POOL_FUNCTIONS):
            v = source(node, node.args[0])
            if not v.spatial:
                raise UnsupportedModelError(f"node '{node.name}': pooling of a flat tensor")
            out_hw = hw_of(node)
            if out_hw is None:
                size = getattr(mod, "output_size", None) if mod is not None else \
                    (node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
                if (isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or \
                        node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)) and size in (1, (1, 1), [1, 1]):
                    out_hw = 1
            vals[node] = _Val(v.space, spatial=True, hw=out_hw)
        elif isinstance(mod, nn.Flatten) or (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) or \
                (node.op == "call_method" and node.target in _FLATTEN_METHODS):
            v = source(node, node.args[0])
            if v.space == _META:
                raise UnsupportedModelError(f"node '{node.name}': unsupported use of a shape value")
            if v.space != _INPUT and not v.spatial and node.op == "call_method" and node.target != "flatten":
                _check_flat_reshape(node, spaces[find(v.space)].size)
            out = _Val(v.space, spatial=False, block=v.block)
            if v.spatial and v.space != _INPUT:
                out.block = v.hw  # None when unknown: the consuming Linear's fan-in tells
            vals[node] = out
        elif node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            a, b = (source(node, x) for x in node.args[:2])
            if _INPUT in (a.space, b.space) or _META in (a.space, b.space):
                raise UnsupportedModelError(f"node '{node.name}': addition involving the raw input or a shape "
                                            "value is not supported")
            ra, rb = find(a.space), find(b.space)
            if spaces[ra].size != spaces[rb].size:
                raise UnsupportedModelError(
                    f"node '{node.name}': residual stream with inconsistent channel counts: "
                    f"'{spaces[ra].name}' has {spaces[ra].size}, '{spaces[rb].name}' {spaces[rb].size}")
            if ra != rb:
                keep, drop = min(ra, rb), max(ra, rb)
                spaces[keep].members.extend(spaces[drop].members)
                spaces[keep].producers.extend(spaces[drop].producers)
                spaces[keep].norms.extend(spaces[drop].norms)
                spaces[keep].act_nodes = [n for n in spaces[keep].act_nodes + spaces[drop].act_nodes]
                consumers.setdefault(keep, []).extend(consumers.pop(drop, []))
                parent[drop] = keep
                ra = keep
            spaces[ra].stream = True
            # a stream is read where it is formed: drop the read points of operands that only feed this sum (a
            # branch's last layer, a projection shortcut), keep the sum; an operand used elsewhere too is itself a
            # point where the stream is formed (a pre-activation block's input: the stem output, an earlier sum)
            for operand in node.args[:2]:
                if operand.name in spaces[ra].act_nodes and len(operand.users) == 1:
                    spaces[ra].act_nodes.remove(operand.name)
            spaces[ra].act_nodes.append(node.name)
            vals[node] = _Val(ra, spatial=a.spatial, hw=a.hw if a.hw is not None else b.hw)
        elif (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or \
                (node.op == "call_method" and node.target in ("size", "dim")):
            source(node, node.args[0])
            vals[node] = _Val(_META)
        elif node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and vals.get(node.args[0], _Val(_INPUT)).space == _META:
            vals[node] = _Val(_META)
        else:
            raise UnsupportedModelError(
                f"node '{node.name}': unsupported op {_op_name(node, modules)}; hetfuse supports Linear, Conv2d "
                "(groups=1), BatchNorm, ReLU, pooling, dropout, flatten and residual addition")

    if output is None or output.space in (_INPUT, _META):
        raise UnsupportedModelError(f"{type(model).__name__}: the output does not come from a layer")
    out_root = find(output.space)
    out_space = spaces[out_root]
    if out_space.stream or consumers.get(out_root) or out_space.kind != "linear":
        raise UnsupportedModelError(f"{type(model).__name__}: the output must come from a final Linear layer "
                                    f"('{out_space.name}')")
    roots = [i for i in range(len(spaces)) if find(i) == i and i != out_root]
    for i in roots:
        if i not in consumers:
            raise UnsupportedModelError(f"hidden layer '{spaces[i].name}' is never used by a later layer")
    hidden = [spaces[i] for i in roots]
    position = {r: k for k, r in enumerate(roots)}

    def hidden_index(i: int) -> int:
        if i == INPUT:
            return INPUT
        r = find(i)
        return OUTPUT if r == out_root else position[r]

    infos = []
    for name, kind, node_name, i_in, i_out in module_records:
        mod = modules[name]
        present = [k for k, _ in mod.named_parameters(recurse=False)] + \
            [k for k, b in mod.named_buffers(recurse=False) if b is not None]
        order = [k for k in mod.state_dict() if k in present]
        infos.append(ModuleInfo(name, kind, node_name, hidden_index(i_in), hidden_index(i_out), order))
    first = modules[layer_order[0]]
    input_dim = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    order = {name: k for k, name in enumerate(layer_order)}
    chain = len(hidden) == len(layer_order) - 1 and all(
        not s.stream and len(consumers[i]) == 1 and order[consumers[i][0]] == order[s.producers[0]] + 1
        for i, s in zip(roots, hidden, strict=False))
    return NetworkGraph(spaces=hidden, input_dim=input_dim, output_dim=out_space.size, chain=chain,
                        layer_modules=layer_order,
                        conv=any(s.kind == "conv" for s in hidden), modules=infos, gm=gm)


def _check_flat_reshape(node: fx.Node, size: int) -> None:
    """A view/reshape of a flat hidden layer is only allowed as a no-op on (batch, features)."""
    args = list(node.args[1:])
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(dims) == 2 and (dims[1] in (-1, size)):
        return
    raise UnsupportedModelError(f"node '{node.name}': reshaping a hidden layer to {tuple(dims)} is not supported")
