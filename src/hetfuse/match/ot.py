"""OTFusion: align every network's neurons onto the target's by optimal transport, space by space in forward
order (ground cost from activations or from incoming weights after the previous spaces' transport)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import HetfuseError
from ..registry import register
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap, parallel_map
from .transport import ground_cost, solve_transport


@dataclass
class OTParams:
    solver: Literal["exact", "sinkhorn"] = field(default="exact", metadata={
        "help": "exact: a permutation (linear assignment) for equal widths, POT's network simplex otherwise; "
                "sinkhorn: entropic OT (log domain)"})
    reg: float | None = field(default=None, metadata={
        "help": "entropic regularisation of solver=sinkhorn, relative to the largest cost (default 0.01)"})

    def check(self) -> None:
        if self.reg is not None and self.solver != "sinkhorn":
            raise HetfuseError(f"reg={self.reg} applies to solver='sinkhorn' only (the exact solver has no "
                               "regularisation)")
        if self.reg is not None and not self.reg > 0:
            raise HetfuseError(f"reg must be positive, got {self.reg}")

    @property
    def regularisation(self) -> float:
        return 0.01 if self.reg is None else self.reg


class _OT(NeuronMatcher):
    Params = OTParams
    sequential: bool = True  # the cost of a space depends on the transports of the spaces before it

    def cost(self, ctx: MatchContext, i: int, s: int, inn: dict[int, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _solve(self, cost):
        return solve_transport(cost, solver=self.params.solver, reg=self.params.regularisation)

    def match(self, ctx: MatchContext) -> MatchResult:
        t = ctx.target
        widths = [sp.size for sp in ctx.graphs[t].spaces]
        maps, solvers, costs = [], [], []
        for i in range(ctx.n_models):
            if i == t:
                maps.append([SpaceMap.identity(n) for n in widths])
                solvers.append(["identity"] * len(widths))
                costs.append([0.0] * len(widths))
                continue
            if self.sequential:
                inn: dict[int, torch.Tensor] = {}
                plans = []
                for s in range(ctx.n_spaces):
                    plans.append(self._solve(self.cost(ctx, i, s, inn)))
                    inn[s] = plans[-1].incoming
            else:  # independent spaces: solved concurrently (the solvers release the GIL)
                plans = parallel_map(self._solve, [self.cost(ctx, i, s, {}) for s in range(ctx.n_spaces)])
            maps.append([SpaceMap(tr.forward, tr.incoming) for tr in plans])
            solvers.append([tr.solver for tr in plans])
            costs.append([tr.cost for tr in plans])
        return MatchResult(widths, maps, {"solvers": solvers, "costs": costs})


@register
class OTActs(_OT):
    name = "ot-acts"
    description = ("optimal transport onto the target; ground cost = Euclidean distance between neurons' "
                   "activation vectors on the samples")
    reference = "OTFusion (Singh & Jaggi 2020), activation-based"
    sequential = False

    def cost(self, ctx, i, s, inn):
        st = ctx.statistics("target")
        return st.sq_distances(i, ctx.target, s).sqrt()


@register
class OTWeights(_OT):
    name = "ot-weights"
    description = ("optimal transport onto the target; ground cost = distance between neurons' incoming weights "
                   "after the previous spaces' transport")
    reference = "OTFusion (Singh & Jaggi 2020), weight-based"

    def cost(self, ctx, i, s, inn):
        return ground_cost(ctx.producing_rows(i, s, inn), ctx.producing_rows(ctx.target, s))
