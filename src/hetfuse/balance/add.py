"""Balancing by adding function-preserving units to the shallower network (CLAFusion §3.2, "add").

* After a layer unit (Linear or Conv2d [+ BatchNorm] + ReLU): an identity layer of the same kind — weight
  I (a conv: 3×3 kernel with centre tap 1), zero bias where the unit has a bias — then, where the unit has a
  BatchNorm, an identity BatchNorm, then a ReLU. The unit's output is non-negative, so ReLU(I·x) = x.
  The identity BatchNorm carries the statistics of its own input on the repair samples, computed as the
  BN reset computes them (running mean μ, variance v, weight √(v + ε), bias μ): it is the identity in eval
  mode, and recomputing its statistics on the same data (the BN reset) leaves it one.
* Before the first unit of a group (alignment a(0) > 0): the same on the group's input; exact when that
  input is non-negative (not on a network's raw input: a warning says so).
* In a residual stage: a copy of one of the network's blocks with an identity shortcut whose branch
  outputs exactly zero (every weight and bias 0, BatchNorms neutral), so the block is the identity on its
  non-negative input.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.groups import Unit, residual_blocks
from ..graph.ops import layer_op
from ..graph.rewrite import ParamHolder, apply_edit, editable_copy, fresh_prefix, module_spec, node_spec
from ..graph.spec import INPUT
from ..registry import register
from .base import Balancer

__all__ = ["AddUnits", "calibrate_identity_norms", "identity_layer", "identity_norm", "zero_branch"]


def identity_layer(template: nn.Module, width: int) -> nn.Module:
    """A width → width layer of the template's kind that is the identity (a Linear, a 3×3 Conv2d with padding 1),
    made by the template's handler in the op table."""
    return layer_op(template).identity(template, width)


def identity_norm(template: nn.modules.batchnorm._BatchNorm, width: int) -> nn.Module:
    """A BatchNorm like ``template`` (``width`` channels) that is the identity in eval mode: running mean 0 and
    variance 1 − eps, weight 1, bias 0 (see :func:`calibrate_identity_norms` to give it its input's statistics)."""
    if not template.track_running_stats:
        raise HetfuseError(f"cannot insert an identity copy of {type(template).__name__} without running "
                           "statistics (track_running_stats=False normalises with batch statistics)")
    new = type(template)(width, eps=template.eps, momentum=template.momentum, affine=template.affine,
                         track_running_stats=True)
    p = template.running_mean if template.running_mean is not None else template.weight
    new = new.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        new.running_var.fill_(1.0 - template.eps)
    return new


@torch.no_grad()
def calibrate_identity_norms(model: nn.Module, norms: list[nn.Module], x: torch.Tensor) -> None:
    """Give identity BatchNorms the statistics of their own input on ``x`` (running mean μ, variance v) and weight
    √(v + eps), bias μ: still the identity in eval mode. The statistics are those a BN reset of the whole network
    on ``x`` would find (every BatchNorm normalising with batch statistics, the identity BatchNorms before it
    already calibrated), so the reset leaves them identities."""
    from ..graph.trace import trace
    from ..repair.bn_reset import reset_batchnorm

    wanted = {id(m) for m in norms if m.affine}
    if not wanted:
        return
    named = dict(model.named_modules())
    order = [str(n.target) for n in trace(model).graph.nodes
             if n.op == "call_module" and id(named.get(str(n.target))) in wanted]
    work = copy.deepcopy(model)
    for name in order:  # forward order: each sees the ones before it calibrated
        bn = work.get_submodule(name)
        reset_batchnorm(work, x, only=[bn], train_all=True)
        for target in (bn, named[name]):
            target.running_mean.copy_(bn.running_mean)
            target.running_var.copy_(bn.running_var)
            target.weight.copy_((bn.running_var + bn.eps).sqrt())
            target.bias.copy_(bn.running_mean)


def zero_branch(block_modules: dict[str, nn.Module]) -> None:
    """Make a copied block's residual branch output exactly zero: every layer made zero by its handler in the op
    table (Linear/Conv2d weight and bias 0; BatchNorm neutral: running mean 0, running variance 1, weight 1, bias
    0, so BN(0) = 0)."""
    for m in block_modules.values():
        try:
            op = layer_op(m)
        except HetfuseError:
            continue  # no parameters to zero (an activation, a pooling)
        op.zero(m)


@register
class AddUnits(Balancer):
    name = "add"
    description = ("add identity layers (identity BatchNorm with its input's statistics) / zero residual blocks to "
                   "the shallower networks; exactly function-preserving")
    reference = "CLAFusion §3.2"
    direction = "add"

    def balance(self, model, graph, groups, alignment, x, stats_x=None):
        inserts: list[tuple[Unit, str, int, bool, int]] = []  # (template unit, anchor, count, before first, width)
        for g, ga in zip(groups, alignment.groups, strict=False):
            if ga.deep == ga.shallow:
                continue
            if len(g.units) != ga.shallow:
                raise HetfuseError(f"group {g.name} has {len(g.units)} units but the alignment places {ga.shallow}")
            a, m, n = ga.alignment, ga.deep, ga.shallow
            if a[0] > 0:
                u = g.units[0]
                if u.kind == "block":
                    raise HetfuseError(f"group {g.name}: zero blocks cannot go before the stage's first block")
                inserts.append((u, u.in_node, a[0], True, 0))
            for j in range(n):
                gap = (a[j + 1] if j + 1 < n else m) - a[j] - 1
                if gap > 0:
                    inserts.append((g.units[j], g.units[j].out_node, gap, False, 0))
        if not inserts:
            return model
        modules = dict(model.named_modules())
        blocks = {b.block_out.name: b for b in residual_blocks(graph)} if any(u.kind == "block" for u, *_ in inserts) \
            else {}
        out = editable_copy(model)
        norms: list[nn.Module] = []
        for u, anchor, count, before, _ in inserts:
            for _ in range(count):
                if u.kind == "layer":
                    out = self._insert_layer(out, modules, graph, u, anchor, before, norms)
                else:
                    out = self._insert_block(out, graph, groups, u, blocks)
        if norms:
            if x is None and stats_x is None:
                raise HetfuseError("adding identity BatchNorm layers needs samples of the data")
            calibrate_identity_norms(out, norms, x if stats_x is None else stats_x)
        return out.train(model.training)

    @staticmethod
    def _insert_layer(model, modules, graph, u: Unit, anchor: str, before: bool, norms: list) -> nn.Module:
        producer = modules[u.weight]
        if before:
            width = layer_op(producer).in_width(producer)
            info = next(mi for mi in graph.modules if mi.name == u.weight)
            if info.in_space == INPUT:
                warnings.warn("identity layers inserted before the first hidden layer pass the raw input through a "
                              "ReLU: not function-preserving when inputs can be negative", stacklevel=4)
        else:
            if not u.relu:
                raise HetfuseError(f"unit '{u.name}' is not followed by a ReLU: an identity layer after it would not "
                                   "preserve the function")
            width = u.width
        prefix = fresh_prefix(model)
        new = {f"{prefix}.layer": identity_layer(producer, width)}
        nodes = [{"name": "layer", "op": "call_module", "target": f"{prefix}.layer", "args": [{"node": "$in"}]}]
        templates = [modules[name] for name in u.modules[1:]]
        if templates:
            new[f"{prefix}.norm"] = identity_norm(templates[0], width)
            norms.append(new[f"{prefix}.norm"])
            nodes.append({"name": "norm", "op": "call_module", "target": f"{prefix}.norm", "args": [{"node": "layer"}]})
        new[f"{prefix}.relu"] = nn.ReLU()
        nodes.append({"name": "relu", "op": "call_module", "target": f"{prefix}.relu",
                      "args": [{"node": nodes[-1]["name"]}]})
        edit = {"op": "insert", "after": anchor, "nodes": nodes,
                "modules": {k: module_spec(v) for k, v in new.items()}}
        return apply_edit(model, edit, new)

    @staticmethod
    def _insert_block(model, graph, groups, u: Unit, blocks) -> nn.Module:
        template, resize = _identity_block(graph, groups, u, blocks)
        modules = dict(graph.gm.named_modules())
        prefix = fresh_prefix(model)
        region, batch_of = _with_constants(template.region)
        names = {n: f"n{k}" for k, n in enumerate(region)}
        names.update(dict.fromkeys(batch_of, "$in"))  # the batch size read off another value: off the block's input
        module_names, new = {}, {}
        by_name = {mi.name: mi for mi in graph.modules}
        held: dict[str, dict[str, torch.Tensor]] = {}  # owner -> tensor attributes the block reads directly
        for n in region:
            if n.op == "get_attr":
                owner, _, local = str(n.target).rpartition(".")
                held.setdefault(owner, {})[local] = graph.gm.get_parameter(str(n.target)).detach()
        for owner, tensors in held.items():
            if resize is not None:
                raise HetfuseError(f"cannot add a zero layer to {u.name}: its template reads tensor attributes of "
                                   f"'{owner}' directly and comes from a stream of another width")
            local = f"{prefix}.{owner.replace('.', '_')}"
            module_names[owner] = local
            holder = ParamHolder(list(tensors), [list(t.shape) for t in tensors.values()])
            with torch.no_grad():
                for k, t in tensors.items():
                    getattr(holder, k).copy_(t)
            new[local] = holder.to(device=next(iter(tensors.values())).device)
        for n in region:
            if n.op == "call_module" and str(n.target) not in module_names:
                src = str(n.target)
                local = f"{prefix}.{src.replace('.', '_')}"
                module_names[src] = local
                m = copy.deepcopy(modules[src])
                if resize is not None and src in by_name:
                    m = _resized(m, by_name[src], resize)
                new[local] = m
        zero_branch(new)
        specs = [node_spec(n, names, template.block_in, module_names) for n in region]
        edit = {"op": "insert", "after": u.out_node, "nodes": specs,
                "modules": {k: module_spec(v) for k, v in new.items()}}
        return apply_edit(model, edit, new)


def _with_constants(region: list) -> tuple[list, set]:
    """A block's nodes with the constant nodes they read (tensor attributes and slices of them, computed from no
    input), in graph order; and the values outside the block whose batch size it reads (an exported graph reads
    ``x.shape[0]`` off the model's input: the copy reads it off its own input, which has the same batch size)."""
    import operator

    inside = set(region)
    extra: set = set()
    batch_of: set = set()
    stack = [p for n in region for p in n.all_input_nodes if p not in inside]
    while stack:
        n = stack.pop()
        if n in extra:
            continue
        if n.op == "get_attr" or (n.all_input_nodes and all(_constant(p) for p in n.all_input_nodes)):
            extra.add(n)
            stack.extend(n.all_input_nodes)
        elif n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0 and \
                _shape_of_outside(n.args[0], inside):
            extra.update((n, n.args[0]))
            batch_of.add(n.args[0].args[0])
    order = {n: k for k, n in enumerate(region[0].graph.nodes)}
    return sorted(inside | extra, key=lambda n: order[n]), batch_of


def _shape_of_outside(n, inside: set) -> bool:
    return n.op == "call_function" and n.target is getattr and n.args[1] == "shape" and n.args[0] not in inside


def _constant(n) -> bool:
    return n.op == "get_attr" or (bool(n.all_input_nodes) and all(_constant(p) for p in n.all_input_nodes))


def _identity_block(graph, groups, u: Unit, blocks):
    """A block to copy as a zero block for unit ``u``'s stage: one with an identity shortcut (its addition reads
    its block input directly), from the same stage if it has one, else from another stage (resized)."""
    def identity_shortcut(b) -> bool:
        return b.identity_shortcut

    stage = next(g for g in groups if u in g.units)
    for unit in stage.units:
        b = blocks[unit.out_node]
        if identity_shortcut(b):
            return b, None
    for g in groups:
        for unit in g.units:
            if unit.kind == "block" and identity_shortcut(blocks[unit.out_node]):
                return blocks[unit.out_node], (unit.space, u.space, graph.spaces[u.space].size)
    raise HetfuseError(f"cannot add a zero block to {stage.name}: the network has no residual block with an identity "
                       "shortcut to copy")


def _resized(module: nn.Module, info, resize) -> nn.Module:
    """A copy of a template block's module resized from the template's stream to the target stream's width."""
    old_space, _, width = resize
    spec = module_spec(module)
    op = layer_op(info.kind)
    reads = info.in_space == old_space  # inside a block every layer reads one column per neuron
    op.resize(spec["args"], op.in_width(module) if reads else None, width if reads else None,
              width if info.out_space == old_space else None)
    from ..graph.rewrite import module_from_spec

    p = next(iter(module.parameters()), None)
    if p is None:
        p = next(iter(module.buffers()), None)
    new = module_from_spec(spec)
    return new.to(device=p.device, dtype=p.dtype) if p is not None else new
