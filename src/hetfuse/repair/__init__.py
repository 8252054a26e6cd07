"""Statistics repair of fused networks."""

from .stats import interpolate_stats, neuron_stats, repair_model

__all__ = ["interpolate_stats", "neuron_stats", "repair_model"]
