"""OTFusion: align every network's neurons onto the target's by optimal transport, space by space in forward
order (ground cost from activations or from incoming weights after the previous spaces' transport)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..registry import register
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap, parallel_map
from .transport import Transport, ground_cost, solve_transport


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

    def _check_heads(self, ctx: MatchContext, i: int, att) -> None:
        """Heads stay whole only under a permutation: exact transport between equal widths."""
        sizes = [(ctx.graphs[i].spaces[s].size, ctx.graphs[ctx.target].spaces[s].size) for s in (att.qk, att.v)]
        if self.params.solver != "exact" or any(a != b for a, b in sizes):
            name = ctx.graphs[ctx.target].spaces[att.qk].name
            raise HetfuseError(
                f"{self.name}: the attention at '{name}' ({att.heads} heads; query/key and value widths "
                f"{sizes[0][0]}/{sizes[1][0]} in model {i}, {sizes[0][1]}/{sizes[1][1]} in the target) can be "
                "matched only by a permutation of whole heads: use the exact solver between equal widths (soft "
                "transport plans and different widths would mix neurons across heads)")

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
            partner = {}
            for att in ctx.graphs[t].attention:
                self._check_heads(ctx, i, att)
                partner[att.qk] = partner[att.v] = att
            if self.sequential:
                inn: dict[int, torch.Tensor] = {}
                plans: list = [None] * ctx.n_spaces
                for s in range(ctx.n_spaces):
                    att = partner.get(s)
                    if att is not None and s == att.v:
                        pass  # solved with its query/key space
                    elif att is not None:  # the value rows read the stream only, which is aligned by now
                        plans[att.qk], plans[att.v] = _heads_plans([self.cost(ctx, i, att.qk, inn),
                                                                    self.cost(ctx, i, att.v, inn)], att.heads)
                    else:
                        plans[s] = self._solve(self.cost(ctx, i, s, inn))
                    inn[s] = plans[s].incoming
            else:  # independent spaces: solved concurrently (the solvers release the GIL)
                ground = [self.cost(ctx, i, s, {}) for s in range(ctx.n_spaces)]
                plans = parallel_map(self._solve, [c for s, c in enumerate(ground) if s not in partner])
                plans = iter(plans)
                plans = [None if s in partner else next(plans) for s in range(ctx.n_spaces)]
                for att in ctx.graphs[t].attention:
                    plans[att.qk], plans[att.v] = _heads_plans([ground[att.qk], ground[att.v]], att.heads)
            maps.append([SpaceMap(tr.forward, tr.incoming) for tr in plans])
            solvers.append([tr.solver for tr in plans])
            costs.append([tr.cost for tr in plans])
        return MatchResult(widths, maps, {"solvers": solvers, "costs": costs})


def _heads_plans(costs: list[torch.Tensor], heads: int) -> list[Transport]:
    """The transport plans (permutations) of an attention's query/key and value spaces, heads as units."""
    from .heads import head_structured

    out = []
    arrays = [c.cpu().numpy() for c in costs]
    for c, cols in zip(arrays, head_structured(arrays, heads, maximize=False), strict=True):
        n = len(cols)
        plan = np.zeros((n, n))
        plan[np.arange(n), cols] = 1.0 / n
        out.append(Transport.from_plan(plan, "exact (heads as units)", float(c[np.arange(n), cols].sum() / n)))
    return out


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
