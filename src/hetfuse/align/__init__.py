"""The depth-aligner stage: cross-layer alignment (CLAFusion), segment- and layer-wise model alignment
(SMA, LMA) — one dynamic-program class registered under three names — and fixed mappings."""

from .base import DepthAligner, DepthAlignment, GroupAlignment, ModelAlignment, align_depths
from .dp import align_depth, all_alignments, alignment_cost, alignment_objective, cross_layer_alignment
from .dp_aligner import CLA, LMA, SMA, DPAligner  # noqa: I001  (registration order = the docs' and the CLI's)
from .fixed import Fixed

__all__ = ["CLA", "DPAligner", "DepthAligner", "DepthAlignment", "Fixed", "GroupAlignment", "LMA", "ModelAlignment",
           "SMA", "align_depth", "align_depths", "all_alignments", "alignment_cost", "alignment_objective",
           "cross_layer_alignment"]
