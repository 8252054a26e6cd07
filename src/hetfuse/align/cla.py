"""CLAFusion's cross-layer alignment: minimise the summed cost of the matched units."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import register
from .base import DepthAligner
from .dp import align_depth


@dataclass
class ConstraintParams:
    fix_first: bool = field(default=True, metadata={"help": "keep the first units matched (a(0) = 0)"})
    fix_last: bool = field(default=True, metadata={"help": "keep the last units matched (a(n-1) = m-1)"})


@register
class CLA(DepthAligner):
    name = "cla"
    description = "cross-layer alignment: minimise Σ_i C[a(i), i] over a cost matrix (exact DP, O(mn))"
    reference = "CLAFusion Definition 1 / Algorithm 1"
    objective = "cost"
    default_similarity = "neurons"
    Params = ConstraintParams

    def align_group(self, matrix, *, m, n, fix_first, fix_last, group, offset):
        return align_depth(matrix, "cla", fix_first=fix_first, fix_last=fix_last)
