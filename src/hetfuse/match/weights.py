"""Git Re-Basin weight matching: a permutation per space maximising the summed inner products of the weights
(equal widths)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HetfuseError
from ..graph.spec import Gather, ParamAxis, transform_axis
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
        maps, solvers, sweeps, solves, objectives = [], [], [], [], []
        for i in range(ctx.n_models):
            if i == t:
                maps.append([SpaceMap.identity(n) for n in widths])
                solvers.append(["identity"] * len(widths))
                continue
            perms, n_sweeps, n_solves, objective = self._match_pair(ctx, i, t, widths)
            maps.append([permutation_map(p) for p in perms])
            solvers.append(["weight-matching"] * len(widths))
            sweeps.append(n_sweeps)
            solves.append(n_solves)
            objectives.append(objective)
        return MatchResult(widths, maps, {"solvers": solvers, "sweeps": sweeps, "solves": solves,
                                          "objective": objectives})

    def _match_pair(self, ctx: MatchContext, i: int, t: int, widths: list[int]):
        """Permutations (neuron j of model i goes to target neuron perm[j]) maximising Σ ⟨W_t, P W_i⟩, by
        coordinate descent: each step solves one space (an attention's two spaces together) exactly with the
        others fixed, in a random order per sweep, and keeps the new permutation only when it raises the objective;
        the descent stops after a sweep that changes nothing.

        The cost of a space is a sum of terms ``rows(A permuted along its other axes) @ rows(B)ᵀ``, one per tied
        axis. A term is recomputed only when a permutation it reads has changed, and a space is solved again only
        when its cost has changed since its last solve (else the same assignment would come back and be rejected):
        the steps taken, hence the permutations, are those of solving every space in every sweep."""
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
        terms: dict[int, list[_Term]] = {}
        for a, b, axes in tied:
            for idx, (s, ax) in enumerate(axes):
                others = [(s2, ax2) for jdx, (s2, ax2) in enumerate(axes)
                          if jdx != idx and not _disjoint(ax, ax2, widths[s], widths[s2])]
                terms.setdefault(s, []).append(_Term(a, b, ax, widths[s], others))
        perms = [np.arange(n) for n in widths]
        inverse = [torch.arange(n, device=_device(states[i])) for n in widths]  # new neuron c = old inverse[c]
        version = [0] * len(widths)  # how often each space's permutation has changed
        gen = np.random.default_rng(self.params.seed)

        partner = {}  # an attention's query/key and value spaces are solved together (heads as units)
        for att in ctx.graphs[t].attention:
            partner[att.qk] = partner[att.v] = att

        def cost_of(s: int) -> torch.Tensor:  # on the models' device; the assignment solver takes it to the host
            n = widths[s]
            cost = None
            for term in terms.get(s, []):
                c = term.value(inverse, version)
                cost = c.clone() if cost is None else cost.add_(c)
            if cost is None:
                return torch.zeros(n, n, dtype=torch.float64)
            return cost

        def picked(c: torch.Tensor, cols: np.ndarray) -> float:
            return float(c[torch.arange(len(cols), device=c.device), torch.as_tensor(cols, device=c.device)].sum())

        def signature(group: list[int]) -> tuple:
            return tuple(version[s2] for s in group for term in terms.get(s, []) for s2, _ in term.others)

        solved_at: dict[int, tuple] = {}  # per group (its first space): the permutations its last solve read
        groups = {s: ([s] if partner.get(s) is None else [partner[s].qk, partner[s].v]) for s in range(len(widths))}
        # what a step reads (its group's permutations and those its costs read) and writes (its group's)
        reads = {s: set(g) | {s2 for k in g for term in terms.get(k, []) for s2, _ in term.others}
                 for s, g in groups.items()}

        def step(s: int) -> bool:
            """Solve group ``s`` with the other permutations fixed; keep the answer if it raises the objective."""
            group = groups[s]
            costs = [cost_of(k) for k in group]
            if len(group) == 1:
                found = [solve_assignment(costs[0], maximize=True)[0]]
            else:
                found = head_structured(costs, partner[s].heads)
            old = sum(picked(c, perms[k]) for c, k in zip(costs, group, strict=True))
            new = sum(picked(c, f) for c, f in zip(costs, found, strict=True))
            accepted = new > old + 1e-12 * max(1.0, abs(old))
            if accepted:
                for k, f in zip(group, found, strict=True):
                    if not np.array_equal(perms[k], f):
                        perms[k] = f
                        inverse[k] = torch.as_tensor(np.argsort(f), device=inverse[k].device)
                        version[k] += 1
            solved_at[s] = signature(group)
            return accepted

        # Steps whose groups neither read nor write each other's permutations run at the same time (two threads
        # on two cores: the assignment solver and the products release the GIL); a step waits for every running
        # step it conflicts with, so each reads exactly what it would read in the sequential order, and the
        # permutations, steps and sweeps are those of solving one step after the other.
        workers = _workers()
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        sweeps = solves = 0
        try:
            for _ in range(self.params.max_iter):
                sweeps += 1
                changed = False
                running: dict[int, Future] = {}
                for s in gen.permutation(len(widths)):
                    s = int(s)
                    if s != groups[s][0]:
                        continue  # solved with its query/key space
                    for r in [r for r in running if reads[s] & set(groups[r]) or reads[r] & set(groups[s])]:
                        changed |= running.pop(r).result()
                    if solved_at.get(s) == signature(groups[s]):
                        continue  # the same cost as at its last solve: the same answer, rejected or already taken
                    solves += 1
                    if pool is None:
                        changed |= step(s)
                    else:
                        if len(running) >= workers:
                            first = next(iter(running))
                            changed |= running.pop(first).result()
                        running[s] = pool.submit(step, s)
                for fut in running.values():
                    changed |= fut.result()
                if not changed:
                    break
        finally:
            if pool is not None:
                pool.shutdown()
        objective = sum(float((_gathered(a, axes, inverse) * b).sum()) for a, b, axes in tied)
        return perms, sweeps, solves, objective


def _workers() -> int:
    """Threads for the descent's independent steps: two where there are two cores or more (in a random order over a
    chain of spaces, a third step that conflicts with neither running one is rare)."""
    return max(1, min(2, os.cpu_count() or 1))


def _device(state: dict[str, torch.Tensor]) -> torch.device:
    return next((v.device for v in state.values()), torch.device("cpu"))


def _span(ax: ParamAxis, n: int) -> tuple[int, int] | None:
    """The entries ``[start, stop)`` of ``ax``'s tensor dimension that a space of ``n`` neurons owns (None: all)."""
    if ax.offset is None:
        return None
    return ax.offset, ax.offset + n * (ax.block if ax.role == "in" else 1)


def _disjoint(ax: ParamAxis, other: ParamAxis, n: int, n_other: int) -> bool:
    """Whether two axes of one tensor lie on the same dimension at separate segments (packed q/k/v rows): permuting
    one leaves the other's entries where they are."""
    if ax.axis != other.axis:
        return False
    a, b = _span(ax, n), _span(other, n_other)
    return a is not None and b is not None and (a[1] <= b[0] or b[1] <= a[0])


def _gathered(a: torch.Tensor, axes, inverse: list[torch.Tensor]) -> torch.Tensor:
    for s, ax in axes:
        a = transform_axis(a, ax, Gather(inverse[s], inverse[s].numel()))  # a permutation as a gather
    return a


class _Term:
    """One tied axis' share of its space's cost, ``rows(A with its other axes permuted) @ rows(B)ᵀ``, kept between
    steps. When the other axes lie on one dimension of the tensor (the usual case: a weight's other side), a change
    of their permutations at a few positions updates it by the product of just those slices (float64 round-off; a
    full recomputation once the positions updated add up to four times the dimension's length); otherwise (or for
    a large change) it is recomputed."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, axis: ParamAxis, n: int, others: list) -> None:
        self.a, self.b, self.axis, self.n, self.others = a, b, axis, n, others
        self.rows_b_t = axis.rows(b, n).T
        dims = {ax.axis for _, ax in others}
        self.dim = dims.pop() if len(dims) == 1 and axis.axis not in dims else None
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._drift = 0

    def _full_index(self, inverse: list[torch.Tensor]) -> torch.Tensor:
        """The source of every entry along ``self.dim`` once the other axes are permuted."""
        length = self.a.shape[self.dim]
        index = torch.arange(length, device=self.a.device)
        for s, ax in self.others:
            src = inverse[s]
            blk = ax.block if ax.role == "in" else 1
            start = ax.offset or 0
            index[start:start + src.numel() * blk] = start + (src.view(-1, 1) * blk +
                                                              torch.arange(blk, device=src.device)).reshape(-1)
        return index

    def value(self, inverse: list[torch.Tensor], version: list[int]) -> torch.Tensor:
        key = tuple(version[s] for s, _ in self.others)
        if key == self._key:
            return self._value
        self._key = key
        if self.dim is None:
            self._value = self.axis.rows(_gathered(self.a, self.others, inverse), self.n) @ self.rows_b_t
            return self._value
        index = self._full_index(inverse)
        length = index.numel()
        if self._value is not None:
            at = torch.nonzero(index != self._index).flatten()
            if 2 * at.numel() < length and self._drift + at.numel() < 4 * length:
                d = self.a.index_select(self.dim, index[at]) - self.a.index_select(self.dim, self._index[at])
                self._value.add_(self.axis.rows(d, self.n) @ self.axis.rows(self.b.index_select(self.dim, at),
                                                                             self.n).T)
                self._index, self._drift = index, self._drift + at.numel()
                return self._value
        self._value = self.axis.rows(self.a.index_select(self.dim, index), self.n) @ self.rows_b_t
        self._index, self._drift = index, 0
        return self._value
