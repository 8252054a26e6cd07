"""The description's op table: one handler per kind of operation a traced network may contain.

Each handler says, for the nodes it recognises (:meth:`OpHandler.matches`), which neuron spaces the node reads and
writes and which parameter axes it ties to them (:meth:`OpHandler.trace`, run by :func:`hetfuse.graph.describe`
through a :class:`~hetfuse.graph.trace.Tracer`). Handlers of parametric layers (``kind`` set: the
:class:`~hetfuse.graph.spec.ModuleInfo` kind they record) also say how to resize the layer to other widths
(:meth:`LayerOp.resize`, used by the combine step and the balancers), how to build an identity layer like it
(:meth:`LayerOp.identity`, for depth balancing) and how to make it output zero (:meth:`LayerOp.zero`, for zero
residual blocks). Everything outside ``graph/`` asks this table; a new op is one handler registered here.

The table, in the order handlers are tried: :data:`OPS`. Layer handlers by kind: :func:`layer_op`.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import HetfuseError, UnsupportedModelError
from .spec import ParamAxis

if TYPE_CHECKING:
    from .trace import Tracer

__all__ = ["OPS", "LayerOp", "OpHandler", "channelwise", "handler_for", "is_add", "is_elementwise", "is_nonnegative",
           "is_relu", "layer_op", "module_path", "where"]

_INPUT = -1
_META = -2
_PARAM = -3
_CONST = -4


def module_path(node: fx.Node) -> str | None:
    """The module path of the code that made ``node`` (fx records it as ``nn_module_stack``), with its class."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = getattr(cls, "__name__", str(cls))
    return f"{path} ({name})"


def where(node: fx.Node, modules: dict | None = None) -> str:
    """How error messages name a node: the module path (and class) of the code that made it, then the fx node."""
    mod = modules.get(node.target) if modules is not None and node.op == "call_module" else None
    if mod is not None:
        return f"{node.target} ({type(mod).__name__})"
    path = module_path(node)
    if path:
        return f"{path}, node '{node.name}'"
    return f"node '{node.name}'"


def op_name(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


class OpHandler:
    """One kind of operation. ``name`` labels it in messages and docs. ``starts_layer``: a residual block whose
    branch holds this op opens a layer that depth alignment places as one unit with the blocks after it
    (attention: a transformer layer's attention and feed-forward sub-blocks)."""

    name: ClassVar[str] = ""
    starts_layer: ClassVar[bool] = False
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[frozenset] = frozenset()
    methods: ClassVar[frozenset] = frozenset()
    # module types structural edits may record and rebuild (graph.rewrite): name -> (class, constructor arguments)
    spec_types: ClassVar[dict[str, tuple[type, tuple[str, ...]]]] = {}

    def accepts(self, mod: nn.Module | None) -> bool:
        """Whether this handler handles a call of module ``mod``."""
        return bool(self.modules) and isinstance(mod, self.modules)

    def matches(self, node: fx.Node, mod: nn.Module | None) -> bool:
        if node.op == "call_module":
            return self.accepts(mod)
        if node.op == "call_function":
            return node.target in self.functions
        if node.op == "call_method":
            return node.target in self.methods
        return False

    def trace(self, t: Tracer, node: fx.Node, mod: nn.Module | None) -> None:
        raise NotImplementedError


class LayerOp(OpHandler):
    """A parametric layer recorded as a :class:`~hetfuse.graph.spec.ModuleInfo` of kind ``kind``."""

    kind: ClassVar[str] = ""
    in_key: ClassVar[str] = ""
    out_key: ClassVar[str] = ""
    image_input: ClassVar[bool] = False  # a network starting with this layer reads N x C x H x W images
    token_input: ClassVar[bool] = False  # ... reads N x tokens integer ids
    writes_space: ClassVar[bool] = True  # it produces a new neuron space (False: it acts within its input's)

    def in_width(self, mod: nn.Module) -> int:
        return int(getattr(mod, self.in_key))

    def resize(self, args: dict, old_in: int | None, new_in: int | None, new_out: int | None) -> bool:
        """Change a module spec's arguments (``rewrite.module_spec``) to ``new_in`` input neurons (``old_in``
        before; a flattened conv map feeds ``block`` columns per channel) and ``new_out`` output neurons; None
        keeps a side. Returns whether anything changed."""
        changed = False
        if new_in is not None and old_in:
            block = args[self.in_key] // old_in
            if new_in * block != args[self.in_key]:
                args[self.in_key] = new_in * block
                changed = True
        if new_out is not None and new_out != args[self.out_key]:
            args[self.out_key] = new_out
            changed = True
        return changed

    def identity(self, template: nn.Module, width: int) -> nn.Module:
        raise HetfuseError(f"cannot make an identity layer like a {type(template).__name__}")

    def design(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's input ``x`` as the rows of a linear regression (observations x inputs, such that the layer's
        output rows are ``design @ solution``): what a least-squares refit of the layer's weights regresses on.
        None: the layer is not an ungrouped linear map of its input (it is not refitted)."""
        return None

    def outputs(self, mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The layer's output ``y`` as observations x output neurons, in the row order of :meth:`design`."""
        raise NotImplementedError

    def load_solution(self, mod: nn.Module, solution: torch.Tensor) -> None:
        """Set the layer's weight from a regression solution (inputs x outputs, as :meth:`design` orders them)."""
        raise NotImplementedError

    def zero(self, mod: nn.Module) -> None:
        """Make the layer output zero for any input (weight and bias 0)."""
        with torch.no_grad():
            mod.weight.zero_()
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()

    @staticmethod
    def _out_members(target: str, mod: nn.Module) -> list[ParamAxis]:
        members = [ParamAxis(f"{target}.weight", 0, "out")]
        if getattr(mod, "bias", None) is not None:
            members.append(ParamAxis(f"{target}.bias", 0, "out"))
        return members


class LinearOp(LayerOp):
    name, kind, modules = "Linear", "linear", (nn.Linear,)
    spec_types = {"Linear": (nn.Linear, ("in_features", "out_features", "bias"))}
    in_key, out_key = "in_features", "out_features"

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if v.spatial:
            raise UnsupportedModelError(f"{where(node, t.modules)}: Linear applied to a conv feature map without "
                                        "flattening")
        if v.layout not in (None, "tokens"):
            raise UnsupportedModelError(f"{where(node, t.modules)}: Linear applied to a {_LAYOUTS[v.layout]} tensor "
                                        "(hetfuse follows Linear layers over the features of N x features or N x "
                                        "tokens x features tensors)")
        if v.space == _INPUT and _rank(node.args[0]) == 3:  # N x tokens x features inputs
            t.input_layout = "tokens"
            v = t.value(_INPUT, layout="tokens")
        if v.layout == "tokens":
            t.consume(node, v, f"{node.target}.weight", mod.in_features)
            t.produce(node, mod, self.kind, mod.out_features, self._out_members(node.target, mod), v, spatial=False,
                      layout="tokens")
            return
        block = v.block
        if block is None:  # flattened map of unknown size: NCHW flattening is channel-major
            c = t.spaces[t.find(v.space)].size
            if mod.in_features % c:
                raise UnsupportedModelError(
                    f"{where(node, t.modules)}: takes {mod.in_features} inputs, not a multiple of the {c} channels "
                    "flattened into it")
            block = mod.in_features // c
        t.consume(node, v, f"{node.target}.weight", mod.in_features, block)
        t.produce(node, mod, self.kind, mod.out_features, self._out_members(node.target, mod), v, spatial=False)

    def design(self, mod, x):
        return x.reshape(-1, mod.in_features)  # N x features or N x tokens x features

    def outputs(self, mod, y):
        return y.reshape(-1, mod.out_features)

    def load_solution(self, mod, solution):
        mod.weight.copy_(solution.T.to(mod.weight.dtype))

    def identity(self, template, width):
        new = nn.Linear(width, width, bias=template.bias is not None)
        with torch.no_grad():
            new.weight.copy_(torch.eye(width))
            if new.bias is not None:
                new.bias.zero_()
        return new.to(device=template.weight.device, dtype=template.weight.dtype)


def _rank(node) -> int | None:
    """The number of dimensions of a node's value on the example inputs (None when not recorded)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(meta.shape) if meta is not None else None


def _is_depthwise(mod: nn.Conv2d) -> bool:
    return mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


class ConvOp(LayerOp):
    name, kind, modules = "Conv2d", "conv", (nn.Conv2d,)
    spec_types = {"Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                         "dilation", "groups", "bias", "padding_mode"))}
    in_key, out_key = "in_channels", "out_channels"
    image_input = True

    def accepts(self, mod):
        return isinstance(mod, nn.Conv2d) and not _is_depthwise(mod)

    def trace(self, t, node, mod):
        if mod.groups != 1:
            raise UnsupportedModelError(
                f"{where(node, t.modules)}: grouped convolution '{node.target}' (groups={mod.groups}, "
                f"{mod.in_channels} -> {mod.out_channels} channels) is not supported: its permutations would have to "
                "stay within groups; hetfuse supports ungrouped and depthwise (groups = in = out channels) "
                "convolutions")
        v = t.source(node, node.args[0])
        if v.space != _INPUT and not v.spatial:
            raise UnsupportedModelError(f"{where(node, t.modules)}: Conv2d applied to a flat tensor")
        t.consume(node, v, f"{node.target}.weight", mod.in_channels)
        t.produce(node, mod, self.kind, mod.out_channels, self._out_members(node.target, mod), v, spatial=True)

    def design(self, mod, x):
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return None
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N·positions) x (C_in·kh·kw)

    def outputs(self, mod, y):
        return y.movedim(1, -1).reshape(-1, mod.out_channels)

    def load_solution(self, mod, solution):
        mod.weight.copy_(solution.T.reshape(mod.weight.shape).to(mod.weight.dtype))

    def identity(self, template, width):
        new = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=template.bias is not None)
        with torch.no_grad():
            new.weight.zero_()
            idx = torch.arange(width)
            new.weight[idx, idx, 1, 1] = 1.0
            if new.bias is not None:
                new.bias.zero_()
        return new.to(device=template.weight.device, dtype=template.weight.dtype)


class ChannelwiseOp(LayerOp):
    """A layer that acts on each neuron of its input space separately (its entries move with the space): it
    writes the space it reads."""

    writes_space = False

    def width_of(self, mod: nn.Module) -> int:
        return int(getattr(mod, self.out_key))

    def _tie(self, t, node, mod, names: list[str], *, norm: bool) -> None:
        v = t.source(node, node.args[0])
        if v.space in (_INPUT, _META):
            raise UnsupportedModelError(f"{where(node, t.modules)}: {self.name} on the raw input is not supported")
        s = t.find(v.space)
        width = self.width_of(mod)
        if t.spaces[s].size != width:
            raise UnsupportedModelError(f"{where(node, t.modules)}: {self.name} has {width} channels, its input "
                                        f"{t.spaces[s].size}")
        t.spaces[s].members.extend(ParamAxis(f"{node.target}.{n}", 0, "out") for n in names)
        if norm:
            t.spaces[s].norms.append(node.target)
        src = node.args[0]
        post_norm = norm and src.op == "call_module" and isinstance(t.op_of(src), (LinearOp, ConvOp)) and \
            len(src.users) == 1
        if post_norm:
            # a layer's own normalisation (conv -> BN): the layer is now read after it
            sp = t.spaces[s]
            if src.name in sp.act_nodes:
                sp.act_nodes[sp.act_nodes.index(src.name)] = node.name
            else:
                sp.act_nodes.append(node.name)
            if sp.act_module == sp.producers[-1]:
                sp.act_module = node.target
        # else a pre-activation norm (BN -> ReLU -> conv) of a value used elsewhere too, e.g. a residual stream,
        # or a depthwise layer: its entries move with the space, but the space is still read where it is formed
        t.vals[node] = t.value(v.space, spatial=v.spatial, hw=t.hw_of(node) or v.hw, layout=v.layout)
        t.record(node.target, self.kind, node, v.space, v.space)


class NormOp(ChannelwiseOp):
    name, kind, modules = "BatchNorm", "norm", (nn.BatchNorm1d, nn.BatchNorm2d)
    spec_types = {n: (c, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
                  for n, c in (("BatchNorm1d", nn.BatchNorm1d), ("BatchNorm2d", nn.BatchNorm2d))}
    in_key = out_key = "num_features"

    def trace(self, t, node, mod):
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(mod, n, None) is not None]
        self._tie(t, node, mod, names, norm=True)

    def resize(self, args, old_in, new_in, new_out):
        width = new_out if new_out is not None else new_in
        if width is not None and width != args["num_features"]:
            args["num_features"] = width
            return True
        return False

    def zero(self, mod):
        """Neutral: running mean 0, variance 1, weight 1, bias 0, so BN(0) = 0."""
        with torch.no_grad():
            if mod.running_mean is not None:
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
            if mod.affine:
                mod.weight.fill_(1.0)
                mod.bias.zero_()


class DepthwiseConvOp(ChannelwiseOp):
    """A depthwise convolution (groups = in = out channels): channel c of its output reads channel c of its input
    only, so its weight rows and bias move with the input's space (MobileNet inverted residuals, ConvNeXt
    blocks)."""

    name, kind = "depthwise Conv2d", "depthwise"
    in_key = out_key = "out_channels"

    def accepts(self, mod):
        return isinstance(mod, nn.Conv2d) and _is_depthwise(mod)

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if v.space != _INPUT and not v.spatial:
            raise UnsupportedModelError(f"{where(node, t.modules)}: Conv2d applied to a flat tensor")
        names = ["weight"] + (["bias"] if mod.bias is not None else [])
        self._tie(t, node, mod, names, norm=False)

    def resize(self, args, old_in, new_in, new_out):
        width = new_out if new_out is not None else new_in
        if width is not None and width != args["out_channels"]:
            args["in_channels"] = args["out_channels"] = args["groups"] = width
            return True
        return False


_LAYOUTS = {None: "N x features", "nct": "N x channels x positions", "tokens": "N x tokens x features",
            "split": "N x tokens x heads x head-features", "headed": "N x heads x tokens x head-features",
            "packed": "N x tokens x parts x heads x head-features", "packed-headed":
            "parts x N x heads x tokens x head-features", "unbound": "parts (unbound)"}


def _shape_name(v) -> str:
    return "N x C x H x W" if v.spatial else _LAYOUTS.get(v.layout, str(v.layout))


class LayerNormOp(ChannelwiseOp):
    """LayerNorm / RMSNorm over the features (the last axis): it commutes with a permutation of the features, so
    its weight and bias move with its input's space (a residual stream). It is never where the space is read.
    Soft maps (transport plans, zip merges) do not commute with it: fusion through them is approximate."""

    name, kind = "LayerNorm", "layernorm"
    modules = (nn.LayerNorm, nn.RMSNorm)
    spec_types = {"LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
                  "RMSNorm": (nn.RMSNorm, ("normalized_shape", "eps", "elementwise_affine"))}
    in_key = out_key = "normalized_shape"

    def in_width(self, mod):
        return int(mod.normalized_shape[0])

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if len(mod.normalized_shape) != 1:
            raise UnsupportedModelError(f"{where(node, t.modules)}: {type(mod).__name__} over "
                                        f"{len(mod.normalized_shape)} axes; hetfuse supports normalisation over the "
                                        "features (the last axis)")
        if v.spatial or v.layout not in (None, "tokens"):
            raise UnsupportedModelError(f"{where(node, t.modules)}: {type(mod).__name__} over the last axis of a "
                                        f"{_shape_name(v)} tensor is not over its "
                                        "features")
        names = [n for n in ("weight", "bias") if getattr(mod, n, None) is not None]
        width = int(mod.normalized_shape[0])
        s = t.find(v.space) if v.space >= 0 else None
        if s is None or t.spaces[s].size != width:
            raise UnsupportedModelError(f"{where(node, t.modules)}: {type(mod).__name__} of {width} features on "
                                        + ("the raw input" if s is None else f"{t.spaces[s].size} neurons"))
        self._tie(t, node, mod, names, norm=False)

    def width_of(self, mod):
        return int(mod.normalized_shape[0])

    def resize(self, args, old_in, new_in, new_out):
        width = new_out if new_out is not None else new_in
        shape = args["normalized_shape"]
        shape = shape if isinstance(shape, (tuple, list)) else (shape,)
        if width is not None and width != shape[0]:
            args["normalized_shape"] = [width]
            return True
        return False


class EmbeddingOp(LayerOp):
    """``nn.Embedding`` of the model's token ids: its weight's columns are the neurons of a new space (N x tokens
    x embedding_dim)."""

    name, kind, modules = "Embedding", "embedding", (nn.Embedding,)
    token_input = True
    spec_types = {"Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                                               "norm_type", "scale_grad_by_freq", "sparse"))}
    in_key, out_key = "num_embeddings", "embedding_dim"

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0], const_ok=True)
        if v.space == _CONST:  # looked up with constant ids (position ids, token types): like a position embedding
            t.vals[node] = t.value(_PARAM, param=f"{node.target}.weight")
            return
        if v.space != _INPUT:
            raise UnsupportedModelError(f"{where(node, t.modules)}: an Embedding must read the model's token ids")
        t.produce(node, mod, self.kind, mod.embedding_dim, [ParamAxis(f"{node.target}.weight", 1, "out")], v,
                  spatial=False, layout="tokens")


class ParamOp(OpHandler):
    """A tensor attribute read in forward (a learned position embedding, a class token): it takes the space of the
    hidden value it is added to or concatenated with (its last axis moves with the neurons)."""

    name = "tensor attribute (position embedding, class token)"
    methods = frozenset({"expand", "expand_as", "repeat"})

    def matches(self, node, mod):
        return node.op == "get_attr" or super().matches(node, mod)

    def trace(self, t, node, mod):
        if node.op == "get_attr":
            t.vals[node] = t.value(_PARAM, param=node.target)
            return
        v = t.source(node, node.args[0], param_ok=True)
        if v.space != _PARAM:
            raise UnsupportedModelError(f"{where(node, t.modules)}: .{node.target}() of a hidden tensor is not "
                                        "supported (only of a tensor attribute, e.g. a class token)")
        t.vals[node] = v


class CatOp(OpHandler):
    """``torch.cat`` of a tensor attribute (a class token) and a hidden N x tokens x features value along the
    tokens."""

    name = "concatenation of a class token"
    functions = frozenset({torch.cat, torch.concat})

    def trace(self, t, node, mod):
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = [t.source(node, p, param_ok=True) for p in parts]
        hidden = [v for v in vals if v.space != _PARAM]
        if len(hidden) != 1 or hidden[0].layout != "tokens" or dim not in (1, -2):
            raise UnsupportedModelError(
                f"{where(node, t.modules)}: concatenation is supported for tensor attributes (class tokens) joined to "
                "one N x tokens x features hidden value along the tokens (dim 1)")
        for v in vals:
            if v.space == _PARAM:
                t.tie_param(node, v, hidden[0].space)
        t.vals[node] = hidden[0]


class LayoutOp(OpHandler):
    """Transposes that move the token and head axes of attention (N x C x T -> N x T x C after a patch embedding;
    N x T x H x d <-> N x H x T x d around attention)."""

    name = "transpose of tokens and heads"
    methods = frozenset({"transpose", "permute", "unbind"})
    functions = frozenset({torch.transpose, torch.permute, torch.unbind})
    _SWAP = {"nct": "tokens", "split": "headed", "headed": "split"}

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if node.target in ("permute", torch.permute):
            dims = tuple(node.args[1:]) if len(node.args) > 2 else tuple(node.args[1] if len(node.args) > 1 else
                                                                         node.kwargs.get("dims", ()))
            if v.layout == "packed" and dims == (2, 0, 3, 1, 4):  # parts x N x heads x tokens x d
                t.vals[node] = t.value(v.space, layout="packed-headed", heads=v.heads, parts=v.parts)
                return
            raise UnsupportedModelError(f"{where(node, t.modules)}: permute{dims} of a {_shape_name(v)} tensor is "
                                        "not supported")
        if node.target in ("unbind", torch.unbind):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if v.layout == "packed-headed" and dim == 0:
                t.vals[node] = t.value(v.space, layout="unbound", heads=v.heads, parts=v.parts)
                return
            raise UnsupportedModelError(f"{where(node, t.modules)}: unbind({dim}) of a {_shape_name(v)} tensor is "
                                        "not supported")
        dims = tuple(node.args[1:3]) if len(node.args) >= 3 else (node.kwargs.get("dim0"), node.kwargs.get("dim1"))
        if v.layout in self._SWAP and tuple(sorted(dims)) == (1, 2):
            t.vals[node] = t.value(v.space, layout=self._SWAP[v.layout], heads=v.heads)
            return
        if v.layout == "tokens" and tuple(sorted(dims)) == (0, 1):  # T x N x C <-> N x T x C: features stay last
            t.vals[node] = v
            return
        raise UnsupportedModelError(f"{where(node, t.modules)}: transpose{dims} of a "
                                    f"{_shape_name(v)} tensor is not "
                                    "supported")


class AttentionOp(OpHandler):
    """``F.scaled_dot_product_attention(q, k, v)`` over N x heads x tokens x d values: the query and key rows form
    one space (a query and its key move together), the value rows another; heads move as wholes (see
    :class:`~hetfuse.graph.spec.Attention`). The output lives in the value space."""

    name = "scaled dot-product attention"
    functions = frozenset({F.scaled_dot_product_attention})
    starts_layer = True

    def trace(self, t, node, mod):
        q, k, v = (t.source(node, a) for a in node.args[:3])
        if node.kwargs.get("attn_mask") is not None or len(node.args) > 3:
            raise UnsupportedModelError(f"{where(node, t.modules)}: attention with a mask is not supported")
        if any(x.layout != "headed" for x in (q, k, v)) or len({q.heads, k.heads, v.heads}) != 1:
            raise UnsupportedModelError(f"{where(node, t.modules)}: attention needs queries, keys and values split "
                                        "into the same number of heads (N x heads x tokens x d)")
        if len({t.find(q.space), t.find(k.space), t.find(v.space)}) != 3:
            raise UnsupportedModelError(f"{where(node, t.modules)}: queries, keys and values must come from three "
                                        "different layers")
        if t.spaces[t.find(q.space)].size != t.spaces[t.find(k.space)].size:
            raise UnsupportedModelError(f"{where(node, t.modules)}: queries and keys of different sizes")
        qk = t.merge(node, q.space, k.space)
        t.consumers.setdefault(qk, [])  # read by the attention itself, through no parameter
        t.attention.append((qk, v.space, q.heads))
        t.vals[node] = t.value(v.space, layout="headed", heads=v.heads)


class FunctionalLinearOp(OpHandler):
    """``F.linear(x, W, b)`` with tensor attributes (or row segments of them: the q, k and v parts of a packed
    ``in_proj_weight``) as weight and bias: like a Linear layer, it consumes its input's space through ``W``'s
    columns and produces a new space of ``W``'s rows (tied as a segment of the packed tensor)."""

    name = "F.linear of tensor attributes"
    functions = frozenset({F.linear})

    def trace(self, t, node, mod):
        x = t.source(node, node.args[0])
        w = t.source(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"), param_ok=True)
        b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        b = t.source(node, b_arg, param_ok=True) if b_arg is not None else None
        if w.space != _PARAM or (b is not None and b.space != _PARAM):
            raise UnsupportedModelError(f"{where(node, t.modules)}: F.linear whose weight is a hidden value")
        if x.spatial or x.layout not in (None, "tokens") or x.space in (_INPUT, _META, _PARAM):
            raise UnsupportedModelError(f"{where(node, t.modules)}: F.linear of a {_shape_name(x)} tensor")
        state = t.gm.state_dict()
        weight = state[w.param]
        rows = w.length if w.length is not None else weight.shape[0]
        t.consume(node, x, w.param, weight.shape[1])
        members = [ParamAxis(w.param, 0, "out", offset=w.offset)]
        if b is not None:
            members.append(ParamAxis(b.param, 0, "out", offset=b.offset))
        t.produce_space(node, "linear", rows, members, layout="tokens" if x.layout == "tokens" else None)
        for v in (w, b):
            if v is not None:
                t.record_attribute(node, v.param, x.space, t.vals[node].space)


class TokenPoolOp(OpHandler):
    """Pooling over positions by ``mean``: over the tokens of N x tokens x features (dim 1), or over the positions
    of a conv map (dims 2, 3); the result is flat (N x features)."""

    name = "mean over tokens or positions"
    methods = frozenset({"mean"})
    functions = frozenset({torch.mean})

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        ok = (v.layout == "tokens" and dims in ((1,), (-2,))) or \
            (v.spatial and v.layout is None and tuple(sorted(dims)) in ((2, 3), (-2, -1)))
        if not ok or keep:
            raise UnsupportedModelError(f"{where(node, t.modules)}: mean over {dim!r} of a "
                                        f"{_shape_name(v)} tensor "
                                        "is not supported (the tokens, or the positions of a conv map, without "
                                        "keepdim)")
        t.vals[node] = t.value(v.space)



class ElementwiseOp(OpHandler):
    """Elementwise functions (each neuron on its own, no parameters): they pass the space through."""

    name = "elementwise activation"
    modules = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
               nn.Dropout, nn.Identity)
    functions = frozenset({F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, torch.tanh,
                           torch.sigmoid, F.hardswish, F.dropout})
    methods = frozenset({"relu", "contiguous", "tanh", "sigmoid"})
    spec_types = {"ReLU": (nn.ReLU, ("inplace",)), "ReLU6": (nn.ReLU6, ("inplace",)),
                  "Hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")),
                  "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")), "GELU": (nn.GELU, ("approximate",)),
                  "SiLU": (nn.SiLU, ("inplace",)), "Tanh": (nn.Tanh, ()), "Sigmoid": (nn.Sigmoid, ()),
                  "Hardswish": (nn.Hardswish, ("inplace",)), "Identity": (nn.Identity, ()),
                  "Dropout": (nn.Dropout, ("p", "inplace"))}

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if v.space == _META:
            raise UnsupportedModelError(f"{where(node, t.modules)}: unsupported use of a shape value")
        t.vals[node] = v


class PoolOp(OpHandler):
    name = "pooling"
    modules = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    spec_types = {"MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "return_indices",
                                               "ceil_mode")),
                  "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                               "divisor_override")),
                  "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
                  "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices"))}
    functions = frozenset({F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d})

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if not v.spatial:
            raise UnsupportedModelError(f"{where(node, t.modules)}: pooling of a flat tensor")
        out_hw = t.hw_of(node)
        if out_hw is None:
            size = getattr(mod, "output_size", None) if mod is not None else \
                (node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
            adaptive = isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or \
                node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
            if adaptive and size in (1, (1, 1), [1, 1]):
                out_hw = 1
        t.vals[node] = t.value(v.space, spatial=True, hw=out_hw)


class FlattenOp(OpHandler):
    name = "flatten / view / reshape"
    modules = (nn.Flatten,)
    spec_types = {"Flatten": (nn.Flatten, ("start_dim", "end_dim"))}
    functions = frozenset({torch.flatten})
    methods = frozenset({"view", "reshape", "flatten"})

    def trace(self, t, node, mod):
        v = t.source(node, node.args[0])
        if v.space == _META:
            raise UnsupportedModelError(f"{where(node, t.modules)}: unsupported use of a shape value")
        start = _flatten_start(node, mod)
        if v.space != _INPUT and (v.layout is not None or (v.spatial and start == 2)):
            t.vals[node] = _token_reshape(t, node, v, start)
            return
        if v.space != _INPUT and not v.spatial and node.op == "call_method" and node.target != "flatten":
            _check_flat_reshape(node, t.spaces[t.find(v.space)].size)
        out = t.value(v.space, spatial=False, block=v.block)
        if v.spatial and v.space != _INPUT:
            out.block = v.hw  # None when unknown: the consuming Linear's fan-in tells
        t.vals[node] = out


def _flatten_start(node: fx.Node, mod) -> int | None:
    """The start dim of a flatten (module, function or method); None for view/reshape."""
    if mod is not None:
        return mod.start_dim
    if node.target in ("view", "reshape"):
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0 if node.op == "call_function" else 0)


def _token_reshape(t, node: fx.Node, v, start: int | None):
    """Reshapes of token values: a conv map flattened over its positions (N x C x T), features split into heads
    (N x T x H x d) and joined back (N x T x C)."""
    size = t.spaces[t.find(v.space)].size
    if start == 2 and v.spatial:
        return t.value(v.space, layout="nct")
    if start == 2 and v.layout == "split":
        return t.value(v.space, layout="tokens")
    if start is None:
        args = list(node.args[1:])
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        meta = node.meta.get("tensor_meta")
        if v.layout == "tokens" and len(dims) == 5 and all(isinstance(d, int) and d > 0 for d in dims[2:]) and \
                dims[2] * dims[3] * dims[4] == size and size % dims[2] == 0:  # N x T x parts x heads x d
            return t.value(v.space, layout="packed", heads=dims[3], parts=dims[2])
        if v.layout == "tokens" and len(dims) == 4:
            heads = dims[2] if isinstance(dims[2], int) else (meta.shape[2] if meta is not None else None)
            if heads is None:
                raise UnsupportedModelError(f"{where(node, t.modules)}: the number of heads is a traced value; "
                                            "describe the model with an example input, or use a number")
            if heads > 0 and size % heads == 0 and (not isinstance(dims[3], int) or dims[3] in (-1, size // heads)):
                return t.value(v.space, layout="split", heads=heads)
        last = dims[-1] if dims else None
        whole = isinstance(last, fx.Node) or last in (-1, size)  # a traced size: the run itself checks it
        if v.layout in ("split", "tokens") and len(dims) == 3 and whole:
            return t.value(v.space, layout="tokens")
    raise UnsupportedModelError(f"{where(node, t.modules)}: {op_name(node, t.modules)} of a "
                                f"{_shape_name(v)} tensor "
                                f"({node.args[1:]}) is not supported; hetfuse follows splitting the features into "
                                "heads and joining them back, and flattening a conv map's positions into tokens")


def _check_flat_reshape(node: fx.Node, size: int) -> None:
    """A view/reshape of a flat hidden layer is only allowed as a no-op on (batch, features)."""
    args = list(node.args[1:])
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(dims) == 2 and (dims[1] in (-1, size)):
        return
    raise UnsupportedModelError(f"{where(node)}: reshaping a hidden layer to {tuple(dims)} is not supported")


class AddOp(OpHandler):
    """A residual addition: both operands live in one neuron space, a residual stream."""

    name = "residual addition"
    functions = frozenset({operator.add, operator.iadd, torch.add})

    def trace(self, t, node, mod):
        a, b = (t.source(node, x, param_ok=True) for x in node.args[:2])
        if (a.space == _PARAM) != (b.space == _PARAM):  # a position embedding added to a hidden value
            param, hidden = (a, b) if a.space == _PARAM else (b, a)
            if hidden.space in (_INPUT, _META):
                raise UnsupportedModelError(f"{where(node)}: a tensor attribute added to the raw input is not "
                                            "supported")
            if hidden.spatial or hidden.layout not in (None, "tokens"):
                raise UnsupportedModelError(f"{where(node)}: a tensor attribute added to a "
                                            f"{_shape_name(hidden)} tensor "
                                            "(hetfuse ties attributes along the features, the last axis)")
            t.tie_param(node, param, hidden.space)
            t.vals[node] = hidden
            return
        if _PARAM in (a.space, b.space):
            raise UnsupportedModelError(f"{where(node)}: a sum of two tensor attributes is not supported")
        if _INPUT in (a.space, b.space) or _META in (a.space, b.space):
            raise UnsupportedModelError(f"{where(node)}: addition involving the raw input or a shape value is not "
                                        "supported")
        ra = t.merge(node, a.space, b.space)
        sp = t.spaces[ra]
        sp.stream = True
        # a stream is read where it is formed: drop the read points of operands that only feed this sum (a branch's
        # last layer, a projection shortcut), keep the sum; an operand used elsewhere too is itself a point where
        # the stream is formed (a pre-activation block's input: the stem output, an earlier sum)
        for operand in node.args[:2]:
            if operand.name in sp.act_nodes and len(operand.users) == 1:
                sp.act_nodes.remove(operand.name)
        sp.act_nodes.append(node.name)
        if a.layout != b.layout:
            raise UnsupportedModelError(f"{where(node)}: a sum of a {_LAYOUTS.get(a.layout, a.layout)} and a "
                                        f"{_LAYOUTS.get(b.layout, b.layout)} tensor")
        t.vals[node] = t.value(ra, spatial=a.spatial, hw=a.hw if a.hw is not None else b.hw, layout=a.layout)


class ShapeOp(OpHandler):
    """``x.shape``, ``x.size(…)``, ``x.dim()`` and indexing into them: shape values, allowed as arguments of
    view/reshape only."""

    name = "shape query"
    methods = frozenset({"size", "dim"})
    functions = frozenset({getattr})  # x.shape (matched by matches(); listed for structural edits)

    def matches(self, node, mod):
        if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
            return True
        return node.op == "call_method" and node.target in self.methods

    def trace(self, t, node, mod):
        t.source(node, node.args[0])
        t.vals[node] = t.value(_META)


class ShapeIndexOp(OpHandler):
    name = "indexing a shape or one token"
    functions = frozenset({operator.getitem})  # (matched by matches(); listed for structural edits)

    def matches(self, node, mod):
        return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)

    def trace(self, t, node, mod):
        v = t.vals.get(node.args[0])
        index = node.args[1] if len(node.args) > 1 else None
        if v is not None and v.space == _PARAM:
            t.vals[node] = _param_segment(t, node, v, index)
            return
        if v is not None and v.layout in ("unbound", "packed-headed") and isinstance(index, int) and \
                0 <= index < v.parts:  # one part (q, k or v) of a packed projection
            part = t.split_packed(node, v.space, v.parts)[index]
            t.spaces[part].act_nodes.append(node.name)
            t.headed.add(node.name)
            t.vals[node] = t.value(part, layout="headed", heads=v.heads)
            return
        if v is not None and v.layout == "tokens" and isinstance(index, tuple) and len(index) == 2 and \
                index[0] == slice(None) and isinstance(index[1], int):
            t.vals[node] = t.value(v.space)  # one token (a class token): N x features
            return
        if v is None or v.space != _META:
            raise UnsupportedModelError(_getitem_message(node))
        t.vals[node] = t.value(_META)


def _param_segment(t, node: fx.Node, v, index):
    """``W[a:b]`` of a tensor attribute: the rows a..b of its first axis (a packed projection's q, k or v part)."""
    if not (isinstance(index, slice) and index.step in (None, 1) and v.offset is None):
        raise UnsupportedModelError(f"{where(node, t.modules)}: indexing the tensor attribute '{v.param}' with "
                                    f"{index!r}; hetfuse follows a slice of its rows (a packed projection's part)")
    rows = t.gm.state_dict()[v.param].shape[0]
    start, stop, _ = index.indices(rows)
    return t.value(_PARAM, param=v.param, offset=start, length=stop - start)


def _getitem_message(node: fx.Node) -> str:
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    axes = ["batch", "channels", "rows", "columns"]
    parts = []
    for k, item in enumerate(items):
        axis = axes[k] if k < len(axes) else f"axis {k}"
        if isinstance(item, slice) and item == slice(None):
            continue
        if isinstance(item, slice):
            parts.append(f"a step over {axis}" if item.step not in (None, 1) else f"a slice of {axis}")
        else:
            parts.append(f"an index into {axis}")
    what = "indexing with " + " and ".join(parts) if parts else "indexing a hidden tensor"
    return f"{where(node)}: {what} is not supported (function getitem, index {index!r})"


# The table, in the order the handlers are tried.
OPS: list[OpHandler] = [LinearOp(), ConvOp(), DepthwiseConvOp(), NormOp(), LayerNormOp(), EmbeddingOp(),
                        ElementwiseOp(), PoolOp(), FlattenOp(), AddOp(), ShapeOp(), ShapeIndexOp(), ParamOp(), CatOp(),
                        LayoutOp(), AttentionOp(), TokenPoolOp(), FunctionalLinearOp()]
_LAYERS: dict[str, LayerOp] = {h.kind: h for h in OPS if isinstance(h, LayerOp)}


def channelwise(kind: str) -> bool:
    """Whether layers of ModuleInfo kind ``kind`` act within their input's space (BatchNorm, depthwise conv; not a
    tensor attribute, kind ``param``)."""
    return kind != "param" and not layer_op(kind).writes_space


def handler_for(node: fx.Node, modules: dict) -> OpHandler | None:
    mod = modules.get(node.target) if node.op == "call_module" else None
    return next((h for h in OPS if h.matches(node, mod)), None)


def layer_op(kind_or_module: str | nn.Module) -> LayerOp:
    """The layer handler of a ModuleInfo kind (``"linear"``, ``"conv"``, ``"norm"``, ``"depthwise"``) or of a
    module."""
    if isinstance(kind_or_module, str):
        if kind_or_module not in _LAYERS:
            raise HetfuseError(f"no layer handler for kind {kind_or_module!r}; known: {', '.join(_LAYERS)}")
        return _LAYERS[kind_or_module]
    for h in _LAYERS.values():
        if h.accepts(kind_or_module):
            return h
    raise HetfuseError(f"no layer handler for a {type(kind_or_module).__name__}")


def spec_types() -> dict[str, tuple[type, tuple[str, ...]]]:
    """Every module type the table's handlers let structural edits record (graph.rewrite)."""
    out: dict[str, tuple[type, tuple[str, ...]]] = {}
    for h in OPS:
        out.update(h.spec_types)
    return out


def edit_functions() -> dict[str, object]:
    """``module.qualname`` -> function, for every function the table's handlers describe."""
    out = {}
    for h in OPS:
        for f in h.functions:
            mod = getattr(f, "__module__", None) or "builtins"
            if mod == "_operator":
                mod = "operator"
            out[f"{mod}.{f.__name__}"] = f
    return out


def edit_methods() -> set[str]:
    return {m for h in OPS for m in h.methods}


def supported_summary() -> str:
    return ", ".join(h.name for h in OPS if h.name) + " (Conv2d ungrouped or depthwise)"


# ------------------------------------------------------------------- predicates the depth structure reads


def _of(node: fx.Node, modules: dict, cls: type) -> bool:
    h = handler_for(node, modules)
    return isinstance(h, cls)


def is_elementwise(node: fx.Node, modules: dict) -> bool:
    return _of(node, modules, ElementwiseOp)


def is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target == "relu"


def is_nonnegative(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` is an activation whose output is never negative (ReLU, ReLU6): an identity layer followed
    by a ReLU after it is exactly the identity."""
    if is_relu(node, modules):
        return True
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU6
    return node.op == "call_function" and node.target is F.relu6


def is_layer_norm(node: fx.Node, modules: dict) -> bool:
    return _of(node, modules, LayerNormOp)


def starts_layer(node: fx.Node, modules: dict) -> bool:
    h = handler_for(node, modules)
    return h is not None and h.starts_layer


def is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in AddOp.functions
