"""The depth-aligner stage: cross-layer alignment (CLAFusion), segment- and layer-wise model alignment
(SMA, LMA) and fixed mappings, with their exact dynamic programs. One file per method."""

from .base import DepthAligner, DepthAlignment, GroupAlignment, ModelAlignment, align_depths
from .dp import align_depth, all_alignments, alignment_cost, alignment_objective, cross_layer_alignment
from .cla import CLA  # noqa: I001  (registration order = the order of the docs and the CLI)
from .sma import SMA
from .lma import LMA
from .fixed import Fixed

__all__ = ["CLA", "DepthAligner", "DepthAlignment", "Fixed", "GroupAlignment", "LMA", "ModelAlignment", "SMA",
           "align_depth", "align_depths", "all_alignments", "alignment_cost", "alignment_objective",
           "cross_layer_alignment"]
