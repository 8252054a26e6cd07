"""align: cross-layer alignment (CLAFusion)."""

from hetfuse.align.cla import all_alignments, alignment_cost, cross_layer_alignment

__all__ = ["cross_layer_alignment", "all_alignments", "alignment_cost"]
