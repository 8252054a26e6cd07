"""Applying a matcher's maps and combining the networks: one procedure for every matcher.

For network i, every parameter is moved into the fused neuron spaces: along an axis that *produces* space
s through network i's ``out`` map with its columns normalised (each fused neuron gets a convex combination
of network i's neurons matched to it), along an axis that *consumes* space s through its ``inn`` map. This
"aligned" network does not depend on the model weights. With weights w, fused neuron k of space s takes
network i's share β_ik = w_i m_ik / Σ_j w_j m_jk, m_ik the mass network i's ``out`` map puts on k (so with
target-based matchers β_ik = w_i); a parameter with no producing axis (the output layer) is averaged with
the weights themselves. ``PreparedFusion.combine`` therefore costs one weighted sum per parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import HetfuseError
from .graph.correspond import ParamSlot, slot_axes
from .graph.ops import layer_op
from .graph.rewrite import apply_edit, module_spec
from .graph.spec import Gather, NetworkGraph, ParamAxis, transform_axis
from .match.base import MatchResult


@dataclass
class AlignedNetworks:
    """The networks moved into the fused neuron spaces (weight-independent)."""

    slots: list[ParamSlot]
    tensors: list[list[torch.Tensor]]      # [network][slot], fused shapes, the network's precision (>= float32)
    producing: list[list[tuple[int, ParamAxis]]]  # per slot: (space, axis) of its producing axes in the target
    masses: list[list[torch.Tensor]]       # [network][space]: column mass of its out map (r,)
    integer: dict[int, torch.Tensor]       # slot -> the target's tensor, for integer buffers


def _normalised_columns(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mass = m.sum(0)
    if bool(((mass == 1) | (mass == 0)).all()):  # already normalised (a permutation, a selection): no copy
        return m, mass
    return m / torch.where(mass > 0, mass, torch.ones_like(mass))[None, :], mass


def apply_maps(states: list[dict[str, torch.Tensor]], graphs: list[NetworkGraph], slots: list[ParamSlot],
               result: MatchResult, target: int) -> AlignedNetworks:
    """Every network's parameters moved into the fused spaces. One-hot maps are gathers in the tensor's own
    precision (at least float32); a tensor with a dense map on any axis is transformed in float64. The aligned
    tensors keep the precision of the network's parameters (at least float32)."""
    k = len(states)
    outs, masses = [], []
    for i in range(k):
        row_o, row_m = [], []
        for sm in result.maps[i]:
            if result.linear:  # a general linear map (CCA): as it is; the network's share is its weight
                o = sm.out.to(torch.float64)
                mass = torch.ones(o.shape[1], dtype=torch.float64, device=o.device)
            elif sm.one_hot:  # a permutation, a selection: a gather, never a dense matrix
                o = sm.gather()
                mass = (o.source >= 0).to(torch.float64)
            else:
                o, mass = _normalised_columns(sm.out.to(torch.float64))
            row_o.append(o)
            row_m.append(mass)
        outs.append(row_o)
        masses.append(row_m)
    tensors: list[list[torch.Tensor]] = [[] for _ in range(k)]
    producing: list[list[tuple[int, ParamAxis]]] = []
    integer: dict[int, torch.Tensor] = {}
    for si, slot in enumerate(slots):
        axes_t = slot_axes(graphs[target], slot, target)
        producing.append([(s, ax) for s, ax in axes_t if ax.role == "out"])
        for i in range(k):
            key = slot.keys[i]
            t = _missing_tensor(graphs[i], slot, states[i]) if key is None else states[i][key]
            if not t.is_floating_point():
                if i == target:
                    integer[si] = t
                tensors[i].append(t)
                continue
            keep = torch.promote_types(t.dtype, torch.float32)
            axes = slot_axes(graphs[i], slot, i)
            dense = any(not isinstance(outs[i][s], Gather) for s, _ in axes)
            t = t.to(torch.float64 if dense else keep)
            for s, ax in axes:
                sm = result.maps[i][s]
                if isinstance(outs[i][s], Gather):
                    mat = outs[i][s]
                    if _is_identity(mat):  # the target's own neurons: the tensor as it is (no copy)
                        continue
                else:
                    mat = outs[i][s] if ax.role == "out" else sm.inn.to(torch.float64)
                    if result.linear and slot.param == "running_var":  # a variance mixes with squared weights
                        mat = mat * mat                                  # (>= 0; exact for a permutation)
                    mat = mat.to(t.device)
                t = transform_axis(t, ax, mat)
            tensors[i].append(t.to(keep))
    return AlignedNetworks(slots, tensors, producing, masses, integer)


def _is_identity(g: Gather) -> bool:
    n = g.source.numel()
    return g.n_src == n and bool((g.source == torch.arange(n, device=g.source.device)).all())


def _missing_tensor(graph: NetworkGraph, slot: ParamSlot, state: dict) -> torch.Tensor:
    """A parameter this network's layer lacks (a bias): zeros of the layer's output size."""
    info = graph.modules[slot.module]
    weight = state.get(info.key("weight"))
    if weight is None or slot.param != "bias":
        raise HetfuseError(f"layer '{info.name}' lacks '{slot.param}', which another network has")
    return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)


def shares(aligned: AlignedNetworks, weights: list[float]) -> list[list[torch.Tensor]]:
    """β[i][s]: network i's share of every fused neuron of space s (see the module docstring)."""
    k = len(weights)
    n_spaces = len(aligned.masses[0])
    out: list[list[torch.Tensor]] = [[None] * n_spaces for _ in range(k)]  # type: ignore[list-item]
    for s in range(n_spaces):
        raw = torch.stack([weights[i] * aligned.masses[i][s] for i in range(k)])
        total = raw.sum(0)
        present = torch.stack([(aligned.masses[i][s] > 0).to(torch.float64) for i in range(k)])
        fallback = present / present.sum(0).clamp_min(1.0)  # no weight on any member: plain average
        beta = torch.where(total > 0, raw / torch.where(total > 0, total, torch.ones_like(total)), fallback)
        for i in range(k):
            out[i][s] = beta[i]
    return out


def combine(aligned: AlignedNetworks, weights: list[float]) -> list[torch.Tensor]:
    """The fused tensors, one per slot (in the aligned tensors' precision)."""
    beta = shares(aligned, weights)
    fused = []
    for si in range(len(aligned.slots)):
        if si in aligned.integer:
            fused.append(aligned.integer[si])
            continue
        producing = aligned.producing[si]
        total = None
        for i, w in enumerate(weights):
            t = aligned.tensors[i][si]
            if not producing:
                b = torch.tensor(float(w), dtype=t.dtype, device=t.device)
            else:
                axis = producing[0][1].axis
                b = _shares_along(t.shape[axis], producing, beta[i], w).to(device=t.device, dtype=t.dtype)
                shape = [1] * t.dim()
                shape[axis] = -1
                b = b.reshape(shape)
            if total is None:
                total = b * t
            else:
                total.addcmul_(b, t)  # in place: no second full-size temporary
        fused.append(total)
    return fused


def _shares_along(length: int, producing: list[tuple[int, ParamAxis]], beta: list[torch.Tensor],
                  w: float) -> torch.Tensor:
    """One network's share of every entry along a tensor's producing axis: its share of the fused neuron each
    entry belongs to (the axis may hold several spaces' segments, a packed q/k/v weight); ``w`` elsewhere."""
    whole = [s for s, ax in producing if ax.offset is None]
    if whole:
        return beta[whole[0]]
    out = torch.full((length,), float(w), dtype=torch.float64, device=beta[producing[0][0]].device)
    for s, ax in producing:
        out[ax.offset:ax.offset + beta[s].numel()] = beta[s]
    return out


def fused_skeleton(model: nn.Module, graph: NetworkGraph, slots: list[ParamSlot], widths: list[int],
                   target: int) -> nn.Module:
    """A copy of the target network with every space at its fused width and a bias wherever any network has
    one (each change recorded as a ``replace_module`` edit)."""
    from .graph.rewrite import editable_copy

    needs_change = any(w != sp.size for w, sp in zip(widths, graph.spaces, strict=False)) or \
        any(slot.keys[target] is None for slot in slots)
    if not needs_change:  # the target's structure; its tensors are replaced (in a copy) by every combine
        return copy.deepcopy(model, {id(p): p for p in model.parameters()})
    out = editable_copy(model)
    modules = dict(out.named_modules())
    bias_needed = {graph.modules[slot.module].name for slot in slots if slot.keys[target] is None}
    for info in graph.modules:
        if info.kind == "param":  # a tensor attribute tied along its last axis: zeros of the fused width
            key = info.key(info.params[0])
            old = dict(out.named_parameters())[key]
            if widths[info.out_space] != old.shape[-1]:
                out = apply_edit(out, {"op": "resize_param", "target": key,
                                       "shape": [*old.shape[:-1], widths[info.out_space]]})
            continue
        mod = modules[info.name]
        spec = module_spec(mod)
        args = spec["args"]
        old_in = graph.spaces[info.in_space].size if info.in_space >= 0 else None
        new_out = widths[info.out_space] if info.out_space >= 0 else None
        if info.out_parts:  # a packed projection: its parts' segments keep their places only at equal widths
            if any(widths[p] != graph.spaces[p].size for p in info.out_parts):
                raise HetfuseError(f"'{info.name}' packs {len(info.out_parts)} projections (q, k, v) into one "
                                   "layer: fusing it into other widths is not supported yet")
            new_out = None
        changed = layer_op(info.kind).resize(args, old_in, widths[info.in_space] if info.in_space >= 0 else None,
                                             new_out)
        if info.name in bias_needed:
            args["bias"] = True
            changed = True
        if changed:
            edit = {"op": "replace_module", "target": info.name, "module": spec}
            p = next(iter(mod.parameters()), None)
            from .graph.rewrite import module_from_spec

            new = module_from_spec(spec)
            if p is not None:
                new = new.to(device=p.device, dtype=p.dtype)
            out = apply_edit(out, edit, {info.name: new})
    return out


def load_fused(skeleton: nn.Module, slots: list[ParamSlot], target: int, tensors: list[torch.Tensor],
               graph: NetworkGraph) -> nn.Module:
    """A copy of ``skeleton`` holding the fused tensors (cast to its dtypes)."""
    model = copy.deepcopy(skeleton)
    ref = model.state_dict()
    state = {}
    for slot, t in zip(slots, tensors, strict=False):
        key = graph.modules[slot.module].key(slot.param)
        if key not in ref:
            raise HetfuseError(f"the fused network has no tensor {key}")
        state[key] = t.to(dtype=ref[key].dtype, device=ref[key].device)
    missing = set(ref) - set(state)
    if missing:
        raise HetfuseError(f"fused tensors missing for {sorted(missing)}")
    model.load_state_dict(state)
    return model.eval()
