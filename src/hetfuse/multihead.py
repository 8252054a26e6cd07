"""Partially zipped networks: a shared trunk and one head per model (ZipIt!'s "ZipIt!k/L").

The trunk is the fused network up to a cut (the output of depth unit k); each head is one model's network after
the cut, reading the trunk's fused features copied back into that model's neurons (an :class:`~hetfuse.graph.
rewrite.Unmerge`). ``forward`` returns the heads' outputs stacked: ``(batch, heads, outputs)``. Each head scores
in the models' shared output space; how joint and per-task accuracy are read off it is
:func:`hetfuse.train.multihead_scores`'s convention.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiHead(nn.Module):
    """A shared trunk and one head per model; outputs stacked along dimension 1."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.stack([h(z) for h in self.heads], dim=1)


def cut_node(graph, units_before: int) -> str:
    """The fx node after the first ``units_before`` depth units of a described network (units of all groups in
    forward order), where a partially zipped network is cut."""
    from .errors import HetfuseError
    from .graph.groups import depth_groups

    units = [u for g in depth_groups(graph) for u in g.units]
    if not 1 <= units_before <= len(units):
        raise HetfuseError(f"zip_until={units_before}: the network has {len(units)} depth units "
                           f"({', '.join(u.name for u in units)})")
    if units_before == len(units):
        raise HetfuseError(f"zip_until={units_before} zips every depth unit: leave zip_until unset for a full zip")
    return units[units_before - 1].out_node


def _reads(graph, space) -> set[str]:
    """Every node where a space's values can be read: its pre-activations and what follows them up to the ReLU."""
    from .graph.activations import read_nodes

    idx = graph.spaces.index(space)
    return set(space.act_nodes) | set(read_nodes(graph, post=True)[idx])


class MultiHeadAssembly:
    """How a partially zipped fusion (``zip --zip-until K``) becomes a network: the fused trunk up to the cut after
    depth unit K, and every model's own head after it reading the trunk's features copied back into its neurons.
    The statistics repair of a multi-head network is the BN reset (REPAIR is not defined for it)."""

    def __init__(self, units_before: int) -> None:
        self.units_before = int(units_before)

    def __call__(self, prepared, fused: nn.Module, method) -> nn.Module:
        from .graph.rewrite import Unmerge, apply_edit, editable_copy
        from .registry import build
        from .repair.base import RepairContext

        k = self.units_before
        trunk = apply_edit(editable_copy(fused), {"op": "truncate", "at": cut_node(prepared.graph, k)})
        heads = []
        for i, (m, g) in enumerate(zip(prepared.balanced, prepared.balanced_graphs, strict=True)):
            cut = cut_node(g, k)
            s = next(s for s, sp in enumerate(g.spaces) if cut in _reads(g, sp))
            labels = prepared.match.maps[i][s].inn.argmax(1)
            unmerge = Unmerge(labels.numel())
            unmerge.index.copy_(labels)
            heads.append(apply_edit(editable_copy(m), {"op": "tail", "after": cut, "features": labels.numel(),
                                                       "module": "hetfuse_unmerge"},
                                    {"hetfuse_unmerge": unmerge.to(labels.device)}))
        model = MultiHead(trunk, heads).eval()
        if method.name != "none":
            model = build("repair", "bn-reset").repair(model, RepairContext(prepared.graph, prepared.repair_samples,
                                                                           None))
        return model.eval()
