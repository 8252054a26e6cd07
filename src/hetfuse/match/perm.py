"""Permutation matchers of Git Re-Basin: activation matching and weight matching (equal widths)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..graph.spec import transform_axis
from ..registry import register
from .assignment import solve_assignment
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap, parallel_map
from .heads import head_structured, restrict_to_heads


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
    cols = torch.as_tensor(np.asarray(cols), dtype=torch.long)
    n = cols.numel()
    m = torch.zeros(n, n, dtype=torch.float64)
    m[torch.arange(n), cols] = 1.0
    return SpaceMap(m, m.clone())


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
            m = torch.zeros(n, fused[s], dtype=torch.float64)
            if cols[i] is None:
                m[torch.arange(n), torch.arange(n)] = 1.0
            else:
                c = np.asarray(cols[i][s]).copy()
                if extra[i][s]:
                    quality = scores[i][s][np.arange(n), c]
                    apart = np.argsort(quality, kind="stable")[:extra[i][s]]
                    start = n + sum(extra[j][s] for j in range(i))
                    c[np.sort(apart)] = start + np.arange(extra[i][s])
                m[torch.arange(n), torch.as_tensor(c)] = 1.0
            row.append(SpaceMap(m, m.clone()))
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

    def check(self) -> None:
        if not 1.0 <= self.budget <= 2.0:
            raise HetfuseError(f"perm-acts: budget must be between 1 and 2, got {self.budget}")


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
        all_cols, all_corr, solvers = [], [], []
        for i in range(ctx.n_models):
            if i == t:
                all_cols.append(None)
                all_corr.append(None)
                solvers.append(["identity"] * len(widths))
                continue
            corr = [st.correlation(i, t, s).cpu().numpy() for s in range(ctx.n_spaces)]
            found = parallel_map(lambda c: solve_assignment(c, maximize=True), corr)
            all_cols.append(restrict_to_heads([c for c, _ in found], corr, attention))
            all_corr.append(corr)
            solvers.append([name + (" (heads as units)" if s in heads else "") for s, (_, name) in enumerate(found)])
        if self.params.budget == 1.0:
            maps = [[SpaceMap.identity(n) for n in widths] if c is None else [permutation_map(p) for p in c]
                    for c in all_cols]
            return MatchResult(widths, maps, {"solvers": solvers})
        keep = set(heads)
        if attention:  # a transformer's code ties its attention sizes to the stream's width (x.shape): keep it
            keep |= {s for s, sp in enumerate(ctx.graphs[t].spaces) if sp.stream}
        fused, maps, apart = partial_maps(all_cols, all_corr, widths, self.params.budget, keep)
        return MatchResult(fused, maps, {"solvers": solvers, "kept_apart": apart})


@dataclass
class WeightMatchingParams:
    max_iter: int = field(default=100, metadata={"help": "at most this many sweeps over all spaces"})
    seed: int = field(default=0, metadata={"help": "seed of the random order of the spaces in each sweep"})

    def check(self) -> None:
        if self.max_iter < 1:
            raise HetfuseError(f"max_iter must be at least 1, got {self.max_iter}")


@register
class PermWeights(NeuronMatcher):
    name = "perm-weights"
    description = ("Git Re-Basin weight matching: coordinate descent over all spaces jointly (residual streams "
                   "included), each step a linear assignment; stops when a sweep changes nothing; equal widths")
    reference = "Git Re-Basin (Ainsworth et al. 2023), weight matching"
    Params = WeightMatchingParams

    def match(self, ctx: MatchContext) -> MatchResult:
        widths = _equal_widths(ctx, self.name)
        t = ctx.target
        maps, solvers, sweeps = [], [], []
        for i in range(ctx.n_models):
            if i == t:
                maps.append([SpaceMap.identity(n) for n in widths])
                solvers.append(["identity"] * len(widths))
                continue
            perms, n_sweeps = self._match_pair(ctx, i, t, widths)
            maps.append([permutation_map(p) for p in perms])
            solvers.append(["weight-matching"] * len(widths))
            sweeps.append(n_sweeps)
        return MatchResult(widths, maps, {"solvers": solvers, "sweeps": sweeps})

    def _match_pair(self, ctx: MatchContext, i: int, t: int, widths: list[int]):
        """Permutations (neuron j of model i goes to target neuron perm[j]) maximising Σ ⟨W_t, P W_i⟩."""
        from ..graph.correspond import slot_axes

        states = ctx.states()
        graph_i = ctx.graphs[i]
        # every float parameter tied to a space, with its axes in model i and in the target
        tied = []
        for slot in ctx.slots:
            if slot.keys[i] is None or slot.keys[t] is None:
                continue
            a, b = states[i][slot.keys[i]], states[t][slot.keys[t]]
            if not a.is_floating_point():
                continue
            axes = slot_axes(graph_i, slot, i)
            if axes:
                tied.append((a, b, axes))
        by_space: dict[int, list[int]] = {}
        for k, (_, _, axes) in enumerate(tied):
            for s, _ in axes:
                by_space.setdefault(s, []).append(k)
        perms = [np.arange(n) for n in widths]
        gen = np.random.default_rng(self.params.seed)

        def perm_matrix(p: np.ndarray) -> torch.Tensor:
            n = len(p)
            m = torch.zeros(n, n, dtype=torch.float64)
            m[torch.arange(n), torch.as_tensor(p)] = 1.0
            return m

        partner = {}  # an attention's query/key and value spaces are solved together (heads as units)
        for att in ctx.graphs[t].attention:
            partner[att.qk] = partner[att.v] = att

        def cost_of(s: int) -> np.ndarray:
            n = widths[s]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for k in by_space.get(s, []):
                a, b, axes = tied[k]
                for idx, (s2, ax) in enumerate(axes):
                    if s2 != s:
                        continue
                    aa = a
                    for jdx, (s3, ax3) in enumerate(axes):  # every other tied axis at its current permutation
                        if jdx != idx:
                            aa = transform_axis(aa, ax3, perm_matrix(perms[s3]).to(aa.device))
                    ra = ax.rows(aa, n)  # a block of columns per neuron stays together
                    rb = ax.rows(b, n)
                    cost += (ra @ rb.T).cpu()
            return cost.numpy()

        sweeps = 0
        for _ in range(self.params.max_iter):
            sweeps += 1
            changed = False
            for s in gen.permutation(len(widths)):
                s = int(s)
                att = partner.get(s)
                group = [s] if att is None else [att.qk, att.v]
                if att is not None and s != att.qk:
                    continue  # solved with its query/key space
                costs = [cost_of(k) for k in group]
                if att is None:
                    found = [solve_assignment(costs[0], maximize=True)[0]]
                else:
                    found = head_structured(costs, att.heads)
                old = sum(c[np.arange(len(perms[k])), perms[k]].sum() for c, k in zip(costs, group, strict=True))
                new = sum(c[np.arange(len(f)), f].sum() for c, f in zip(costs, found, strict=True))
                if new > old + 1e-12 * max(1.0, abs(old)):
                    for k, f in zip(group, found, strict=True):
                        perms[k] = f
                    changed = True
            if not changed:
                break
        return perms, sweeps
