"""Git Re-Basin weight matching: a permutation per space maximising the summed inner products of the weights
(equal widths)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HetfuseError
from ..graph.spec import transform_axis
from ..registry import register
from .assignment import solve_assignment
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap
from .heads import head_structured
from .perm import _equal_widths, permutation_map


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
