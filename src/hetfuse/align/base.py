"""The depth-alignment stage: which deep position each unit of a shallower network takes, group by group.

For every group (pooling group, residual stage, fully connected part; :mod:`hetfuse.graph.groups`) the
networks' unit counts are compared. With ``add`` balancing every network is brought up to the largest
count: a network with fewer units is aligned onto the *reference* of that group (the target if it has the
most units there, else the first network that has); with ``merge`` every network is brought down to the
smallest count and the networks with more units are aligned against the smallest one. The similarity
method gives the deep × shallow matrix; the aligner turns it into an alignment.

Conv groups and residual stages keep their first unit matched (identity convolutions go after a matched
conv of the same group; the first conv of a network reads the raw, possibly negative, input; a stage's
first block downsamples), whatever ``fix_first`` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.activations import node_features
from ..graph.groups import Group
from ..graph.spec import NetworkGraph
from ..registry import Method
from ..similarity.base import LayerRep, Similarity


class DepthAligner(Method):
    """Base class of the depth-aligner family."""

    family = "depth_align"
    objective: ClassVar[Literal["cost", "similarity"] | None] = "cost"
    default_similarity: ClassVar[str] = "neurons-cka"

    def constraints(self) -> tuple[bool, bool]:
        return bool(getattr(self.params, "fix_first", True)), bool(getattr(self.params, "fix_last", True))

    def align_group(self, matrix: torch.Tensor | None, *, m: int, n: int, fix_first: bool, fix_last: bool,
                    group: int, offset: int) -> list[int]:
        """The alignment of one group: n shallow units into m deep positions (0-based, increasing).
        ``group`` is the group's index and ``offset`` the number of deep units in the groups before it."""
        raise NotImplementedError


@dataclass
class GroupAlignment:
    """One group of one network: ``shallow`` units placed at ``alignment`` among ``deep`` positions of the
    ``reference`` network (add), or the reference's units placed among this network's (merge)."""

    name: str
    kind: str
    deep: int
    shallow: int
    reference: int
    alignment: list[int]
    matrix: list[list[float]] | None = None
    matrix_kind: str | None = None
    fix_first: bool | None = None
    fix_last: bool | None = None
    bounded: bool | None = None  # the similarity's values lie in [0, 1] (its cost is 1 - similarity)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ModelAlignment:
    """A network's alignment: ``role`` says whether it gets units (``shallow``: add), loses them (``deep``:
    merge), or keeps its depth (``kept``)."""

    model: int
    role: Literal["shallow", "deep", "kept"]
    groups: list[GroupAlignment]

    @property
    def changed(self) -> bool:
        return any(g.deep != g.shallow for g in self.groups)

    @property
    def alignment(self) -> list[int]:
        """The groups' alignments concatenated (deep positions offset by the deep groups before)."""
        out, offset = [], 0
        for g in self.groups:
            out.extend(offset + a for a in g.alignment)
            offset += g.deep
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "role": self.role, "changed": self.changed, "alignment": self.alignment,
                "reference": sorted({g.reference for g in self.groups if g.deep != g.shallow}),
                "groups": [g.to_dict() for g in self.groups]}


@dataclass
class DepthAlignment:
    models: list[ModelAlignment]
    notes: list[str] = field(default_factory=list)

    def to_list(self) -> list[dict]:
        return [m.to_dict() for m in self.models]


def unit_reps(model: nn.Module, graph: NetworkGraph, groups: list[Group], x: torch.Tensor | None, needs: str,
              max_rows: int = 4096) -> list[list[LayerRep]]:
    """Per group, per unit: its representation (width; activations or weight when the method needs them)."""
    feats = {}
    if needs == "acts":
        if x is None:
            raise HetfuseError("this similarity needs input samples")
        feats = node_features(model, graph, [u.node for g in groups for u in g.units], x, max_rows=max_rows)
    modules = dict(model.named_modules())
    out = []
    for g in groups:
        row = []
        for u in g.units:
            w = None
            if needs == "weight":
                if u.weight is None:
                    raise HetfuseError(f"unit {u.name} has no layer whose weight could represent it")
                w = modules[u.weight].weight.detach()
                w = w.reshape(w.shape[0], -1)
            row.append(LayerRep(width=u.width, acts=feats.get(u.node), weight=w))
        out.append(row)
    return out


def align_depths(models: list[nn.Module], graphs: list[NetworkGraph], groups: list[list[Group]], x: torch.Tensor,
                 *, aligner: DepthAligner, similarity: Similarity, direction: Literal["add", "merge"],
                 target: int) -> DepthAlignment:
    """Align every network's groups (see the module docstring); networks already at the common unit count
    of a group keep it (identity alignment)."""
    k = len(models)
    counts = [[len(g.units) for g in gs] for gs in groups]
    n_groups = len(groups[0])
    pick = max if direction == "add" else min
    notes: list[str] = []
    reps: dict[int, list[list[LayerRep]]] = {}

    def reps_of(i: int) -> list[list[LayerRep]]:
        if i not in reps:
            reps[i] = unit_reps(models[i], graphs[i], groups[i], x, similarity.needs)
        return reps[i]

    fix_first0, fix_last0 = aligner.constraints()
    result = []
    for i in range(k):
        per_group, offset, role = [], 0, "kept"
        for gi in range(n_groups):
            common = pick(c[gi] for c in counts)
            ref = target if counts[target][gi] == common else next(j for j in range(k) if counts[j][gi] == common)
            grp = groups[i][gi]
            mine = counts[i][gi]
            if mine == common:
                per_group.append(GroupAlignment(grp.name, grp.kind, mine, mine, i, list(range(mine))))
                offset += mine
                continue
            deep_i, shallow_i = (ref, i) if direction == "add" else (i, ref)
            role = "shallow" if direction == "add" else "deep"
            m, n = counts[deep_i][gi], counts[shallow_i][gi]
            if n == 0:
                raise HetfuseError(f"group {grp.name}: a network without units in this group cannot be balanced "
                                   f"({m} vs 0 units)")
            fix_first, fix_last = fix_first0, fix_last0
            if grp.kind != "linear" and not fix_first:
                fix_first = True
                notes.append(f"model {i}, group {grp.name}: its first unit stays matched ({grp.kind} groups keep "
                             "their first unit)")
            if n == 1 and fix_first and fix_last and m > 1:
                fix_last = False
                notes.append(f"model {i}, group {grp.name}: one unit in the shallower network, so the last-unit "
                             "constraint was dropped")
            matrix = None
            if aligner.objective is not None:
                matrix = similarity.matrix(reps_of(deep_i)[gi], reps_of(shallow_i)[gi], aligner.objective)
            a = aligner.align_group(matrix, m=m, n=n, fix_first=fix_first, fix_last=fix_last, group=gi,
                                    offset=offset)
            a = [int(v) for v in a]
            if len(a) != n or any(v < 0 or v >= m for v in a) or any(a[j] >= a[j + 1] for j in range(n - 1)):
                raise HetfuseError(f"group {grp.name}: alignment {a} must be {n} strictly increasing positions "
                                   f"in [0, {m})")
            if grp.kind != "linear" and a[0] != 0:
                raise HetfuseError(f"group {grp.name}: the first unit of a {grp.kind} group must stay matched "
                                   f"(alignment {a})")
            per_group.append(GroupAlignment(grp.name, grp.kind, m, n, ref, a,
                                            None if matrix is None else matrix.tolist(), aligner.objective,
                                            fix_first, fix_last, similarity.bounded))
            offset += m
        result.append(ModelAlignment(i, role, per_group))
    return DepthAlignment(result, notes)
