"""The similarity stage: layer representations and the costs / similarities between units of two networks
(CLAFusion §3.1; CKA for SMA/LMA). One file per method; each registers itself."""

from __future__ import annotations

from ..errors import HetfuseError
from ..registry import get_method, methods
from .base import LayerRep, Similarity
from .neurons import Neurons  # noqa: I001  (registration order = the order of the docs and the CLI)
from .cka import LinearCKA, RbfCKA, linear_cka, rbf_cka
from .neurons_cka import NeuronsThenCKA
from .wasserstein import Wasserstein, neuron_wasserstein
from .weights import WeightSpectra, weight_spectrum_distance

REPRESENTATIONS = tuple(methods("similarity"))


def layer_cost_matrix(deep, shallow, representation: str):
    """Cost matrix C (len(deep) × len(shallow), float64 tensor): C[i, j] = dissimilarity of deep unit i and
    shallow unit j under the named similarity method (see ``hetfuse methods``)."""
    if representation not in methods("similarity"):
        raise HetfuseError(f"unknown layer representation {representation!r}; known: {', '.join(REPRESENTATIONS)}")
    return get_method("similarity", representation)().matrix(deep, shallow, "cost")


__all__ = ["LayerRep", "LinearCKA", "Neurons", "NeuronsThenCKA", "REPRESENTATIONS", "RbfCKA", "Similarity",
           "WeightSpectra", "Wasserstein", "layer_cost_matrix", "linear_cka", "neuron_wasserstein", "rbf_cka",
           "weight_spectrum_distance"]
