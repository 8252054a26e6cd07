"""Statistics repair of fused networks."""

from .stats import has_batchnorm, interpolate_stats, neuron_stats, repair_model, reset_batchnorm

__all__ = ["has_batchnorm", "interpolate_stats", "neuron_stats", "repair_model", "reset_batchnorm"]
