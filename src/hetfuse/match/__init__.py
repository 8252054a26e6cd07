"""Neuron alignment: optimal transport and permutations (OTFusion)."""

from .align import MATCHES, Alignment, align_model
from .transport import SOLVERS, Transport, ground_cost, solve_transport

__all__ = ["MATCHES", "SOLVERS", "Alignment", "Transport", "align_model", "ground_cost", "solve_transport"]
