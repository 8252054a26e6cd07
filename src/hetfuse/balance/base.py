"""The balancing stage: make networks of different depths structurally equal, as rewrites of their traced
graphs (:mod:`hetfuse.graph.rewrite`), written once for every architecture the description accepts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from ..align.base import GroupAlignment, ModelAlignment
from ..errors import HetfuseError
from ..graph.groups import Group, depth_groups
from ..graph.spec import NetworkGraph
from ..graph.trace import describe
from ..registry import Method, get_method


class Balancer(Method):
    """Base class of the balancer family. ``direction``: ``add`` brings every network up to the largest
    unit count of each group, ``merge`` down to the smallest."""

    family = "balance"
    direction: ClassVar[Literal["add", "merge"]] = "add"

    def balance(self, model: nn.Module, graph: NetworkGraph, groups: list[Group], alignment: ModelAlignment,
                x: torch.Tensor, stats_x: torch.Tensor | None = None) -> nn.Module:
        """The network with its depth changed as ``alignment`` says (a new module; ``model`` is untouched).
        ``x``: the alignment samples; ``stats_x``: the samples the repair will use (default ``x``), on which
        inserted BatchNorms take their statistics."""
        raise NotImplementedError


def rebalance(model: nn.Module, alignments: Sequence[Sequence[int]], deep_counts: Sequence[int], *,
              method: str = "add", x: torch.Tensor | None = None, **params) -> nn.Module:
    """Balance one network by hand: group g gets ``deep_counts[g]`` units (add), or keeps
    ``len(alignments[g])`` of its ``deep_counts[g]`` units (merge), the matched units at ``alignments[g]``.
    ``x``: samples (needed for identity BatchNorms and for merge's ReLU gate estimate)."""
    graph = describe(model, example=x[:2] if x is not None else None)
    groups = depth_groups(graph)
    if len(alignments) != len(groups) or len(deep_counts) != len(groups):
        raise HetfuseError(f"the network has {len(groups)} groups ({', '.join(g.name for g in groups)}); give one "
                           "alignment and one count per group")
    balancer = get_method("balance", method)(**params)
    per = []
    for g, a, m in zip(groups, alignments, deep_counts, strict=False):
        a = [int(v) for v in a]
        n = len(g.units) if balancer.direction == "add" else len(a)
        if balancer.direction == "merge" and m != len(g.units):
            raise HetfuseError(f"group {g.name} has {len(g.units)} units, not {m}")
        per.append(GroupAlignment(g.name, g.kind, m, n, 0, a))
    role = "shallow" if balancer.direction == "add" else "deep"
    return balancer.balance(model, graph, groups, ModelAlignment(0, role, per), x)
