"""Segment-wise model alignment: maximise the summed similarity of the matched units."""

from __future__ import annotations

from ..registry import register
from .base import DepthAligner
from .cla import ConstraintParams
from .dp import align_depth


@register
class SMA(DepthAligner):
    name = "sma"
    description = "segment-wise alignment: maximise Σ_i S[a(i), i] over a similarity matrix (exact DP, O(mn))"
    reference = "Training-free heterogeneous merging, §III-B (SMA), Alg. 1"
    objective = "similarity"
    default_similarity = "cka"
    Params = ConstraintParams

    def align_group(self, matrix, *, m, n, fix_first, fix_last, group, offset):
        return align_depth(matrix, "sma", fix_first=fix_first, fix_last=fix_last)
