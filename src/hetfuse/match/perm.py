"""Permutation matcher of Git Re-Basin: activation matching (equal widths); weight matching is in weights.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..registry import register
from .assignment import SPARSE_K, solve_assignment, sparse_assignment
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap, parallel_map
from .heads import restrict_to_heads


def _equal_widths(ctx: MatchContext, name: str) -> list[int]:
    widths = [sp.size for sp in ctx.graphs[ctx.target].spaces]
    for i, g in enumerate(ctx.graphs):
        for s, (sp, n) in enumerate(zip(g.spaces, widths, strict=False)):
            if sp.size != n:
                raise HetfuseError(f"{name} needs equal widths; hidden space {s} ('{sp.name}') has {sp.size} "
                                   "neurons in "
                                   f"model {i} and {n} in the target (use ot-acts or elastic-zip for different widths)")
    return widths


def permutation_map(cols: np.ndarray | torch.Tensor) -> SpaceMap:
    """The map of a permutation given as ``cols[j]`` = the fused neuron that neuron j goes to."""
    return SpaceMap.from_cols(cols)


def partial_maps(cols: list[list[np.ndarray] | None], scores: list[list[np.ndarray] | None], widths: list[int],
                 budget: float, keep: set[int]) -> tuple[list[int], list[list[SpaceMap]], list[list[int]]]:
    """Permutation matches onto the target with a width budget (PLeaS' partial matching): in every space not in
    ``keep``, each non-target network's ``round((budget - 1) · n)`` worst-matched neurons (lowest score with their
    partner) are kept apart — each gets a fused neuron of its own after the target's ``n`` — instead of being
    averaged with their partner. ``cols[i]`` / ``scores[i]``: network i's assignment and score matrix per space
    (None for the target). The fused width of a space is ``n · (1 + (K - 1)(budget - 1))``; at budget 2 nothing is
    averaged and the fused network computes the weighted mean of the matched networks' outputs. Returns the fused
    widths, the maps and, per network, how many neurons each space keeps apart."""
    k = len(cols)
    extra = [[0] * len(widths) if cols[i] is None else
             [0 if s in keep else min(n, round((budget - 1.0) * n)) for s, n in enumerate(widths)] for i in range(k)]
    fused = [n + sum(extra[i][s] for i in range(k)) for s, n in enumerate(widths)]
    maps: list[list[SpaceMap]] = []
    for i in range(k):
        row = []
        for s, n in enumerate(widths):
            if cols[i] is None:
                c = np.arange(n)
            else:
                c = np.asarray(cols[i][s]).copy()
                if extra[i][s]:
                    sc = torch.as_tensor(scores[i][s])
                    quality = sc[torch.arange(n, device=sc.device), torch.as_tensor(c, device=sc.device)]
                    apart = torch.argsort(quality, stable=True)[:extra[i][s]].cpu().tolist()
                    start = n + sum(extra[j][s] for j in range(i))
                    c[np.sort(apart)] = start + np.arange(extra[i][s])
            row.append(SpaceMap.from_cols(c, fused[s]))
        maps.append(row)
    return fused, maps, extra


@dataclass
class PermActsParams:
    features: Literal["pre", "post"] = field(default="pre", metadata={
        "help": "correlate pre-activations (default: every neuron varies, so a permutation is identifiable) or the "
                "values after the ReLU (dead neurons then tie)"})
    budget: float = field(default=1.0, metadata={
        "help": "fused width relative to the target (1 to 2): each other model keeps its (budget-1)·n worst-matched "
                "neurons of every space apart instead of averaging them (attention heads and a transformer's "
                "residual stream excepted); 2 averages nothing (the matched models' ensemble); pair with repair=lsq "
                "(PLeaS)"})
    solver: Literal["exact", "sparse"] = field(default="exact", metadata={
        "help": "exact: SciPy's linear assignment; sparse: approximate, the exact assignment among each neuron's k "
                "best-correlated partners (rows and columns); up to 3-4x faster on wide layers whose costs single "
                "out few partners, no faster on nearly uniform ones; its bound on the optimality gap is reported "
                "per space (match_info 'gaps')"})
    k: int | None = field(default=None, metadata={"help": "partners per neuron kept by solver=sparse (default 32)"})

    def check(self) -> None:
        if not 1.0 <= self.budget <= 2.0:
            raise HetfuseError(f"perm-acts: budget must be between 1 and 2, got {self.budget}")
        if self.k is not None and self.solver != "sparse":
            raise HetfuseError(f"perm-acts: k={self.k} applies to solver='sparse' only")
        if self.k is not None and self.k < 1:
            raise HetfuseError(f"perm-acts: k must be at least 1, got {self.k}")


@register
class PermActs(NeuronMatcher):
    name = "perm-acts"
    description = ("a permutation onto the target per space, maximising the summed correlation of activations "
                   "(linear assignment); equal widths")
    reference = "Git Re-Basin (Ainsworth et al. 2023), activation matching; REPAIR (Jordan et al. 2022)"
    Params = PermActsParams

    def match(self, ctx: MatchContext) -> MatchResult:
        widths = _equal_widths(ctx, self.name)
        st = ctx.statistics("target", post=self.params.features == "post")
        t = ctx.target
        attention = ctx.graphs[t].attention
        heads = {s for a in attention for s in (a.qk, a.v)}
        all_cols, all_corr, solvers, gaps = [], [], [], []
        sparse = self.params.solver == "sparse"
        for i in range(ctx.n_models):
            if i == t:
                all_cols.append(None)
                all_corr.append(None)
                solvers.append(["identity"] * len(widths))
                gaps.append([0.0] * len(widths))
                continue
            def solve(s: int, i: int = i) -> tuple[np.ndarray, str, np.ndarray | None, float]:
                # one space's correlations at a time (n x n float64 each: wide layers), kept only where read again
                corr = st.correlation(i, t, s)  # on the models' device; the solver takes it to the host
                if sparse and s not in heads:  # (heads: their blocks are assigned exactly below)
                    found = sparse_assignment(corr, k=self.params.k or SPARSE_K, maximize=True)
                    cols, name, gap = found.cols, found.solver, found.relative_gap
                else:
                    (cols, name), gap = solve_assignment(corr, maximize=True), 0.0
                return cols, name, corr if (self.params.budget > 1.0 or s in heads) else None, gap

            found = parallel_map(solve, list(range(ctx.n_spaces)))
            corr = [f[2] for f in found]
            all_cols.append(restrict_to_heads([f[0] for f in found], corr, attention))
            all_corr.append(corr)
            solvers.append([f[1] + (" (heads as units)" if s in heads else "") for s, f in enumerate(found)])
            gaps.append([f[3] for f in found])
        info = {"solvers": solvers}
        if sparse:  # per model and space: the bound on the relative gap to the optimal total correlation
            info["gaps"] = gaps
        if self.params.budget == 1.0:
            maps = [[SpaceMap.identity(n) for n in widths] if c is None else [permutation_map(p) for p in c]
                    for c in all_cols]
            return MatchResult(widths, maps, info)
        keep = set(heads)
        if attention:  # a transformer's code ties its attention sizes to the stream's width (x.shape): keep it
            keep |= {s for s, sp in enumerate(ctx.graphs[t].spaces) if sp.stream}
        fused, maps, apart = partial_maps(all_cols, all_corr, widths, self.params.budget, keep)
        return MatchResult(fused, maps, dict(info, kept_apart=apart))
