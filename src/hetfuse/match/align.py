"""Align every neuron space of one model onto a target model of the same depth (OTFusion steps 1-5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import HetfuseError
from ..graph.spec import NetworkGraph, transform_axis
from .transport import Transport, ground_cost, solve_transport

MATCHES = ("ot-acts", "ot-weights", "none")


@dataclass
class Alignment:
    """A source model's parameters moved into the target's neuron order and widths."""

    state: dict[str, torch.Tensor]
    transports: list[Transport]


def _neuron_rows(state: dict[str, torch.Tensor], graph: NetworkGraph, idx: int) -> torch.Tensor:
    """Each neuron's incoming weights (rows of every producing parameter, flattened and concatenated)."""
    rows = []
    for m in graph.spaces[idx].out_members():
        t = state[m.name].movedim(m.axis, 0)
        rows.append(t.reshape(t.shape[0], -1).to(torch.float64))
    return torch.cat(rows, dim=1)


def align_model(src_state: dict[str, torch.Tensor], src_graph: NetworkGraph,
                dst_state: dict[str, torch.Tensor], dst_graph: NetworkGraph, *,
                match: str = "ot-acts",
                src_acts: Sequence[torch.Tensor] | None = None,
                dst_acts: Sequence[torch.Tensor] | None = None,
                solver: str = "exact", reg: float = 0.01) -> Alignment:
    """Transport ``src`` onto ``dst`` space by space, in forward order.

    For each hidden space l: the incoming side was already aligned when space l-1 was processed
    (its ``incoming`` matrix was applied to the consuming axes); the ground cost compares the
    source's and target's neurons (``ot-acts``: pre-activation vectors over the same t samples;
    ``ot-weights``: incoming weight rows, after that incoming alignment); the plan's ``forward``
    matrix then moves the producing axes and its ``incoming`` matrix the consuming axes.
    ``match="none"`` is vanilla averaging: identity maps, equal widths required.
    """
    if match not in MATCHES:
        raise HetfuseError(f"unknown match {match!r}; known: {', '.join(MATCHES)}")
    if src_graph.depth != dst_graph.depth:
        raise HetfuseError(f"models must have equal depth after balancing, got {src_graph.depth} and "
                           f"{dst_graph.depth} hidden layers")
    if match == "ot-acts" and (src_acts is None or dst_acts is None):
        raise HetfuseError("match='ot-acts' needs the activations of both models")
    state = {k: v.detach().to(torch.float64).clone() if v.is_floating_point() else v.clone()
             for k, v in src_state.items()}
    transports: list[Transport] = []
    for l, (s_sp, d_sp) in enumerate(zip(src_graph.spaces, dst_graph.spaces)):
        if match == "none":
            if s_sp.size != d_sp.size:
                raise HetfuseError(f"vanilla averaging needs equal widths; layer {l} has {s_sp.size} vs {d_sp.size}")
            tr = Transport.identity(s_sp.size)
        else:
            if match == "ot-acts":
                a, b = src_acts[l], dst_acts[l]
                if a.shape[0] != b.shape[0]:
                    raise HetfuseError(f"layer {l}: activations over different sample counts")
                cost = ground_cost(a.T, b.T)
            else:
                cost = ground_cost(_neuron_rows(state, src_graph, l), _neuron_rows(dst_state, dst_graph, l))
            tr = solve_transport(cost, solver=solver, reg=reg)
        for m in s_sp.members:
            mat = (tr.forward if m.role == "out" else tr.incoming).to(state[m.name].device)
            state[m.name] = transform_axis(state[m.name], m, mat)
        transports.append(tr)
    for k, v in dst_state.items():
        if k not in state:
            raise HetfuseError(f"parameter {k} of the target has no counterpart in the source model")
        if state[k].shape != v.shape:
            raise HetfuseError(f"parameter {k}: aligned shape {tuple(state[k].shape)} differs from the "
                               f"target's {tuple(v.shape)}; the models' structures do not correspond")
    return Alignment(state=state, transports=transports)
