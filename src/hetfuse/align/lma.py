"""Layer-wise model alignment: every deep unit counts, compared with the shallow unit it carries."""

from __future__ import annotations

from ..registry import register
from .base import DepthAligner
from .cla import ConstraintParams
from .dp import align_depth


@register
class LMA(DepthAligner):
    name = "lma"
    description = ("layer-wise alignment: maximise Σ_j S[j, c(j)] over every deep unit j, c(j) the shallow unit "
                   "whose output it carries once identity units are added (exact DP, O(mn))")
    reference = "Training-free heterogeneous merging, §III-B (LMA), Alg. 2"
    objective = "similarity"
    default_similarity = "cka"
    Params = ConstraintParams

    def align_group(self, matrix, *, m, n, fix_first, fix_last, group, offset):
        return align_depth(matrix, "lma", fix_first=fix_first, fix_last=fix_last)
