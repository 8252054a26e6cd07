"""Cross-layer alignment for convolutional networks (CLAFusion §3.1, "CLA for CNN").

Convolutional and fully connected layers are aligned separately, group by group:

* VGG-like chains: one group of conv layers per stretch between pooling layers, then the hidden fully
  connected layers (``fc``);
* ResNets: one group per residual stage whose units are the stage's blocks, a block represented by its
  output (the residual stream at the block's addition node), then ``fc``.

Groups of two models pair up one to one (same number of pooling groups / stages, else
:class:`~hetfuse.errors.HetfuseError`); each pair is aligned with
:func:`~hetfuse.align.cla.cross_layer_alignment` on a cost from
:func:`~hetfuse.similarity.representations.layer_cost_matrix`, and the per-group maps are concatenated
(with the deep model's group offsets) into one strictly increasing map.

Conv groups and residual stages always keep their first unit matched: identity convolutions are inserted
after a matched conv of the same group (the network's first conv also reads the raw, possibly negative
inputs, CLAFusion App. C), and a stage's first block downsamples. ``fix_last`` applies as given (dropped,
with a note, for a one-unit group).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import HetfuseError
from ..graph.spec import NetworkGraph
from ..graph.trace import describe, trace
from ..similarity.representations import LayerRep, layer_cost_matrix
from .cla import cross_layer_alignment

__all__ = ["CnnAlignment", "Unit", "UnitGroup", "balance_cnn_models", "cnn_cross_layer_alignment", "conv_groups",
           "residual_units", "unit_activations"]

_ADD = {operator.add, operator.iadd, torch.add}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_POOL_FUNCTIONS = {torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d}
ACT_REPRESENTATIONS = ("cka", "cka-rbf", "wasserstein")


@dataclass
class Unit:
    """One alignable unit: a conv/linear layer, or a residual block (read at its addition node)."""

    name: str           # module name of the layer, or of the block
    width: int
    node: str           # fx node whose output represents the unit
    weight: str | None  # module whose weight represents the unit (a block: its branch's last conv)


@dataclass
class UnitGroup:
    name: str
    kind: Literal["conv", "block", "fc"]
    units: list[Unit] = field(default_factory=list)


@dataclass
class CnnAlignment:
    """Per-group results (``name``, ``kind``, ``deep``/``shallow`` unit counts, ``alignment``, ``cost``) and
    the combined strictly increasing map over all units."""

    groups: list[dict]
    alignment: list[int]
    notes: list[str] = field(default_factory=list)


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, v in stack.items():
        path = v[0] if isinstance(v, tuple) else key
        out.append(str(path))
    return out


def residual_units(model: nn.Module, gm: fx.GraphModule | None = None) -> list[tuple[str, str, str]]:
    """``(stage, block, add node)`` for every residual addition inside a block of an ``nn.Sequential``
    stage, in forward order. A block is the outermost module ``<stage>.<k>`` around the addition."""
    gm = gm if gm is not None else trace(model)
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ADD:
            continue
        for path in _stack_paths(node):
            stage, _, k = path.rpartition(".")
            if k.isdigit() and stage:
                try:
                    parent = model.get_submodule(stage)
                except AttributeError:
                    continue
                if isinstance(parent, nn.Sequential):
                    out.append((stage, path, node.name))
                    break
    return out


def _branch_conv(gm: fx.GraphModule, add: fx.Node) -> str | None:
    modules = dict(gm.named_modules())
    for arg in add.args[:2]:
        n = arg
        while isinstance(n, fx.Node) and n.op == "call_module":
            mod = modules[n.target]
            if isinstance(mod, nn.Conv2d):
                return str(n.target)
            if not isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.Identity)):
                break
            n = n.args[0]
    return None


def conv_groups(model: nn.Module, graph: NetworkGraph | None = None) -> list[UnitGroup]:
    """The model's alignment groups (see the module docstring); the ``fc`` group comes last and may be
    empty."""
    graph = graph if graph is not None else describe(model)
    gm = trace(model)
    modules = dict(gm.named_modules())
    by_producer = {s.producers[0]: s for s in graph.spaces if not s.stream}
    fc = UnitGroup("fc", "fc")
    for s in graph.spaces:
        if s.kind == "linear":
            fc.units.append(Unit(s.name, s.size, s.act_nodes[0], s.producers[0]))
    groups: list[UnitGroup] = []
    if any(s.stream for s in graph.spaces):
        stream_of = {n: s for s in graph.spaces if s.stream for n in s.act_nodes}
        nodes = {n.name: n for n in gm.graph.nodes}
        for stage, block, add in residual_units(model, gm):
            if add not in stream_of:
                raise HetfuseError(f"residual addition '{add}' in block '{block}' is not read as a stream")
            if not groups or groups[-1].name != stage:
                groups.append(UnitGroup(stage, "block"))
            groups[-1].units.append(Unit(block, stream_of[add].size, add, _branch_conv(gm, nodes[add])))
        if not groups:
            raise HetfuseError(f"{type(model).__name__}: residual network without nn.Sequential stages of blocks; "
                               "cross-layer alignment needs stages of residual blocks")
    else:
        current = UnitGroup("conv0", "conv")
        for node in gm.graph.nodes:
            mod = modules.get(node.target) if node.op == "call_module" else None
            is_pool = isinstance(mod, _POOLS) or (node.op == "call_function" and node.target in _POOL_FUNCTIONS)
            if isinstance(mod, nn.Conv2d) and node.target in by_producer:
                s = by_producer[node.target]
                current.units.append(Unit(s.name, s.size, s.act_nodes[0], s.producers[0]))
            elif is_pool and current.units:
                groups.append(current)
                current = UnitGroup(f"conv{len(groups)}", "conv")
        if current.units:
            groups.append(current)
    groups.append(fc)
    return groups


class _UnitRecorder(fx.Interpreter):
    def __init__(self, gm, wanted: dict[str, list[int]], store, offset: int, total: int, max_rows: int):
        super().__init__(gm)
        self.wanted, self.store = wanted, store
        self.offset, self.total, self.max_rows = offset, total, max_rows

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for k in self.wanted.get(n.name, ()):
            o = out.detach()
            per = 1
            if o.dim() > 2:  # (batch, C, H, W) -> rows (sample, position)
                per = int(np.prod(o.shape[2:]))
                o = o.movedim(1, -1).reshape(-1, o.shape[1])
            rows = self.total * per
            idx = torch.linspace(0, rows - 1, min(self.max_rows, rows), dtype=torch.float64).round().long()
            lo = self.offset * per
            local = idx[(idx >= lo) & (idx < lo + o.shape[0])] - lo
            self.store[k].append(o[local.to(o.device)].to(torch.float64, copy=True).cpu())
        return out


@torch.no_grad()
def unit_activations(model: nn.Module, groups: Sequence[UnitGroup], x: torch.Tensor, *, max_rows: int = 4096,
                     batch_size: int = 256) -> list[list[torch.Tensor]]:
    """Per group, per unit: a ``rows x width`` float64 matrix of the unit's outputs (eval mode), rows being
    (sample, position) pairs subsampled deterministically (evenly spaced) to at most ``max_rows``."""
    flat = [u for g in groups for u in g.units]
    wanted: dict[str, list[int]] = {}
    for k, u in enumerate(flat):
        wanted.setdefault(u.node, []).append(k)
    store: list[list[torch.Tensor]] = [[] for _ in flat]
    was = model.training
    model.eval()
    try:
        gm = trace(model)
        for start in range(0, x.shape[0], batch_size):
            _UnitRecorder(gm, wanted, store, start, x.shape[0], max_rows).run(x[start:start + batch_size])
    finally:
        model.train(was)
    acts = [torch.cat(parts) for parts in store]
    out, k = [], 0
    for g in groups:
        out.append(acts[k:k + len(g.units)])
        k += len(g.units)
    return out


def _reps(model: nn.Module, groups: Sequence[UnitGroup], acts: list[list[torch.Tensor]] | None) -> list[list[LayerRep]]:
    modules = dict(model.named_modules())
    reps = []
    for gi, g in enumerate(groups):
        row = []
        for ui, u in enumerate(g.units):
            w = modules[u.weight].weight.detach() if u.weight is not None else None
            row.append(LayerRep(width=u.width, acts=None if acts is None else acts[gi][ui],
                                weight=None if w is None else w.reshape(w.shape[0], -1)))
        reps.append(row)
    return reps


def _check_pairing(a: Sequence[UnitGroup], b: Sequence[UnitGroup]) -> None:
    ka, kb = [(g.kind, g.kind == "fc") for g in a], [(g.kind, g.kind == "fc") for g in b]
    if ka != kb:
        na = sum(g.kind != "fc" for g in a)
        nb = sum(g.kind != "fc" for g in b)
        what = "residual stages" if any(g.kind == "block" for g in list(a) + list(b)) else "pooling groups"
        raise HetfuseError(f"cross-layer alignment of convolutional networks pairs groups one to one, but the "
                           f"models have {na} and {nb} {what} ({[g.kind for g in a]} vs {[g.kind for g in b]})")


def _align_group(g: UnitGroup, deep: list[LayerRep], shallow: list[LayerRep], representation: str,
                 fix_first: bool, fix_last: bool, notes: list[str]) -> tuple[list[int], list | None]:
    m, n = len(deep), len(shallow)
    if n == m:
        return list(range(n)), None
    if n > m:
        raise HetfuseError(f"group {g.name}: the shallower model has more units ({n}) than the deeper one ({m})")
    if n == 0:
        raise HetfuseError(f"group {g.name}: a model without units in this group cannot be balanced ({m} vs 0)")
    if g.kind != "fc":
        fix_first = True
    if n == 1 and fix_first and fix_last:
        fix_last = False
        notes.append(f"group {g.name} has one unit in the shallower model: the last-unit constraint was dropped")
    cost = layer_cost_matrix(deep, shallow, representation)
    a = cross_layer_alignment(cost, fix_first=fix_first, fix_last=fix_last)
    return [int(v) for v in a], np.asarray(cost).tolist()


def cnn_cross_layer_alignment(deep: nn.Module, shallow: nn.Module, x: torch.Tensor | None = None, *,
                              representation: str = "neurons", fix_first: bool = True, fix_last: bool = True,
                              max_rows: int = 4096) -> CnnAlignment:
    """Group-wise cross-layer alignment of ``shallow`` onto ``deep`` (every group of ``deep`` at least as
    large). ``x``: input images, needed by the activation-based representations (cka, cka-rbf,
    wasserstein); activations are subsampled to at most ``max_rows`` (sample, position) rows."""
    gd, gs = conv_groups(deep), conv_groups(shallow)
    _check_pairing(gd, gs)
    acts_d = acts_s = None
    if representation in ACT_REPRESENTATIONS:
        if x is None:
            raise HetfuseError(f"representation {representation!r} needs input samples x")
        acts_d = unit_activations(deep, gd, x, max_rows=max_rows)
        acts_s = unit_activations(shallow, gs, x, max_rows=max_rows)
    rd, rs = _reps(deep, gd, acts_d), _reps(shallow, gs, acts_s)
    notes: list[str] = []
    out, combined, offset = [], [], 0
    for g_d, g_s, d, s in zip(gd, gs, rd, rs):
        a, cost = _align_group(g_s, d, s, representation, fix_first, fix_last, notes)
        out.append({"name": g_s.name, "kind": g_s.kind, "deep": len(d), "shallow": len(s), "alignment": a,
                    "cost": cost})
        combined.extend(offset + v for v in a)
        offset += len(d)
    return CnnAlignment(groups=out, alignment=combined, notes=notes)


def balance_cnn_models(models: Sequence[nn.Module], x: torch.Tensor, *, reference: int,
                       representation: str = "neurons", fix_first: bool = True, fix_last: bool = True,
                       max_rows: int = 4096) -> tuple[list[nn.Module], list[dict], list[str]]:
    """Balance every model to the largest unit count of each group by adding identity convolutions / zero
    residual blocks at the positions cross-layer alignment gives. In each group, models are aligned to
    ``reference`` when it has the most units there, else to the first model that does.

    Returns the balanced models (unchanged ones are the same objects), one mapping per model
    (``model``, ``reference``, ``deep``, ``shallow``, ``alignment`` (combined), ``cost`` (per group) and
    ``groups``) and notes.
    """
    from ..balance.cnn import balance_cnn

    models = list(models)
    groups = [conv_groups(m) for m in models]
    for i in range(1, len(models)):
        _check_pairing(groups[0], groups[i])
    counts = [[len(g.units) for g in gs] for gs in groups]
    best = [max(c[k] for c in counts) for k in range(len(groups[0]))]
    if all(c == best for c in counts):
        return models, [], []
    need_acts = representation in ACT_REPRESENTATIONS
    reps: dict[int, list[list[LayerRep]]] = {}

    def reps_of(i: int) -> list[list[LayerRep]]:
        if i not in reps:
            acts = unit_activations(models[i], groups[i], x, max_rows=max_rows) if need_acts else None
            reps[i] = _reps(models[i], groups[i], acts)
        return reps[i]

    notes: list[str] = []
    mappings: list[dict] = []
    out = []
    for i, m in enumerate(models):
        per_group, combined, offset = [], [], 0
        for k, g in enumerate(groups[i]):
            if counts[i][k] == best[k]:
                a, cost, ref = list(range(best[k])), None, i
            else:
                ref = reference if counts[reference][k] == best[k] else next(
                    j for j in range(len(models)) if counts[j][k] == best[k])
                before = len(notes)
                a, cost = _align_group(g, reps_of(ref)[k], reps_of(i)[k], representation, fix_first, fix_last, notes)
                notes[before:] = [f"model {i}: {t}" for t in notes[before:]]
            per_group.append({"name": g.name, "kind": g.kind, "deep": best[k], "shallow": counts[i][k],
                              "reference": ref, "alignment": a, "cost": cost})
            combined.extend(offset + v for v in a)
            offset += best[k]
        changed = counts[i] != best
        mappings.append({"model": i, "reference": reference, "deep": reference, "shallow": i,
                         "alignment": combined, "cost": [gr["cost"] for gr in per_group] if changed else None,
                         "groups": per_group})
        out.append(balance_cnn(m, groups[i], [gr["alignment"] for gr in per_group], best) if changed else m)
    return out, mappings, notes
