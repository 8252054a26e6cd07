"""Which parameter of one network corresponds to which parameter of another of the same structure.

Two networks correspond when their descriptions list the same sequence of parametric modules (kind,
input space, output space) and neuron spaces (kind, stream or not): the widths may differ, the parameter
names may differ (a user's class and hetfuse's zoo, a balanced ``GraphModule`` and a plain model). A layer
with a bias in one network and none in another corresponds too: the missing bias counts as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HetfuseError
from .spec import INPUT, OUTPUT, ModuleInfo, NetworkGraph, ParamAxis


@dataclass
class ParamSlot:
    """One parameter of the common structure: ``module`` index and local ``param`` name, and in each model
    the state-dict key holding it (None where that model's layer lacks it, e.g. a bias)."""

    module: int
    param: str
    keys: list[str | None]


def _describe_module(m: ModuleInfo) -> str:
    side = {INPUT: "input", OUTPUT: "output"}
    return f"{m.kind} '{m.name}' ({side.get(m.in_space, f'space {m.in_space}')} -> " \
           f"{side.get(m.out_space, f'space {m.out_space}')})"


def check_correspondence(graphs: list[NetworkGraph], names: list[str] | None = None) -> None:
    """Raise a :class:`HetfuseError` saying what differs when the networks' structures do not correspond."""
    names = names or [f"model {i}" for i in range(len(graphs))]
    ref = graphs[0]
    for i, g in enumerate(graphs[1:], start=1):
        for kind, label in (("norm", "BatchNorm"), ("layernorm", "LayerNorm")):
            norms_ref = sum(m.kind == kind for m in ref.modules)
            norms_g = sum(m.kind == kind for m in g.modules)
            if norms_ref == norms_g:
                continue
            plain_ref = [m.kind for m in ref.modules if m.kind != kind]
            plain_g = [m.kind for m in g.modules if m.kind != kind]
            if plain_ref == plain_g:
                which = names[0] if norms_ref > norms_g else names[i]
                if min(norms_ref, norms_g) == 0:
                    raise HetfuseError(f"{label} is present in {which} only ({max(norms_ref, norms_g)} {label} "
                                       f"layers): fuse networks that either both have {label} or both do not")
                raise HetfuseError(f"{names[0]} has {norms_ref} {label} layers and {names[i]} {norms_g}: the "
                                   "networks normalise different layers")
        if len(g.spaces) != len(ref.spaces):
            raise HetfuseError(f"{names[0]} has {len(ref.spaces)} hidden neuron spaces and {names[i]} "
                               f"{len(g.spaces)}: their structures do not correspond")
        for s, (a, b) in enumerate(zip(ref.spaces, g.spaces, strict=False)):
            if a.kind != b.kind or a.stream != b.stream:
                raise HetfuseError(f"hidden space {s} is a {a.kind}{' stream' if a.stream else ''} in {names[0]} "
                                   f"('{a.name}') but a {b.kind}{' stream' if b.stream else ''} in {names[i]} "
                                   f"('{b.name}'): their structures do not correspond")
        heads_ref = [(a.heads, ref.spaces[a.qk].size // a.heads, ref.spaces[a.v].size // a.heads)
                     for a in ref.attention]
        heads_g = [(a.heads, g.spaces[a.qk].size // a.heads, g.spaces[a.v].size // a.heads) for a in g.attention]
        if len(heads_ref) == len(heads_g) and [h[0] for h in heads_ref] != [h[0] for h in heads_g]:
            k = next(k for k, (a, b) in enumerate(zip(heads_ref, heads_g, strict=True)) if a[0] != b[0])
            (ha, qa, va), (hb, qb, vb) = heads_ref[k], heads_g[k]
            raise HetfuseError(f"attention {k + 1} ('{ref.spaces[ref.attention[k].qk].name}') has {ha} heads of "
                               f"{qa} query/key and {va} value dimensions in {names[0]} but {hb} heads of {qb} and "
                               f"{vb} in {names[i]}: heads are matched as whole units, so the head counts must be "
                               "equal (head sizes may differ: ot-acts / ot-weights transport between them)")
        if len(g.modules) != len(ref.modules):
            raise HetfuseError(f"{names[0]} has {len(ref.modules)} parametric layers and {names[i]} "
                               f"{len(g.modules)}: their structures do not correspond")
        for k, (a, b) in enumerate(zip(ref.modules, g.modules, strict=False)):
            if (a.kind, a.in_space, a.out_space) != (b.kind, b.in_space, b.out_space):
                raise HetfuseError(f"layer {k} is {_describe_module(a)} in {names[0]} but {_describe_module(b)} in "
                                   f"{names[i]}: their structures do not correspond")
            pa = set(a.params) - {"bias"}
            pb = set(b.params) - {"bias"}
            if pa != pb:
                raise HetfuseError(f"layer {k} ('{a.name}' / '{b.name}') has tensors {sorted(pa)} in {names[0]} but "
                                   f"{sorted(pb)} in {names[i]}")


def param_slots(graphs: list[NetworkGraph]) -> list[ParamSlot]:
    """Every parameter of the common structure (union over the networks), in module order."""
    check_correspondence(graphs)
    slots = []
    for k, ref in enumerate(graphs[0].modules):
        local = list(ref.params)
        for g in graphs[1:]:
            for p in g.modules[k].params:
                if p not in local:
                    local.append(p)
        for p in local:
            keys = [g.modules[k].key(p) if p in g.modules[k].params else None for g in graphs]
            slots.append(ParamSlot(k, p, keys))
    return slots


def slot_axes(graph: NetworkGraph, slot: ParamSlot, model_index: int) -> list[tuple[int, ParamAxis]]:
    """(space index, axis) of every neuron-space axis of ``slot`` in one network. A parameter the network
    lacks (a bias) is tied like a bias: axis 0 to the module's output space."""
    key = slot.keys[model_index]
    info = graph.modules[slot.module]
    if key is None:
        if info.out_space < 0:
            return []
        return [(info.out_space, ParamAxis(info.key(slot.param), 0, "out"))]
    out = []
    for s, space in enumerate(graph.spaces):
        for m in space.members:
            if m.name == key:
                out.append((s, m))
    return out
