"""The repair stage: statistics correction of the fused network. One file per method."""

from .base import Repair, RepairContext, has_batchnorm
from .auto import AutoRepair, NoRepair  # noqa: I001  (registration order = docs order)
from .bn_reset import BNReset, reset_batchnorm
from .repair import RepairMethod, repair_spaces, repairable_spaces
from .lsq import LeastSquares, lsq_refit

__all__ = ["AutoRepair", "BNReset", "LeastSquares", "NoRepair", "Repair", "RepairContext", "RepairMethod",
           "has_batchnorm", "lsq_refit", "repair_spaces", "repairable_spaces", "reset_batchnorm"]
