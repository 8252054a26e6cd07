"""similarity: layer similarity measures and the CLAFusion cross-layer cost matrix."""

from hetfuse.similarity.cka import linear_cka, rbf_cka
from hetfuse.similarity.representations import (
    REPRESENTATIONS,
    LayerRep,
    layer_cost_matrix,
    weight_spectrum_distance,
)
from hetfuse.similarity.wasserstein import neuron_wasserstein

__all__ = [
    "linear_cka",
    "rbf_cka",
    "neuron_wasserstein",
    "LayerRep",
    "REPRESENTATIONS",
    "layer_cost_matrix",
    "weight_spectrum_distance",
]
