"""Layer balancing: add identity layers or merge layers (CLAFusion §3.2)."""

from .mlp import MERGE_SIGNS, add_identity_layers, chain_layers, merge_layers, relu_sign_estimate, to_mlp

__all__ = ["MERGE_SIGNS", "add_identity_layers", "chain_layers", "merge_layers", "relu_sign_estimate", "to_mlp"]
