"""The balancer stage: add identity layers / zero residual blocks, or merge layers (CLAFusion §3.2), as
rewrites of the traced graph. One file per method."""

from .base import Balancer, rebalance
from .add import AddUnits, calibrate_identity_norms, identity_layer, identity_norm, zero_branch  # noqa: I001
from .merge import MERGE_SIGNS, MergeUnits, relu_sign_estimate

__all__ = ["AddUnits", "Balancer", "calibrate_identity_norms", "MERGE_SIGNS", "MergeUnits", "identity_layer",
           "identity_norm", "rebalance", "relu_sign_estimate", "zero_branch"]
