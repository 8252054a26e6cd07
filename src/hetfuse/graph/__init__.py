"""Network description: neuron spaces and the parameter axes tied to them, derived by torch.fx tracing."""

from .activations import layer_activations
from .spec import (NetworkGraph, NeuronSpace, ParamAxis, check_permutation_invariance, permute_state,
                   permuted_copy, transform_axis)
from .trace import describe

__all__ = ["NetworkGraph", "NeuronSpace", "ParamAxis", "describe", "check_permutation_invariance",
           "permute_state", "permuted_copy", "transform_axis", "layer_activations"]
