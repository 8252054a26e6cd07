"""The three dynamic-program depth aligners — CLAFusion's CLA, and the SMA and LMA of the training-free
heterogeneous-merging paper — as one parameterised method class registered under three names (as mergekit
registers one merge class under several names). Each variant declares its objective (a cost to minimise or a
similarity to maximise), its default layer representation and the recurrence of :func:`hetfuse.align.dp.align_depth`
it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..registry import register
from .base import DepthAligner
from .dp import align_depth


@dataclass
class ConstraintParams:
    fix_first: bool = field(default=True, metadata={"help": "keep the first units matched (a(0) = 0)"})
    fix_last: bool = field(default=True, metadata={"help": "keep the last units matched (a(n-1) = m-1)"})


class DPAligner(DepthAligner):
    """An exact O(mn) dynamic program over one group's deep × shallow matrix (``variant`` picks the recurrence)."""

    variant: ClassVar[str] = ""
    Params = ConstraintParams

    def align_group(self, matrix, *, m, n, fix_first, fix_last, group, offset):
        return align_depth(matrix, self.variant, fix_first=fix_first, fix_last=fix_last)


# name, objective, default similarity, description, reference
VARIANTS = [
    ("cla", "cost", "neurons-cka",
     "cross-layer alignment: minimise Σ_i C[a(i), i] over a cost matrix (exact DP, O(mn))",
     "CLAFusion Definition 1 / Algorithm 1"),
    ("sma", "similarity", "cka",
     "segment-wise alignment: maximise Σ_i S[a(i), i] over a similarity matrix (exact DP, O(mn))",
     "Training-free heterogeneous merging, §III-B (SMA), Alg. 1"),
    ("lma", "similarity", "cka",
     "layer-wise alignment: maximise Σ_j S[j, c(j)] over every deep unit j, c(j) the shallow unit whose output it "
     "carries once identity units are added (exact DP, O(mn))",
     "Training-free heterogeneous merging, §III-B (LMA), Alg. 2"),
]

ALIGNERS: dict[str, type[DPAligner]] = {}
for _name, _objective, _similarity, _description, _reference in VARIANTS:
    ALIGNERS[_name] = register(type(_name.upper(), (DPAligner,), {
        "name": _name, "variant": _name, "objective": _objective, "default_similarity": _similarity,
        "description": _description, "reference": _reference, "__module__": __name__,
        "__doc__": f"{_description} [{_reference}]"}))
CLA, SMA, LMA = ALIGNERS["cla"], ALIGNERS["sma"], ALIGNERS["lma"]
