"""Network description: neuron spaces and the parameter axes tied to them, derived by torch.fx tracing;
depth groups (layer units, residual blocks); structural edits; reading activations."""

from .activations import SpaceStats, layer_activations, node_features, node_moments, space_statistics
from .correspond import ParamSlot, check_correspondence, param_slots, slot_axes
from .groups import Group, Unit, depth_groups, residual_blocks
from .spec import (INPUT, OUTPUT, ModuleInfo, NetworkGraph, NeuronSpace, ParamAxis, check_permutation_invariance,
                   permute_state, permuted_copy, transform_axis)
from .trace import describe

__all__ = ["INPUT", "OUTPUT", "Group", "ModuleInfo", "NetworkGraph", "NeuronSpace", "ParamAxis", "ParamSlot",
           "SpaceStats", "Unit", "check_correspondence", "check_permutation_invariance", "depth_groups", "describe",
           "layer_activations", "node_features", "node_moments", "param_slots", "permute_state", "permuted_copy",
           "residual_blocks", "slot_axes", "space_statistics", "transform_axis"]
