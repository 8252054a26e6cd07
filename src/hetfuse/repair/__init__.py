"""The repair stage: statistics correction of the fused network. One file per method."""

from .base import Repair, RepairContext, has_batchnorm
from .auto import AutoRepair, NoRepair  # noqa: I001  (registration order = docs order)
from .bn_reset import BNReset, reset_batchnorm
from .repair import RepairMethod, repair_spaces, repairable_spaces

__all__ = ["AutoRepair", "BNReset", "NoRepair", "Repair", "RepairContext", "RepairMethod", "has_batchnorm",
           "repair_spaces", "repairable_spaces", "reset_batchnorm"]
