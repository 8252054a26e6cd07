"""Vanilla averaging: no neuron matching (networks of equal widths, neuron i with neuron i)."""

from __future__ import annotations

from ..errors import HetfuseError
from ..registry import register
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap


@register
class Vanilla(NeuronMatcher):
    name = "none"
    description = "vanilla averaging: every neuron with the neuron of the same index (equal widths only)"
    reference = "weight averaging (e.g. Wortsman et al. 2022)"
    recovers_permutations = False

    def match(self, ctx: MatchContext) -> MatchResult:
        widths = [sp.size for sp in ctx.graphs[ctx.target].spaces]
        for i, g in enumerate(ctx.graphs):
            for s, (sp, n) in enumerate(zip(g.spaces, widths, strict=False)):
                if sp.size != n:
                    raise HetfuseError(f"vanilla averaging needs equal widths; hidden space {s} has {sp.size} neurons "
                                       f"in model {i} and {n} in the target")
        maps = [[SpaceMap.identity(n) for n in widths] for _ in ctx.graphs]
        return MatchResult(widths, maps, {"solvers": [["identity"] * len(widths) for _ in ctx.graphs]})
