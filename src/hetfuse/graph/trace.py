"""Derive a network's description by tracing it with torch.fx.

Every node is described by the handler of its op in the op table (:mod:`hetfuse.graph.ops`): ``nn.Linear``;
``nn.Conv2d`` (ungrouped, or depthwise: groups = in = out channels, tied to its input's space); ``nn.BatchNorm1d/2d``
(weight, bias, running mean and variance tied to the channel; after its layer or as a pre-activation norm);
elementwise activations (ReLU, ReLU6, GELU, SiLU, ...); max/avg/adaptive pooling; dropout; identity;
flatten/view/reshape (from a conv map to a linear layer each channel ties a block of H·W input columns); residual
addition (both operands share one neuron space: a residual stream spans the stem or previous stage output, every
block's last conv/BN and the shortcut projection). Anything else raises
:class:`~hetfuse.errors.UnsupportedModelError` naming the module path (fx's ``nn_module_stack``), the node and its
op.

The walk keeps, for every value in the graph, the neuron space it lives in; additions merge spaces
(union-find). Activations of a space are read at its ``act_nodes``: the producing layer (or the
BatchNorm that follows it) for an ordinary layer, and every point where a residual stream is formed
(the stem's output and each addition) for a stream.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from . import ops
from .decompose import decomposition
from .spec import INPUT, OUTPUT, Attention, ModuleInfo, NetworkGraph, NeuronSpace, ParamAxis

_INPUT = -1
_META = -2   # a shape or size value (x.shape, x.size(0)): allowed as an argument of view/reshape only
_PARAM = -3  # a tensor attribute of the model (get_attr): tied to the space it is added to or concatenated with
_CONST = -4  # computed from no input data (an integer buffer, a mask, position ids): tied to no space


@dataclass
class _Val:
    space: int            # index into the provisional spaces, _INPUT, _META or _PARAM
    spatial: bool = False  # N x C x H x W (channels are the neurons)
    hw: int | None = None  # H * W when known
    block: int | None = 1  # after flattening a conv map: input columns per channel (None: H*W not yet known)
    # where the neurons are in a tensor that is neither N x C (x H x W) nor flat: "nct" (N x C x tokens: a conv map
    # flattened over positions), "tokens" (N x tokens x C), "split" (N x tokens x heads x C/heads), "headed"
    # (N x heads x tokens x C/heads); None otherwise
    layout: str | None = None
    heads: int | None = None  # split / headed layouts
    parts: int | None = None  # packed layouts: how many projections one Linear packs (3: q, k, v)
    param: str | None = None  # _PARAM: the attribute's name
    offset: int | None = None  # _PARAM: a segment of its first axis, [offset, offset + length) (packed q/k/v)
    length: int | None = None


# where a model keeps its torch.export graph: a plain attribute (not a registered submodule, so not in its state),
# which deep copies of the model copy along, the copy's graph calling the copy's own layers
_EXPORT_ATTR = "_hetfuse_export"


def trace(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """The model's fx graph. A ``GraphModule`` (a model hetfuse balanced, say) is its own trace: its node
    names are the ones its recorded edits refer to, so it is not traced again.

    Two tracers: ``torch.fx`` symbolic tracing (with :mod:`hetfuse.graph.decompose`), and where it fails,
    ``torch.export`` on ``example`` (:func:`hetfuse.graph.export_trace.export_graph`; Hugging Face models, code
    with Python control flow over its configuration). An exported graph is kept on the model object (and on its deep
    copies), so later calls without an example find it. The error of a model both refuse says what each said."""
    if isinstance(model, fx.GraphModule):
        return model
    cached = exported(model)
    if cached is not None:
        return cached
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:
        fx_error = exc if isinstance(exc, UnsupportedModelError) else UnsupportedModelError(_trace_failure(model, exc))
    if example is None:
        raise fx_error
    from .export_trace import export_graph

    try:
        gm = export_graph(model, example)
    except UnsupportedModelError as export_error:
        raise UnsupportedModelError(f"torch.fx: {fx_error}; torch.export: {export_error}") from None
    object.__setattr__(model, _EXPORT_ATTR, gm)
    return gm


def exported(model: nn.Module) -> fx.GraphModule | None:
    """The torch.export trace kept for ``model`` (see :func:`trace`), if any."""
    return model.__dict__.get(_EXPORT_ATTR)


class _Tracer(fx.Tracer):
    """torch.fx's symbolic tracer, except that the torch modules of :data:`hetfuse.graph.decompose.DECOMPOSITIONS`
    (multi-head attention, transformer encoder layers) are traced as the operations they compute."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return decomposition(m) is None and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        decomposed = decomposition(m)
        if decomposed is not None:
            forward = functools.partial(decomposed, self, m)
        return super().call_module(m, forward, args, kwargs)


def _user_frame(exc: BaseException) -> str:
    """``file:line (code)`` of the innermost frame of the failure outside torch and hetfuse, where known."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/hetfuse/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _trace_failure(model: nn.Module, exc: BaseException) -> str:
    """One line saying why torch.fx could not trace ``model``: the cause, where it is, what to do."""
    text = f"{type(exc).__name__}: {exc}"
    name = type(model).__name__
    at = _user_frame(exc)
    if "Proxy" in str(exc) and any(w in str(exc) for w in ("int()", "float()", "bool()", "__index__", "integer")):
        return (f"cannot trace {name} with torch.fx{at}: the model turns a traced size into a Python number (e.g. "
                "int(x.size(1) * ratio)), which symbolic tracing cannot follow; compute such sizes from the module's "
                f"configuration in __init__ instead ({text})")
    if "control flow" in str(exc):
        return (f"cannot trace {name} with torch.fx{at}: data-dependent control flow (an if or loop on tensor "
                f"values); hetfuse needs a model whose layers do not depend on the input ({text})")
    return f"cannot trace {name} with torch.fx{at} ({text})"


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


class Tracer:
    """The state of one walk over a traced graph: the value (neuron space) of every node, the provisional spaces
    (joined by additions, union-find), their consumers and the parametric modules met. Op handlers
    (:mod:`hetfuse.graph.ops`) update it through the methods below."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.vals: dict[fx.Node, _Val] = {}
        self.spaces: list[NeuronSpace] = []
        self.parent: list[int] = []
        self.consumers: dict[int, list[str]] = {}
        self.layer_order: list[str] = []
        self.records: list[tuple[str, str, str, int, int]] = []  # name, kind, node, in space, out space
        self.attributes: dict[int, str] = {}  # record index -> local name, for tensor attributes (kind "param")
        self.attribute_names: set[str] = set()
        self.input_layout: str | None = None
        self.headed: set[str] = set()                  # nodes read as N x heads x tokens x d (packed parts)
        self.packed: dict[int, list[int]] = {}         # a packed projection's space -> the spaces of its parts
        self.called: set[str] = set()
        self._ops: dict[str, object] = {}
        self.feature_last: set[str] = set()           # nodes whose neurons are on the last axis (tokens layout)
        self.attention: list[tuple[int, int, int]] = []  # (query/key space, value space, heads)

    value = staticmethod(_Val)

    def op_of(self, node: fx.Node):
        return ops.handler_for(node, self.modules)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def _constant(self, node: fx.Node) -> bool:
        """An op whose inputs are all constants or shape values (or none at all), or a tensor attribute that is
        an integer buffer or not part of the state (position ids, masks): a constant."""
        if node.op == "get_attr":
            state = self.gm.state_dict()
            return node.target not in state or not state[node.target].is_floating_point()
        if node.op not in ("call_function", "call_method"):
            return False
        inputs = [self.vals.get(p) for p in node.all_input_nodes]
        if any(v is None for v in inputs):
            return False
        return all(v.space in (_CONST, _META) for v in inputs) and (not inputs or
                                                                      any(v.space == _CONST for v in inputs) or
                                                                      self._makes_tensor(node))

    def _size_arithmetic(self, node: fx.Node) -> bool:
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return False
        inputs = [self.vals.get(p) for p in node.all_input_nodes]
        return all(v is not None and v.space == _META for v in inputs) and not self._makes_tensor(node) and \
            node.target is not getattr

    @staticmethod
    def _makes_tensor(node: fx.Node) -> bool:
        """A call on shape values alone that makes a tensor (``torch.ones(t, t)``), not a size (``x.size(0) * 2``)."""
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            return True
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] in ("ones", "zeros", "full", "arange", "eye", "empty", "tril", "triu", "ones_like",
                                      "zeros_like", "new_ones", "new_zeros")

    def source(self, node: fx.Node, arg, *, param_ok: bool = False, const_ok: bool = False) -> _Val:
        if not isinstance(arg, fx.Node) or arg not in self.vals:
            raise UnsupportedModelError(f"{ops.where(node, self.modules)}: unsupported input {arg!r}")
        v = self.vals[arg]
        if v.space == _CONST and not const_ok:
            raise UnsupportedModelError(
                f"{ops.where(node, self.modules)}: {ops.op_name(node, self.modules)} applied to a value computed from "
                "no input data (a constant); hetfuse follows constants used as embedding indices only")
        if v.space == _PARAM and not param_ok:
            raise UnsupportedModelError(
                f"{ops.where(node, self.modules)}: {ops.op_name(node, self.modules)} applied to the tensor attribute "
                f"'{v.param}'; hetfuse supports tensor attributes that are added to a hidden value (position "
                "embeddings) or concatenated with it along the tokens (class tokens)")
        return v

    def tie_param(self, node: fx.Node, v: _Val, space: int) -> None:
        """The tensor attribute of ``v`` (a position embedding, a class token) is added to or concatenated with
        ``space``: its last axis moves with the space's neurons."""
        state = self.gm.state_dict()
        if v.param not in state:
            raise UnsupportedModelError(f"{ops.where(node, self.modules)}: the tensor attribute '{v.param}' is neither "
                                        "a parameter nor a buffer (it would not be saved or fused)")
        tensor = state[v.param]
        s = self.find(space)
        if tensor.shape[-1] != self.spaces[s].size:
            raise UnsupportedModelError(
                f"{ops.where(node, self.modules)}: the tensor attribute '{v.param}' has {tensor.shape[-1]} entries on "
                f"its last axis, the hidden value it meets {self.spaces[s].size} neurons")
        self.spaces[s].members.append(ParamAxis(v.param, tensor.dim() - 1, "out"))
        self.record_attribute(node, v.param, space, space)

    @staticmethod
    def hw_of(node: fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        if meta is not None and len(meta.shape) == 4:
            return int(meta.shape[2] * meta.shape[3])
        return None

    def consume(self, node: fx.Node, v: _Val, weight: str, in_features: int, block: int = 1) -> None:
        """``weight``'s axis 1 reads ``v``'s space (``block`` columns per neuron)."""
        if v.space == _META:
            raise UnsupportedModelError(f"{ops.where(node, self.modules)}: layer applied to a shape value")
        if v.space == _INPUT:
            return
        s = self.find(v.space)
        if self.spaces[s].size * block != in_features:
            raise UnsupportedModelError(
                f"{ops.where(node, self.modules)}: takes {in_features} inputs but its input layer has "
                f"{self.spaces[s].size} neurons" + (f" x {block} positions" if block > 1 else ""))
        axis = ParamAxis(weight, 1, "in", block)
        if axis in self.spaces[s].members:  # a packed weight read again (its q, k and v parts)
            return
        self.spaces[s].members.append(axis)
        self.consumers.setdefault(s, []).append(str(node.target))

    def produce(self, node: fx.Node, mod: nn.Module, kind: str, size: int, members: list[ParamAxis], v: _Val, *,
                spatial: bool, layout: str | None = None) -> None:
        """A new neuron space of ``size`` neurons written by layer ``node`` (``layout="tokens"``: N x tokens x
        size)."""
        name = node.target
        self.spaces.append(NeuronSpace(name=name, size=size, kind=kind, producers=[name], act_module=name,
                                       members=members, act_nodes=[node.name]))
        self.parent.append(len(self.spaces) - 1)
        i = len(self.spaces) - 1
        self.vals[node] = _Val(i, spatial=spatial, hw=self.hw_of(node) if spatial else None, layout=layout)
        self.layer_order.append(name)
        self.record(name, kind, node, v.space, i)

    def produce_space(self, node: fx.Node, kind: str, size: int, members: list[ParamAxis], *,
                      layout: str | None = None) -> None:
        """A new neuron space written by a node that is not a module call (``F.linear`` of tensor attributes)."""
        self.spaces.append(NeuronSpace(name=node.name, size=size, kind=kind, producers=[], act_module="",
                                       members=members, act_nodes=[node.name]))
        self.parent.append(len(self.spaces) - 1)
        self.vals[node] = _Val(len(self.spaces) - 1, layout=layout)

    def split_packed(self, node: fx.Node, space: int, parts: int) -> list[int]:
        """The spaces of the ``parts`` equal segments of a packed projection's space (one fused qkv Linear: its
        q, k and v rows), made the first time it is split; the packed space itself is then no neuron space."""
        root = self.find(space)
        if root in self.packed:
            return self.packed[root]
        sp = self.spaces[root]
        if sp.stream or sp.in_members() or sp.size % parts or any(m.offset is not None for m in sp.members):
            raise UnsupportedModelError(f"{ops.where(node, self.modules)}: cannot split '{sp.name}' into {parts} "
                                        "packed parts (only a projection's own output, read by nothing else)")
        d = sp.size // parts
        subs = []
        for k in range(parts):
            members = [ParamAxis(m.name, m.axis, "out", offset=k * d) for m in sp.out_members()]
            self.spaces.append(NeuronSpace(name=f"{sp.name}[{k}]", size=d, kind=sp.kind, producers=[],
                                           act_module="", members=members, act_nodes=[]))
            self.parent.append(len(self.spaces) - 1)
            subs.append(len(self.spaces) - 1)
        self.packed[root] = subs
        return subs

    def record_attribute(self, node: fx.Node, name: str, space_in: int, space_out: int) -> None:
        """A tensor attribute used directly in forward, as a :class:`ModuleInfo` of kind ``param`` (once)."""
        if name in self.attribute_names:
            return
        self.attribute_names.add(name)
        owner, _, local = name.rpartition(".")
        self.attributes[len(self.records)] = local
        self.record(owner, "param", node, space_in, space_out)

    def record(self, name: str, kind: str, node: fx.Node, space_in: int, space_out: int) -> None:
        self.records.append((name, kind, node.name, INPUT if space_in == _INPUT else space_in, space_out))

    def merge(self, node: fx.Node, a: int, b: int) -> int:
        """Join the spaces of ``a`` and ``b`` (the operands of an addition); returns the joined space."""
        ra, rb = self.find(a), self.find(b)
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size != sb.size:
            raise UnsupportedModelError(
                f"{ops.where(node)}: residual stream with inconsistent channel counts: '{sa.name}' has {sa.size}, "
                f"'{sb.name}' {sb.size}")
        if ra == rb:
            return ra
        keep, drop = min(ra, rb), max(ra, rb)
        sk, sd = self.spaces[keep], self.spaces[drop]
        sk.members.extend(sd.members)
        sk.producers.extend(sd.producers)
        sk.norms.extend(sd.norms)
        sk.act_nodes = sk.act_nodes + sd.act_nodes
        self.consumers.setdefault(keep, []).extend(self.consumers.pop(drop, []))
        self.parent[drop] = keep
        return keep

    def step(self, node: fx.Node) -> _Val | None:
        """Describe one node; returns the model's output value at the output node."""
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            if self.vals:
                raise UnsupportedModelError(f"node '{node.name}': models with several inputs are not supported")
            self.vals[node] = _Val(_INPUT, spatial=False)
            return None
        if node.op == "output":
            return self.source(node, node.args[0])
        if self._constant(node):  # computed from no input data (a mask, position ids): tied to no space
            self.vals[node] = _Val(_CONST)
            return None
        if self._size_arithmetic(node):  # x.size(1) // heads
            self.vals[node] = _Val(_META)
            return None
        handler = self.op_of(node)
        if handler is None:
            raise UnsupportedModelError(
                f"{ops.where(node, self.modules)}: unsupported op {ops.op_name(node, self.modules)}; hetfuse supports "
                f"{ops.supported_summary()}")
        if isinstance(handler, ops.LayerOp):
            if node.target in self.called:
                raise UnsupportedModelError(f"{ops.where(node, self.modules)}: module '{node.target}' is called more "
                                            "than once (shared weights are not supported)")
            self.called.add(node.target)
        handler.trace(self, node, mod)
        out = self.vals.get(node)
        if out is not None and out.layout == "tokens":
            self.feature_last.add(node.name)
        return None


def describe(model: nn.Module, example: torch.Tensor | None = None) -> NetworkGraph:
    """Trace ``model`` and return its :class:`NetworkGraph`.

    ``example`` (a batch of inputs) lets the tracer measure feature-map sizes; without it, the number of
    input columns per channel of a flattened conv map is read off the consuming Linear's fan-in. The
    neuron space that reaches the model's output is the output layer: it is never permuted. Every node is
    described by the handler of its op in :data:`hetfuse.graph.ops.OPS`.
    """
    gm = trace(model, example)
    if example is not None:
        was = model.training
        gm.eval()
        with torch.no_grad():
            _ShapeRecorder(gm).run(example[:2])
        model.train(was)
    t = Tracer(gm)
    output: _Val | None = None
    for node in gm.graph.nodes:
        out = t.step(node)
        if out is not None:
            output = out
    spaces, consumers, find = t.spaces, t.consumers, t.find
    modules = t.modules
    if output is None or output.space in (_INPUT, _META):
        raise UnsupportedModelError(f"{type(model).__name__}: the output does not come from a layer")
    out_root = find(output.space)
    out_space = spaces[out_root]
    if out_space.stream or consumers.get(out_root) or out_space.kind != "linear":
        raise UnsupportedModelError(f"{type(model).__name__}: the output must come from a final Linear layer "
                                    f"('{out_space.name}')")
    roots = [i for i in range(len(spaces)) if find(i) == i and i != out_root and i not in t.packed]
    for i in roots:
        if i not in consumers:
            raise UnsupportedModelError(f"hidden layer '{spaces[i].name}' is never used by a later layer")
    hidden = [spaces[i] for i in roots]
    position = {r: k for k, r in enumerate(roots)}

    def hidden_index(i: int) -> int:
        if i == INPUT:
            return INPUT
        r = find(i)
        if r in t.packed:  # a packed projection is recorded with its first part (out_parts: all of them)
            r = find(t.packed[r][0])
        return OUTPUT if r == out_root else position[r]

    infos = []
    for r, (name, kind, node_name, i_in, i_out) in enumerate(t.records):
        if r in t.attributes:  # a tensor attribute (position embedding, class token) of module ``name``
            infos.append(ModuleInfo(name, kind, node_name, hidden_index(i_in), hidden_index(i_out),
                                    [t.attributes[r]]))
            continue
        mod = modules[name]
        present = [k for k, _ in mod.named_parameters(recurse=False)] + \
            [k for k, b in mod.named_buffers(recurse=False) if b is not None]
        order = [k for k in mod.state_dict() if k in present]
        parts = [hidden_index(p) for p in t.packed[find(i_out)]] if i_out >= 0 and find(i_out) in t.packed else None
        infos.append(ModuleInfo(name, kind, node_name, hidden_index(i_in), hidden_index(i_out), order, parts))
    layer_order = t.layer_order
    first = modules[layer_order[0]]
    input_dim = ops.layer_op(first).in_width(first)
    order = {name: k for k, name in enumerate(layer_order)}
    chain = len(hidden) == len(layer_order) - 1 and all(
        not s.stream and len(consumers[i]) == 1 and len(s.producers) == 1 and consumers[i][0] in order
        and order[consumers[i][0]] == order[s.producers[0]] + 1
        for i, s in zip(roots, hidden, strict=True))
    attention = []
    for qk, v, heads in t.attention:
        if find(qk) == out_root or find(v) == out_root:
            raise UnsupportedModelError(f"{type(model).__name__}: attention feeds the output directly")
        attention.append(Attention(position[find(qk)], position[find(v)], heads))
    return NetworkGraph(spaces=hidden, input_dim=input_dim, output_dim=out_space.size, chain=chain,
                        layer_modules=layer_order,
                        conv=any(s.kind == "conv" for s in hidden), modules=infos, gm=gm,
                        attention=list(dict.fromkeys(attention)), feature_last=frozenset(t.feature_last),
                        input_layout=t.input_layout, headed=frozenset(t.headed))
