"""A second tracer: :func:`torch.export.export` rebuilt into a torch.fx ``GraphModule`` the op table can walk.

``torch.fx.symbolic_trace`` fails on much real-world code (Hugging Face models: Python-level control flow over
configs, iteration over proxies), while ``torch.export.export`` follows the code in Python (``strict=False``) and
records every tensor operation. :func:`export_graph` exports the model and rebuilds from the exported ATen graph a
``GraphModule`` rooted at the model (its ``named_modules()`` / ``state_dict()`` keys are the model's own) in which

* an ATen op that applies a parametric leaf module (``aten.linear`` with a Linear's weight and bias, ``conv2d``,
  ``layer_norm``, ``rms_norm``, ``embedding``, ``batch_norm``) is a ``call_module`` node on that module; the module
  is the one whose parameters are the op's (the innermost module of the node's ``nn_module_stack`` first, then
  the owner of the weight's name in the export signature), and the op's other arguments must be the module's
  configuration (conv stride/padding/dilation/groups, norm eps and shape, embedding padding index), else
  :class:`~hetfuse.errors.UnsupportedModelError`;
* a parameter, buffer or constant used directly (a class token, position embeddings, ``position_ids``) is a
  ``get_attr`` node with its state-dict name;
* other ATen ops are the torch-level functions and methods user code writes (:data:`ATEN_TO_TORCH`), views that
  change nothing (dropout in eval mode, clone, contiguous, alias, a full slice, a reshape to the same shape) are
  dropped, and anything else stays a ``call_function`` on the ATen op (``describe`` names it in its error).

In-place ops (``out += shortcut``, ``nn.ReLU(inplace=True)``) become their functional forms when nothing reads the
mutated tensor (or a view of it) afterwards, else they stay in place. Every rebuilt node keeps the exported node's
``nn_module_stack`` (module paths with their classes, as ``symbolic_trace`` records them), which
:func:`hetfuse.graph.ops.module_path` reads for error messages.

The export is done on the default (training) IR, not decomposed: it keeps the composite ops at the granularity
of ``nn`` modules (``aten.linear``, ``aten.conv2d``, ``aten.layer_norm``, ``aten.batch_norm``,
``aten.scaled_dot_product_attention``, ``aten.flatten``), which map one to one onto modules and the functions the
op table knows. ``run_decompositions`` to core ATen would split them (``linear`` into ``t`` + ``addmm``,
``layer_norm`` into ``native_layer_norm`` and ``getitem``, attention into a CPU kernel or matmul/softmax) and even
an empty decomposition table turns ``flatten``/``reshape`` into ``view`` and ``batch_norm`` into
``_native_batch_norm_legit_no_training``; its one gain, functionalisation, is done here on the few in-place ops.

The batch axis is exported as dynamic (``Dim.AUTO``: export keeps it symbolic where the model allows and
specialises it otherwise), so the rebuilt module runs on any batch size, as the model does; sizes it reads from the
input become ``x.shape[0]`` nodes. Every other shape is specialised to the example's: the GraphModule is valid for
inputs of the example's shape (any batch size) only.
"""

from __future__ import annotations

import operator
import sysconfig
import traceback
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import UnsupportedModelError

__all__ = ["ATEN_TO_TORCH", "export_graph"]

_A = torch.ops.aten
_INT_MAX = 2**62  # an ``end`` at or past this is "to the end" (export writes sys.maxsize)

# What each ATen op becomes (documentation; the translation is in _Rebuild). "module" ops become call_module nodes.
ATEN_TO_TORCH: dict[str, str] = {
    "aten.linear": "call_module nn.Linear; F.linear when the weights are not a Linear's own",
    "aten.conv2d": "call_module nn.Conv2d (stride, padding, dilation, groups checked)",
    "aten.layer_norm": "call_module nn.LayerNorm (normalized_shape, eps checked)",
    "aten.rms_norm": "call_module nn.RMSNorm (normalized_shape, eps checked)",
    "aten.embedding": "call_module nn.Embedding (padding_idx checked)",
    "aten.batch_norm": "call_module nn.BatchNorm* (eps, training checked)",
    "aten.add.Tensor": "operator.add (alpha 1)",
    "aten.gelu": "F.gelu (approximate kept)",
    "aten.relu": "torch.relu",
    "aten.silu": "F.silu",
    "aten.tanh": "torch.tanh",
    "aten.sigmoid": "torch.sigmoid",
    "aten.hardtanh": "F.relu6 for (0, 6), else F.hardtanh",
    "aten.relu6": "F.relu6",
    "aten.leaky_relu": "F.leaky_relu",
    "aten.hardswish": "F.hardswish",
    "aten.scaled_dot_product_attention": "F.scaled_dot_product_attention (q, k, v; kwargs only when not default)",
    "aten.view / aten.reshape / aten._unsafe_view": "method .reshape(*shape) (-1 resolved; dropped when a no-op)",
    "aten.transpose.int": "method .transpose(d0, d1)",
    "aten.permute": "method .permute(*dims)",
    "aten.expand": "method .expand(*sizes)",
    "aten.cat": "torch.cat(tensors, dim)",
    "aten.mean.dim": "method .mean(dim[, keepdim=True])",
    "aten.flatten.using_ints": "torch.flatten(x, start_dim[, end_dim])",
    "aten.select.int": "operator.getitem, x[:, ..., i]",
    "aten.slice.Tensor": "operator.getitem, x[:, ..., a:b:c] (dropped when it takes everything)",
    "aten.sym_size.int": "getattr(x, 'shape')[d]",
    "aten.max_pool2d / avg_pool2d / adaptive_avg_pool2d": "F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d",
    "aten.dropout (eval) / clone / contiguous / alias": "dropped (the input passed through)",
    "in-place ops (add_, relu_, hardtanh_, ...)": "their functional forms when no later reader sees the mutation",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _user_frame(exc: BaseException) -> str:
    """`` at file:line (code)`` of the innermost frame of the failure outside torch, hetfuse and the Python
    standard library, where known (the line of the model's code that export could not follow)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/hetfuse/" not in f.filename and not f.filename.startswith(stdlib)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export with a dynamic batch axis where the model allows it, else with every size fixed."""
    if isinstance(example, torch.Tensor) and example.dim() > 0 and example.shape[0] > 1:
        try:
            return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},),
                                       strict=False)
        except Exception:  # retried below with every size fixed; that attempt's error is the one reported
            pass
    try:
        return torch.export.export(model, (example,), strict=False)
    except Exception as exc:
        raise UnsupportedModelError(f"torch.export refused {type(model).__name__}{_user_frame(exc)} "
                                    f"({_first_line(exc)}); hetfuse describes a model through torch.fx or "
                                    "torch.export") from exc


def export_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Export ``model`` (in eval mode) on ``example`` with ``torch.export`` and rebuild the result as a torch.fx
    ``GraphModule`` rooted at ``model`` whose nodes are the modules and torch functions the op table of
    :mod:`hetfuse.graph.ops` describes (see the module docstring). The GraphModule computes what the model computes
    in eval mode, for inputs shaped like ``example`` (any batch size where the model allows it). Pass it to
    :func:`hetfuse.graph.describe`, which takes a GraphModule as its own trace.

    Raises :class:`~hetfuse.errors.UnsupportedModelError` when torch.export refuses the model, when the model
    mutates its state or returns something other than tensors (export a wrapper returning the tensor you need, e.g.
    ``model(x).logits``), or when a module's parameters are applied other than as the module applies them.
    """
    was = model.training
    model.eval()
    try:
        ep = _export(model, example)
        gm = _Rebuild(model, ep).run()
        _drop_trivial_masks(gm, example)
    finally:
        model.train(was)
    gm.training = was
    return gm


def _drop_trivial_masks(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Remove the ``attn_mask`` of attention calls where it masks nothing: computed from no input data (only the
    input's shape: Hugging Face builds an all-true mask from ``arange`` even without padding) and, on the example,
    all true (boolean) or all zero (additive)."""
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention
             and isinstance(n.kwargs.get("attn_mask"), fx.Node)]
    if not calls:
        return
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    shape_only = _shape_nodes(graph)

    def data_dependent(node: fx.Node, seen: set) -> bool:
        if node in seen or node in shape_only:
            return False
        seen.add(node)
        return node is placeholder or any(data_dependent(p, seen) for p in node.all_input_nodes)

    masks = {n.kwargs["attn_mask"] for n in calls}
    candidates = {m for m in masks if not data_dependent(m, set())}
    if not candidates:
        return
    values: dict[fx.Node, torch.Tensor] = {}

    class _Read(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in candidates:
                values[n] = out
            return out

    with torch.no_grad():
        _Read(gm).run(example[:2])
    trivial = {m for m, v in values.items() if isinstance(v, torch.Tensor) and
               (bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all()))}
    if not trivial:
        return
    for n in calls:
        if n.kwargs["attn_mask"] in trivial:
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "attn_mask"}
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _shape_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that read only the input's shape (``x.shape``, ``x.shape[0]``): what they compute is no input data."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        shape = n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape"
        index = n.op == "call_function" and n.target is operator.getitem and bool(n.args) and n.args[0] in out
        size = n.op == "call_method" and n.target in ("size", "dim")
        if shape or index or size:
            out.add(n)
    return out


def _schema_args(node: fx.Node) -> dict:
    """An ATen node's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _pair(v) -> tuple:
    if isinstance(v, (list, tuple)):
        v = tuple(v)
        return v * 2 if len(v) == 1 else v
    return (v, v)


def _aliases_input(node: fx.Node) -> bool:
    """Whether ``node``'s output is a view of its first argument (a view op, an in-place op, or an item of a list
    of views)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _aliases_input(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.returns and schema.returns[0].alias_info is not None
                and schema.arguments and schema.arguments[0].alias_info is not None)


def _functional_of(op) -> object | None:
    """The functional overload of an in-place ATen op (``aten.add_.Tensor`` -> ``aten.add.Tensor``)."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_") or not schema.arguments:
        return None
    info = schema.arguments[0].alias_info
    if info is None or not info.is_write:
        return None
    packet = getattr(_A, name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _same_shape(a, b) -> bool:
    sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(
        str(x) == str(y) for x, y in zip(sa, sb, strict=True))


_PASS = {_A.clone.default, _A.contiguous.default, _A.alias.default}
_DROPOUTS = {_A.dropout.default, _A.feature_dropout.default, _A.alpha_dropout.default,
             _A.feature_alpha_dropout.default}
_RESHAPES = {_A.view.default, _A.reshape.default, _A._unsafe_view.default}
_SIMPLE: dict[object, Callable] = {
    _A.relu.default: torch.relu, _A.silu.default: F.silu, _A.tanh.default: torch.tanh,
    _A.sigmoid.default: torch.sigmoid, _A.relu6.default: F.relu6, _A.hardswish.default: F.hardswish,
}
_ASSERTS = {_A._assert_tensor_metadata.default, _A._assert_scalar.default}


class _Rebuild:
    """One rebuild of an exported program into a GraphModule rooted at ``model``."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram):
        self.model, self.ep = model, ep
        self.modules = dict(model.named_modules())
        self.graph = fx.Graph()
        self.env: dict[fx.Node, object] = {}
        self.attrs: dict[str, tuple[torch.Tensor, bool]] = {}  # get_attr target -> (tensor, persistent)
        self.attr_nodes: dict[str, fx.Node] = {}
        self.module_targets: list[str] = []
        self.lifted: dict[str, tuple[str, torch.Tensor, bool]] = {}  # placeholder name -> (target, tensor, persistent)
        self.shapes: dict[fx.Node, fx.Node] = {}
        self.order = {n: i for i, n in enumerate(ep.graph.nodes)}
        self.kept_inplace: set[fx.Node] = set()

    # ------------------------------------------------------------------ inputs, attributes, naming

    def where(self, node: fx.Node) -> str:
        stack = self.stack(node)
        if stack:
            path, cls = list(stack.values())[-1]
            return f"{path} ({getattr(cls, '__name__', cls)}), node '{node.name}'"
        return f"node '{node.name}'"

    def stack(self, node: fx.Node) -> dict | None:
        """The node's ``nn_module_stack`` with the model's classes (export records their names) and without the
        root entry (symbolic_trace records none)."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        out = {}
        for key, (path, cls) in stack.items():
            if not path or str(path).startswith("_empty_nn_module_stack"):
                continue
            mod = self.modules.get(path)
            out[key] = (path, type(mod) if mod is not None else cls)
        return out or None

    def copy_meta(self, new: fx.Node, src: fx.Node) -> fx.Node:
        stack = self.stack(src)
        if stack:
            new.meta["nn_module_stack"] = stack
        if "stack_trace" in src.meta:
            new.meta["stack_trace"] = src.meta["stack_trace"]
        return new

    def inputs(self) -> None:
        users = []
        constants = 0
        for spec in self.ep.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind == InputKind.USER_INPUT:
                users.append(name)
            elif spec.kind == InputKind.PARAMETER:
                self.lifted[name] = (spec.target, self.model.get_parameter(spec.target), True)
            elif spec.kind == InputKind.BUFFER:
                self.lifted[name] = (spec.target, self.model.get_buffer(spec.target), spec.persistent is not False)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                tensor = self.ep.constants[spec.target]
                target = spec.target if self._resolves(spec.target, tensor) else f"_export_constant_{constants}"
                constants += 1
                self.lifted[name] = (target, tensor, False)
            else:
                raise UnsupportedModelError(f"{type(self.model).__name__}: torch.export lifted a {spec.kind.name} "
                                            f"input '{spec.target}' (a script object or side effect); hetfuse "
                                            "describes models of tensors only")
        if len(users) != 1:
            raise UnsupportedModelError(f"{type(self.model).__name__}: the exported program takes {len(users)} "
                                        "inputs; hetfuse describes models of one input tensor")

    def _resolves(self, target: str, tensor: torch.Tensor) -> bool:
        obj = self.model
        for item in target.split("."):
            obj = getattr(obj, item, None)
            if obj is None:
                return False
        return obj is tensor

    def value(self, arg, consumer: fx.Node):
        """The rebuilt value of an exported argument (nested lists and slices mapped)."""
        def one(n: fx.Node):
            if n in self.env:
                return self.env[n]
            if n.name in self.lifted:
                return self.get_attr(n.name, consumer)
            raise UnsupportedModelError(f"{self.where(consumer)}: unknown input {n.name!r}")
        return fx.node.map_arg(arg, one)

    def get_attr(self, placeholder: str, consumer: fx.Node) -> fx.Node:
        target, tensor, persistent = self.lifted[placeholder]
        if target not in self.attr_nodes:
            self.attrs[target] = (tensor, persistent)
            self.attr_nodes[target] = self.copy_meta(self.graph.get_attr(target), consumer)
        return self.attr_nodes[target]

    def tensor_of(self, arg) -> torch.Tensor | None:
        """The model tensor behind a lifted placeholder argument (None for anything else)."""
        if isinstance(arg, fx.Node) and arg.name in self.lifted:
            return self.lifted[arg.name][1]
        return None

    # ------------------------------------------------------------------ emission

    def emit(self, op: str, target, args: tuple, kwargs: dict | None, src: fx.Node, *, name: str | None = None):
        new = self.graph.create_node(op, target, args, kwargs or {}, name=name)
        return self.copy_meta(new, src)

    def fn(self, target, src: fx.Node, *args, **kwargs):
        return self.emit("call_function", target, args, kwargs, src, name=src.name)

    def method(self, target: str, src: fx.Node, *args, **kwargs):
        return self.emit("call_method", target, args, kwargs, src, name=src.name)

    def shape_of(self, x: fx.Node, src: fx.Node) -> fx.Node:
        if x not in self.shapes:
            self.shapes[x] = self.emit("call_function", getattr, (self.value(x, src), "shape"), None, src)
        return self.shapes[x]

    # ------------------------------------------------------------------ in-place ops

    def _alias_closure(self, start: fx.Node) -> set[fx.Node]:
        seen, todo = {start}, [start]
        while todo:
            a = todo.pop()
            for u in a.users:
                if u not in seen and _aliases_input(u) and u.args and u.args[0] is a:
                    seen.add(u)
                    todo.append(u)
        return seen

    def _inplace_safe(self, node: fx.Node) -> bool:
        """Whether ``node`` (an in-place op) may become functional: no later node reads the tensor it mutates (or
        a view of it) other than through its result."""
        root = node.args[0]
        if not isinstance(root, fx.Node):
            return False
        while _aliases_input(root) and isinstance(root.args[0], fx.Node):
            root = root.args[0]
        if root.op == "placeholder":
            return False  # an input, parameter or buffer of the model
        derived = self._alias_closure(node)
        at = self.order[node]
        for a in self._alias_closure(root) - derived:
            if any(u not in derived and self.order[u] > at for u in a.users):
                return False
        return True

    def _feeds_kept_inplace(self, node: fx.Node) -> bool:
        return bool(self._alias_closure(node) & self.kept_inplace)

    # ------------------------------------------------------------------ the walk

    def run(self) -> fx.GraphModule:
        self.inputs()
        for node in self.ep.graph.nodes:
            if node.op == "call_function" and _functional_of(node.target) is not None and \
                    not self._inplace_safe(node):
                self.kept_inplace.add(node)
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name not in self.lifted:
                    self.env[node] = self.copy_meta(self.graph.placeholder(node.name), node)
            elif node.op == "output":
                self.output(node)
            elif node.op == "call_function":
                if isinstance(node.target, torch._ops.HigherOrderOperator):
                    raise UnsupportedModelError(f"{self.where(node)}: torch.export recorded {node.target.name()} "
                                                "(control flow or a grad-mode region); hetfuse describes straight-line "
                                                "models")
                self.env[node] = self.translate(node)
            else:
                raise UnsupportedModelError(f"{self.where(node)}: exported node of kind {node.op} ({node.target}) "
                                            "is not supported (control flow or a submodule call)")
        return self.module()

    def output(self, node: fx.Node) -> None:
        flat = node.args[0]
        values = []
        for spec, item in zip(self.ep.graph_signature.output_specs, flat, strict=True):
            if spec.kind != OutputKind.USER_OUTPUT:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__}: in eval mode the model still updates '{spec.target}' "
                    f"({spec.kind.name}); hetfuse describes models without state updates")
            values.append(self.value(item, node) if isinstance(item, fx.Node) else getattr(spec.arg, "value", item))
        out_spec = self.ep.call_spec.out_spec
        if out_spec.is_leaf():
            result = values[0]
        elif out_spec.type in (tuple, list, dict) and all(c.is_leaf() for c in out_spec.children()):
            result = torch.utils._pytree.tree_unflatten(values, out_spec)
        else:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} returns a {getattr(out_spec.type, '__name__', out_spec.type)}; export a "
                "module that returns the tensor to describe (e.g. a wrapper whose forward returns model(x).logits)")
        self.graph.output(result)

    def module(self) -> fx.GraphModule:
        # drop what the output does not need (a pooler whose result is not returned); module calls are pure here
        self.graph.eliminate_dead_code(lambda n: n.op != "call_module" and n.is_impure())
        gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(self.model).__name__)
        used = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for target in sorted(dict.fromkeys(t for t in self.module_targets if t in used), key=lambda t: t.count(".")):
            self._install(gm, target, self.model.get_submodule(target))
        for target, (tensor, persistent) in self.attrs.items():
            if target in used:
                self._install(gm, target, tensor, persistent)
        gm.graph = self.graph
        gm.graph.lint()
        return gm

    def _install(self, gm: nn.Module, target: str, obj, persistent: bool = True) -> None:
        """Put ``obj`` at ``target`` in ``gm``: the model's own modules where the path reaches one already there,
        plain modules standing for the parents otherwise."""
        *prefix, field = target.split(".")
        to, src = gm, self.model
        for item in prefix:
            src = getattr(src, item, None) if src is not None else None
            t = to._modules.get(item)
            if t is not None and t is src:
                return  # the model's module, already installed, holds obj
            if t is None:
                t = nn.Module()
                to.add_module(item, t)
            to = t
        if isinstance(obj, nn.Module):
            to.add_module(field, obj)
        elif isinstance(obj, nn.Parameter):
            to.register_parameter(field, obj)
        else:
            to.register_buffer(field, obj, persistent=persistent)

    # ------------------------------------------------------------------ translation of one ATen node

    def translate(self, node: fx.Node):
        target = node.target
        if target in _ASSERTS:
            return None
        if node in self.kept_inplace:
            return self.keep_as(node, node.target)
        functional = _functional_of(target)
        if functional is not None:
            return self._translate(node, functional)
        return self._translate(node, target)

    def _translate(self, node: fx.Node, op):
        if op is operator.getitem or not isinstance(op, torch._ops.OpOverload):
            return self.emit("call_function", op, self.value(node.args, node), self.value(node.kwargs, node), node,
                             name=node.name)
        layer = {_A.linear.default: self._linear, _A.conv2d.default: self._conv2d, _A.conv2d.padding: self._conv2d,
                 _A.layer_norm.default: self._layer_norm, _A.rms_norm.default: self._rms_norm,
                 _A.embedding.default: self._embedding, _A.batch_norm.default: self._batch_norm}.get(op)
        a = _schema_args(node)
        if layer is not None:
            got = layer(node, a)
            return got if got is not None else self.keep_as(node, op)
        v = lambda x: self.value(x, node)  # noqa: E731
        first = next(iter(a.values()))
        if op in _PASS or (op in _DROPOUTS and (not a.get("train") or a.get("p") == 0)):
            if self._feeds_kept_inplace(node):  # a copy that an in-place op mutates: not a no-op
                return self.keep_as(node, op)
            return v(first)
        if op == _A.add.Tensor and a["alpha"] == 1:
            return self.fn(operator.add, node, v(a["self"]), v(a["other"]))
        if op in _SIMPLE:
            return self.fn(_SIMPLE[op], node, v(first))
        if op == _A.gelu.default:
            kw = {"approximate": a["approximate"]} if a["approximate"] != "none" else {}
            return self.fn(F.gelu, node, v(a["self"]), **kw)
        if op == _A.hardtanh.default:
            if (a["min_val"], a["max_val"]) == (0, 6):
                return self.fn(F.relu6, node, v(a["self"]))
            return self.fn(F.hardtanh, node, v(a["self"]), a["min_val"], a["max_val"])
        if op == _A.leaky_relu.default:
            return self.fn(F.leaky_relu, node, v(a["self"]), a["negative_slope"])
        if op == _A.scaled_dot_product_attention.default:
            defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
            kw = {k: v(a[k]) for k, d in defaults.items() if a[k] is not None and a[k] != d}
            return self.fn(F.scaled_dot_product_attention, node, v(a["query"]), v(a["key"]), v(a["value"]), **kw)
        if op in _RESHAPES:
            return self._reshape(node, op, a)
        if op == _A.transpose.int:
            return self.method("transpose", node, v(a["self"]), a["dim0"], a["dim1"])
        if op == _A.permute.default:
            return self.method("permute", node, v(a["self"]), *a["dims"])
        if op == _A.expand.default and not a["implicit"]:
            return self.method("expand", node, v(a["self"]), *v(a["size"]))
        if op == _A.cat.default:
            return self.fn(torch.cat, node, v(a["tensors"]), a["dim"])
        if op == _A.mean.dim and a["dim"]:
            dim = a["dim"]
            dim = dim[0] if len(dim) == 1 else tuple(dim)
            kw = {"keepdim": True} if a["keepdim"] else {}
            if a["dtype"] is not None:
                kw["dtype"] = a["dtype"]
            return self.method("mean", node, v(a["self"]), dim, **kw)
        if op == _A.flatten.using_ints:
            extra = (a["end_dim"],) if a["end_dim"] != -1 else ()
            return self.fn(torch.flatten, node, v(a["self"]), a["start_dim"], *extra)
        if op == _A.select.int:
            return self._index(node, a["self"], a["dim"], a["index"])
        if op == _A.slice.Tensor:
            return self._slice(node, a)
        if op == _A.sym_size.int:
            return self.fn(operator.getitem, node, self.shape_of(a["self"], node), a["dim"])
        if op == _A.max_pool2d.default:
            return self.fn(F.max_pool2d, node, v(a["self"]), a["kernel_size"], a["stride"] or None, a["padding"],
                           a["dilation"], a["ceil_mode"])
        if op == _A.avg_pool2d.default:
            return self.fn(F.avg_pool2d, node, v(a["self"]), a["kernel_size"], a["stride"] or None, a["padding"],
                           a["ceil_mode"], a["count_include_pad"], a["divisor_override"])
        if op == _A.adaptive_avg_pool2d.default:
            return self.fn(F.adaptive_avg_pool2d, node, v(a["self"]), a["output_size"])
        return self.keep_as(node, op)

    def keep_as(self, node: fx.Node, op):
        """``op`` on the node's arguments, as an ATen call (describe names it when it is not supported)."""
        return self.emit("call_function", op, self.value(node.args, node), self.value(node.kwargs, node), node,
                         name=node.name)

    def _rank(self, node: fx.Node) -> int | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return val.dim() if isinstance(val, torch.Tensor) else None

    def _reshape(self, node: fx.Node, op, a: dict):
        x = a["self"]
        shape = list(a["size"] if "size" in a else a["shape"])
        out = node.meta.get("val")
        if isinstance(x, fx.Node) and _same_shape(x.meta.get("val"), out) and not self._feeds_kept_inplace(node):
            return self.value(x, node)  # a reshape to the same shape changes nothing
        if out is not None and -1 in shape and len(out.shape) == len(shape):
            k = shape.index(-1)
            if isinstance(out.shape[k], int):
                shape[k] = int(out.shape[k])
        return self.method("reshape", node, self.value(x, node), *self.value(shape, node))

    def _index(self, node: fx.Node, x, dim: int, index):
        rank = self._rank(x)
        if dim < 0:
            if rank is None:
                return self.keep_as(node, node.target)
            dim += rank
        item = index if dim == 0 else (slice(None),) * dim + (index,)
        return self.fn(operator.getitem, node, self.value(x, node), self.value(item, node))

    def _slice(self, node: fx.Node, a: dict):
        x, dim, start, end, step = a["self"], a["dim"], a["start"], a["end"], a["step"]
        start = None if start == 0 else start
        end = None if isinstance(end, int) and end >= _INT_MAX else end
        step = None if step == 1 else step
        if start is None and end is None and step is None:
            return self.value(x, node)  # takes everything: a view of the whole tensor
        rank = self._rank(x)
        if dim < 0:
            if rank is None:
                return self.keep_as(node, node.target)
            dim += rank
        item = slice(start, end, step)
        item = item if dim == 0 else (slice(None),) * dim + (item,)
        return self.fn(operator.getitem, node, self.value(x, node), self.value(item, node))

    # ------------------------------------------------------------------ parametric layers

    def _layer(self, node: fx.Node, types: tuple[type, ...],
               tensors: dict[str, object]) -> tuple[str, nn.Module] | None:
        """The module whose tensors are ``tensors`` (attribute -> the op's argument): the innermost module of the
        node's stack first, then the owners of the tensors' names. None when no module of ``types`` applies them
        all; UnsupportedModelError when one holds the weight but the op's other tensors are not its own."""
        candidates = []
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            candidates.append(list(stack.values())[-1][0])
        for arg in tensors.values():
            if isinstance(arg, fx.Node) and arg.name in self.lifted:
                candidates.append(self.lifted[arg.name][0].rpartition(".")[0])
        holder = None
        for path in dict.fromkeys(candidates):
            mod = self.modules.get(path) if path else None  # (a call_module node cannot name the root)
            if not isinstance(mod, types):
                continue
            own = {k: getattr(mod, k, None) for k in tensors}
            got = {k: self.tensor_of(arg) if arg is not None else None for k, arg in tensors.items()}
            if any(arg is not None and got[k] is None for k, arg in tensors.items()):
                return None  # a computed tensor: not a module's own call
            if all(own[k] is got[k] for k in tensors):
                return path, mod
            if any(got[k] is not None and own[k] is got[k] for k in tensors):
                holder = (path, mod, [k for k in tensors if own[k] is not got[k]])
        if holder is not None:
            path, mod, diff = holder
            raise UnsupportedModelError(
                f"{self.where(node)}: {node.target} applies tensors of '{path}' ({type(mod).__name__}) but its "
                f"{', '.join(diff)} {'is' if len(diff) == 1 else 'are'} not the module's; hetfuse follows layers "
                "applied through their modules")
        return None

    def _check(self, node: fx.Node, path: str, mod: nn.Module, what: str, used, own) -> None:
        if used != own:
            raise UnsupportedModelError(
                f"{self.where(node)}: {node.target} applies '{path}' ({type(mod).__name__}) with {what} {used!r} but "
                f"the module's {what} is {own!r}; hetfuse follows layers applied through their modules")

    def call_module(self, node: fx.Node, path: str, x) -> fx.Node:
        self.module_targets.append(path)
        return self.emit("call_module", path, (self.value(x, node),), None, node)

    def _linear(self, node, a):
        found = self._layer(node, (nn.Linear,), {"weight": a["weight"], "bias": a["bias"]})
        if found:
            return self.call_module(node, found[0], a["input"])
        v = lambda x: self.value(x, node)  # noqa: E731
        extra = (v(a["bias"]),) if a["bias"] is not None else ()
        return self.fn(F.linear, node, v(a["input"]), v(a["weight"]), *extra)  # weights not a Linear's own

    def _conv2d(self, node, a):
        found = self._layer(node, (nn.Conv2d,), {"weight": a["weight"], "bias": a["bias"]})
        if not found:
            return None
        path, mod = found
        padding = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"])
        own_padding = mod.padding if isinstance(mod.padding, str) else _pair(mod.padding)
        if mod.padding_mode != "zeros" and own_padding not in ("valid", (0, 0)):
            return None  # the module pads its input itself (aten.pad, then a padding-free conv): kept as ATen ops
        self._check(node, path, mod, "stride", _pair(a["stride"]), _pair(mod.stride))
        self._check(node, path, mod, "padding", padding, own_padding)
        self._check(node, path, mod, "dilation", _pair(a["dilation"]), _pair(mod.dilation))
        self._check(node, path, mod, "groups", a["groups"], mod.groups)
        return self.call_module(node, path, a["input"])

    def _layer_norm(self, node, a):
        found = self._layer(node, (nn.LayerNorm,), {"weight": a["weight"], "bias": a["bias"]})
        if not found:
            return None
        path, mod = found
        self._check(node, path, mod, "normalized_shape", tuple(a["normalized_shape"]), tuple(mod.normalized_shape))
        self._check(node, path, mod, "eps", a["eps"], mod.eps)
        return self.call_module(node, path, a["input"])

    def _rms_norm(self, node, a):
        found = self._layer(node, (nn.RMSNorm,), {"weight": a["weight"]})
        if not found:
            return None
        path, mod = found
        self._check(node, path, mod, "normalized_shape", tuple(a["normalized_shape"]), tuple(mod.normalized_shape))
        self._check(node, path, mod, "eps", a["eps"], mod.eps)
        return self.call_module(node, path, a["input"])

    def _embedding(self, node, a):
        found = self._layer(node, (nn.Embedding,), {"weight": a["weight"]})
        if not found:
            return None
        path, mod = found
        if mod.max_norm is not None:
            raise UnsupportedModelError(f"{self.where(node)}: Embedding '{path}' renormalises its rows (max_norm) in "
                                        "place; hetfuse describes embeddings without max_norm")
        self._check(node, path, mod, "padding_idx", a["padding_idx"], -1 if mod.padding_idx is None else
                    mod.padding_idx)
        self._check(node, path, mod, "scale_grad_by_freq", a["scale_grad_by_freq"], mod.scale_grad_by_freq)
        self._check(node, path, mod, "sparse", a["sparse"], mod.sparse)
        return self.call_module(node, path, a["indices"])

    def _batch_norm(self, node, a):
        found = self._layer(node, (nn.modules.batchnorm._BatchNorm,),
                            {"weight": a["weight"], "bias": a["bias"], "running_mean": a["running_mean"],
                             "running_var": a["running_var"]})
        if not found:
            return None
        path, mod = found
        self._check(node, path, mod, "eps", a["eps"], mod.eps)
        self._check(node, path, mod, "training", a["training"], mod.running_mean is None and mod.running_var is None)
        return self.call_module(node, path, a["input"])
