"""ZipIt! zipping and elastic neuron zipping: merge correlated neurons within and across all models.

Per neuron space, the correlation matrix over the union of every model's neurons (their pre-activations by
default, or the values after the ReLU as in ZipIt!; one observation per sample and, for a conv channel, per
position) is reduced greedily: the most correlated pair of
features (within or across models) is merged into one feature, whose correlation to every other feature
becomes α × the smaller of the two; a merge of two features of the same model spends one unit of that model's
within-model budget (β × the number of merges × the model's share of the neurons), and a model without budget
left merges no more of its own features together. This stops when ``r`` features remain. A cluster's members
are averaged on the producing side and copied back on the consuming side (merge M and unmerge U of ZipIt!).

The greedy loop is vectorised (NumPy): it keeps every row's best partner, so each merge updates two rows and two
columns and re-scans only the rows that pointed at the merged pair — O(D²) memory, about O(D²) time in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..registry import register
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap

NEG = -math.inf


def greedy_zip(corr: torch.Tensor, origin: torch.Tensor, r: int, *, alpha: float,
               beta: float) -> tuple[torch.Tensor, dict]:
    """Cluster label (0..r-1) of each of the D features described by their D × D correlation matrix (``origin[k]``:
    the model feature k comes from; clusters numbered in the order of their first member), and counts: per model
    its budget and the merges it spent on its own features (a merged feature belongs to the model of its first
    member, as in ZipIt!), and the merges forced past the budgets when nothing else was left."""
    import numpy as np

    d = corr.shape[0]
    if not 1 <= r <= d:
        raise HetfuseError(f"cannot zip {d} features into {r}")
    origin = origin.cpu().numpy().astype(np.int64)
    n_models = int(origin.max()) + 1
    sims = corr.detach().cpu().to(torch.float64).numpy().copy()
    np.fill_diagonal(sims, NEG)
    orig = sims.copy()
    to_remove = d - r
    sizes = np.bincount(origin, minlength=n_models).astype(np.float64)
    budget = np.floor(to_remove * beta * sizes / d + 1e-4).astype(np.int64).tolist()
    info = {"budget": list(budget), "within": [0] * n_models, "forced": 0}
    exhausted = [False] * n_models
    owner = origin.copy()
    alive = np.ones(d, dtype=bool)
    parent = np.arange(d)
    rowarg = sims.argmax(1)
    rowmax = sims[np.arange(d), rowarg]

    def rescan(rows: np.ndarray) -> None:
        if rows.size:
            sub = sims[rows]
            arg = sub.argmax(1)
            rowarg[rows] = arg
            rowmax[rows] = sub[np.arange(rows.size), arg]

    def kill_within(o: int) -> None:
        sel = np.flatnonzero(alive & (owner == o))
        if sel.size:
            sims[np.ix_(sel, sel)] = NEG
            rescan(sel)

    for o in range(n_models):
        if budget[o] <= 0:
            exhausted[o] = True
            kill_within(o)
    for _ in range(to_remove):
        i = int(rowmax.argmax())
        if rowmax[i] == NEG:  # every remaining pair is blocked by the budgets: merge the most correlated pair anyway
            idx = np.flatnonzero(alive)
            sub = orig[np.ix_(idx, idx)]
            flat = int(sub.argmax())
            i, j = int(idx[flat // idx.size]), int(idx[flat % idx.size])
            info["forced"] += 1
        else:
            j = int(rowarg[i])
        a, b = min(i, j), max(i, j)
        same = owner[a] == owner[b]
        new = alpha * np.minimum(sims[a], sims[b])
        new[a] = NEG
        new[b] = NEG
        sims[a] = new
        sims[:, a] = new
        sims[b] = NEG
        sims[:, b] = NEG
        alive[b] = False
        parent[b] = a
        rowmax[b] = NEG
        stale = alive & ((rowarg == a) | (rowarg == b))
        stale[a] = False
        up = alive & ~stale & (new > rowmax)
        up[a] = False
        rowmax[up] = new[up]
        rowarg[up] = a
        rowarg[a] = int(new.argmax())
        rowmax[a] = new[rowarg[a]]
        rescan(np.flatnonzero(stale))
        if same:
            o = int(owner[a])
            info["within"][o] += 1
            budget[o] -= 1
            if budget[o] <= 0 and not exhausted[o]:
                exhausted[o] = True
                kill_within(o)
    root = np.arange(d)  # follow each feature's chain of merges to its cluster's surviving (lowest) member
    for k in range(d):
        while parent[root[k]] != root[k]:
            root[k] = parent[root[k]]
    reps = np.unique(root)
    out = np.searchsorted(reps, root)
    return torch.from_numpy(out), info


ZIP_COST = ("1 − the mean correlation of each neuron with the other neurons zipped into its fused neuron (0 for "
            "a neuron left alone), averaged over the model's neurons")


def zip_costs(corr: torch.Tensor, labels: torch.Tensor, origin: torch.Tensor, n_models: int) -> list[float]:
    """The merge cost of every model in one neuron space (see ``ZIP_COST``): how far, in correlation, its neurons
    moved to reach the fused neurons."""
    c = torch.nan_to_num(corr.detach().cpu().to(torch.float64), nan=0.0)
    lab = labels.cpu().long()
    d, r = c.shape[0], int(lab.max()) + 1
    onehot = torch.zeros(d, r, dtype=torch.float64)
    onehot[torch.arange(d), lab] = 1.0
    others = onehot.sum(0)[lab] - 1  # the other members of each feature's cluster
    with_them = (c @ onehot)[torch.arange(d), lab] - c.diagonal()
    cost = torch.where(others > 0, 1.0 - with_them / others.clamp(min=1), torch.zeros_like(with_them))
    origin = origin.cpu()
    return [float(cost[origin == i].mean()) if bool((origin == i).any()) else 0.0 for i in range(n_models)]


@dataclass
class ZipParams:
    alpha: float = field(default=0.3, metadata={
        "help": "a merged feature's correlation to the others is alpha x the smaller of its members' (0 < alpha <= 1)"})
    beta: float = field(default=0.125, metadata={
        "help": "share of the merges a model may spend on its own features (0: only across models)"})
    zip_until: int | None = field(default=None, metadata={
        "help": "zip only the first K depth units, then one head per model (a multi-head network)"})
    features: Literal["pre", "post"] = field(default="pre", metadata={
        "help": "correlate pre-activations (default) or, as ZipIt! does, the values after the ReLU (a dead ReLU "
                "neuron then correlates with nothing and is zipped with an arbitrary partner)"})

    def check(self) -> None:
        if not 0 < self.alpha <= 1:
            raise HetfuseError(f"alpha must lie in (0, 1], got {self.alpha}")
        if not 0 <= self.beta <= 1:
            raise HetfuseError(f"beta must lie in [0, 1], got {self.beta}")
        if self.zip_until is not None and self.zip_until < 1:
            raise HetfuseError(f"zip_until must be at least 1, got {self.zip_until}")


@dataclass
class ElasticZipParams(ZipParams):
    width: Literal["max", "min", "target"] | list[int] = field(default="max", metadata={
        "help": "fused widths: max (the widest model's, per space), min, target, or one int per neuron space "
                "(on the command line: comma-separated, e.g. --width 64,48,32)"})

    def check(self) -> None:
        super().check()
        if isinstance(self.width, list) and (not self.width or any(w < 1 for w in self.width)):
            raise HetfuseError(f"width must be max, min, target or one positive int per neuron space, got "
                               f"{self.width}")


class _Zip(NeuronMatcher):
    joint = True

    def widths(self, ctx: MatchContext) -> list[int]:
        raise NotImplementedError

    def match(self, ctx: MatchContext) -> MatchResult:
        widths = self.widths(ctx)
        st = ctx.statistics("all", post=self.params.features == "post")
        k = ctx.n_models
        maps: list[list[SpaceMap]] = [[] for _ in range(k)]
        merges = []
        costs: list[list[float]] = [[] for _ in range(k)]
        heads = self._heads_as_units(ctx, st, widths)
        for s in range(ctx.n_spaces):
            sizes = [g.spaces[s].size for g in ctx.graphs]
            corr = torch.cat([torch.cat([st.correlation(i, j, s) for j in range(k)], dim=1) for i in range(k)], dim=0)
            origin = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
            if s in heads:  # attention: whole heads matched onto the target's, then neurons within them
                labels = torch.cat([torch.as_tensor(c, dtype=torch.long) for c in heads[s]])
                info = {"within": 0, "budget": None, "forced": 0, "heads_as_units": True}
            else:
                labels, info = greedy_zip(corr, origin, widths[s], alpha=self.params.alpha, beta=self.params.beta)
            for i, c in enumerate(zip_costs(corr, labels, origin, k)):
                costs[i].append(c)
            offset = 0
            for i, n in enumerate(sizes):
                lab = labels[offset:offset + n].cpu()
                m = torch.zeros(n, widths[s], dtype=torch.float64)
                m[torch.arange(n), lab] = 1.0
                maps[i].append(SpaceMap(m, m.clone()))
                offset += n
            merges.append({"space": s, "features": sum(sizes), "fused": widths[s],
                           "within_model_merges": info["within"], "budgets": info["budget"],
                           "forced": info["forced"], "heads_as_units": info.get("heads_as_units", False)})
        assemble = None
        if self.params.zip_until:
            from ..multihead import MultiHeadAssembly

            assemble = MultiHeadAssembly(self.params.zip_until)
        return MatchResult(widths, maps, {"solvers": [["zip"] * ctx.n_spaces for _ in range(k)], "merges": merges,
                                          "zip_until": self.params.zip_until, "costs": costs,
                                          "cost_measure": ZIP_COST}, assemble)


    def _heads_as_units(self, ctx: MatchContext, st, widths: list[int]) -> dict[int, list]:
        """Per attention space: each model's neuron -> fused neuron (the target's order), whole heads matched as
        units onto the target's by correlation (zipping neurons of different heads together would change what the
        heads compute, and no merged head is the function of either model's); the fused neuron averages the
        matched neurons. Attention spaces of different widths are refused."""
        from .heads import head_structured

        t, out = ctx.target, {}
        for att in ctx.graphs[t].attention:
            for s in (att.qk, att.v):
                sizes = {g.spaces[s].size for g in ctx.graphs} | {widths[s]}
                if len(sizes) != 1:
                    raise HetfuseError(
                        f"{self.name}: the attention at '{ctx.graphs[t].spaces[att.qk].name}' has widths "
                        f"{[g.spaces[s].size for g in ctx.graphs]} across the models (fused: {widths[s]}); attention "
                        "heads are zipped as whole units between equal widths only")
            per_model = []
            for i in range(ctx.n_models):
                if i == t:
                    per_model.append([np.arange(ctx.graphs[t].spaces[s].size) for s in (att.qk, att.v)])
                    continue
                scores = [st.correlation(i, t, s) for s in (att.qk, att.v)]
                per_model.append(head_structured(scores, att.heads))
            out[att.qk] = [cols[0] for cols in per_model]
            out[att.v] = [cols[1] for cols in per_model]
        return out


@register
class Zip(_Zip):
    name = "zip"
    description = ("ZipIt!: greedy merging of correlated neurons within and across all models, to the target's widths "
                   "(equal widths); zip_until K makes a partially zipped multi-head network")
    reference = "ZipIt! (Stoica et al. 2024); defaults alpha 0.3, beta 0.125 of its public matching function"
    Params = ZipParams

    def widths(self, ctx):
        widths = [sp.size for sp in ctx.graphs[ctx.target].spaces]
        for i, g in enumerate(ctx.graphs):
            if [sp.size for sp in g.spaces] != widths:
                raise HetfuseError(f"zip needs equal widths (model {i} differs from the target); use elastic-zip")
        return widths


@register
class ElasticZip(_Zip):
    name = "elastic-zip"
    description = ("elastic neuron zipping: ZipIt!'s greedy merging for models of different widths, to the fused "
                   "widths `width` (default: the widest model's)")
    reference = "Training-free heterogeneous merging, §III-C"
    Params = ElasticZipParams

    def widths(self, ctx):
        per = [[g.spaces[s].size for g in ctx.graphs] for s in range(ctx.n_spaces)]
        w = self.params.width
        if w == "max":
            return [max(p) for p in per]
        if w == "min":
            return [min(p) for p in per]
        if w == "target":
            return [p[ctx.target] for p in per]
        if len(w) != ctx.n_spaces:
            raise HetfuseError(f"width lists {len(w)} widths, the networks have {ctx.n_spaces} neuron spaces "
                               f"({', '.join(sp.name for sp in ctx.graphs[ctx.target].spaces)})")
        for s, (r, p) in enumerate(zip(w, per, strict=False)):
            if not 1 <= r <= sum(p):
                raise HetfuseError(f"width {r} for space {s} must lie in [1, {sum(p)}]")
        return list(w)
