"""A depth alignment given by the user (e.g. to compare every possible mapping, CLAFusion Table 7)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HetfuseError
from ..registry import register
from .base import DepthAligner


@dataclass
class FixedParams:
    mapping: list[int] | None = field(default=None, metadata={
        "help": "0-based deep position of every shallow unit, all groups concatenated (positions counted over the "
                "deep network's units), e.g. 0,2,3"})

    def check(self) -> None:
        if not self.mapping:
            raise HetfuseError("depth_align='fixed' needs mapping=[...] (CLI: --depth-align fixed:0,2,3)")
        if any(v < 0 for v in self.mapping):
            raise HetfuseError(f"mapping {self.mapping} has negative positions")


@register
class Fixed(DepthAligner):
    name = "fixed"
    description = "the alignment given as `mapping` (every network that needs one gets the same)"
    reference = "CLAFusion Appendix C (forced mappings)"
    objective = None
    Params = FixedParams

    def constraints(self):
        return False, False

    def align_group(self, matrix, *, m, n, fix_first, fix_last, group, offset):
        mapping = list(self.params.mapping)
        # the entries of this group are those that fall inside its deep positions [offset, offset + m)
        inside = [v - offset for v in mapping if offset <= v < offset + m]
        if len(inside) != n:
            raise HetfuseError(f"mapping {mapping} places {len(inside)} units in deep positions "
                               f"{offset}..{offset + m - 1}"
                               f" (group {group}), which needs {n}")
        return inside
