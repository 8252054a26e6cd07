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
from .assignment import SPARSE_K
from .transport import Transport, ground_cost, solve_transport


@dataclass
class OTParams:
    solver: Literal["exact", "sinkhorn", "sparse"] = field(default="exact", metadata={
        "help": "exact: a permutation (linear assignment) for equal widths, POT's network simplex otherwise; "
                "sinkhorn: entropic OT (log-domain stabilised, on the model's device); sparse: equal widths only, "
                "approximate: the exact assignment among each neuron's k nearest partners (rows and columns); up "
                "to 3-4x faster on wide layers whose costs single out few partners, no faster on nearly uniform "
                "ones; its bound on the optimality gap is reported per space (match_info 'gaps')"})
    reg: float | None = field(default=None, metadata={
        "help": "entropic regularisation of solver=sinkhorn, relative to the largest cost (default 0.01)"})
    k: int | None = field(default=None, metadata={"help": "partners per neuron kept by solver=sparse (default 32)"})

    def check(self) -> None:
        if self.reg is not None and self.solver != "sinkhorn":
            raise HetfuseError(f"reg={self.reg} applies to solver='sinkhorn' only (the exact solver has no "
                               "regularisation)")
        if self.reg is not None and not self.reg > 0:
            raise HetfuseError(f"reg must be positive, got {self.reg}")
        if self.k is not None and self.solver != "sparse":
            raise HetfuseError(f"k={self.k} applies to solver='sparse' only")
        if self.k is not None and self.k < 1:
            raise HetfuseError(f"k must be at least 1, got {self.k}")

    @property
    def regularisation(self) -> float:
        return 0.01 if self.reg is None else self.reg


class _OT(NeuronMatcher):
    Params = OTParams
    sequential: bool = True  # the cost of a space depends on the transports of the spaces before it

    def cost(self, ctx: MatchContext, i: int, s: int, inn: dict[int, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _check_heads(self, ctx: MatchContext, i: int, att) -> None:
        """Heads are transported as whole units (the head layouts are equal: checked by the correspondence)."""
        return None

    def prepare_costs(self, ctx: MatchContext) -> None:
        """Compute, once and before the concurrent solves, what :meth:`cost` reads (activation statistics)."""
        return None

    def _solve(self, cost):
        return solve_transport(cost, solver=self.params.solver, reg=self.params.regularisation,
                               k=self.params.k or SPARSE_K)

    def match(self, ctx: MatchContext) -> MatchResult:
        t = ctx.target
        widths = [sp.size for sp in ctx.graphs[t].spaces]
        maps, solvers, costs, gaps = [], [], [], []
        for i in range(ctx.n_models):
            if i == t:
                maps.append([SpaceMap.identity(n) for n in widths])
                solvers.append(["identity"] * len(widths))
                costs.append([0.0] * len(widths))
                gaps.append([0.0] * len(widths))
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
                                                                    self.cost(ctx, i, att.v, inn)], att.heads,
                                                                   self._solve)
                    else:
                        plans[s] = self._solve(self.cost(ctx, i, s, inn))
                    inn[s] = plans[s].incoming
            else:  # independent spaces: solved concurrently (the solvers release the GIL)
                # each space's ground cost is made in its worker and dropped after its solve (n x n each); what
                # the costs read is prepared first, once
                self.prepare_costs(ctx)
                solved = parallel_map(lambda s, i=i: self._solve(self.cost(ctx, i, s, {})),
                                      [s for s in range(ctx.n_spaces) if s not in partner])
                solved = iter(solved)
                plans = [None if s in partner else next(solved) for s in range(ctx.n_spaces)]
                for att in ctx.graphs[t].attention:
                    plans[att.qk], plans[att.v] = _heads_plans([self.cost(ctx, i, att.qk, {}),
                                                                self.cost(ctx, i, att.v, {})], att.heads, self._solve)
            maps.append([tr.space_map() for tr in plans])
            solvers.append([tr.solver for tr in plans])
            costs.append([tr.cost for tr in plans])
            gaps.append([tr.gap for tr in plans])
        info = {"solvers": solvers, "costs": costs}
        if self.params.solver == "sparse":  # per model and space: the bound on the relative gap
            info["gaps"] = gaps
        return MatchResult(widths, maps, info)


def _heads_plans(costs: list[torch.Tensor], heads: int, solve) -> list[Transport]:
    """The transport plans of an attention's query/key and value spaces, heads as units: head a of model i goes
    to head σ(a) of the target, σ the assignment over head pairs whose cost sums the optimal transport costs of
    their blocks in both spaces; within each pair of heads, that block's transport (``solve``: a permutation
    between equal head sizes with the exact solver; a plan between different ones, or with Sinkhorn)."""
    from .assignment import solve_assignment

    arrays = [c.detach().to(torch.float64) for c in costs]  # on their device (the exact solver moves blocks)
    g = np.zeros((heads, heads))
    within: dict[tuple[int, int, int], Transport] = {}
    for k, c in enumerate(arrays):
        di, dt = c.shape[0] // heads, c.shape[1] // heads
        for a in range(heads):
            for b in range(heads):
                tr = solve(c[a * di:(a + 1) * di, b * dt:(b + 1) * dt])
                within[k, a, b] = tr
                g[a, b] += tr.cost
    order, _ = solve_assignment(g)
    out = []
    for k, c in enumerate(arrays):
        di, dt = c.shape[0] // heads, c.shape[1] // heads
        plan = torch.zeros_like(c)
        for a in range(heads):
            b = int(order[a])
            plan[a * di:(a + 1) * di, b * dt:(b + 1) * dt] = within[k, a, b].forward.to(c.device) / (dt * heads)
        name = within[k, 0, int(order[0])].solver
        cost = float(sum(within[k, a, int(order[a])].cost for a in range(heads)) / heads)
        out.append(Transport.from_plan(plan, f"{name} (heads as units)", cost))
    return out


@register
class OTActs(_OT):
    name = "ot-acts"
    description = ("optimal transport onto the target; ground cost = Euclidean distance between neurons' "
                   "activation vectors on the samples")
    reference = "OTFusion (Singh & Jaggi 2020), activation-based"
    sequential = False

    def prepare_costs(self, ctx):
        ctx.statistics("target")

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
