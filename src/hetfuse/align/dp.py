"""Exact dynamic programs for depth alignment, and their brute-force references.

Notation: a deeper network with m units (rows of the matrix) and a shallower one with n ≤ m (columns).
An alignment places shallow unit i at deep position a(i), strictly increasing; ``fix_first`` demands
a(0) = 0 and ``fix_last`` a(n−1) = m−1. Once the shallow network is extended with identity units (the
placement of CLAFusion's ``add``), deep position j carries the output of shallow unit
c(j) = max{i : a(i) ≤ j} (nothing before a(0)).

* ``cla`` (CLAFusion Definition 1): minimise Σ_i C[a(i), i] over a cost matrix C;
* ``sma`` (segment-wise model alignment): maximise Σ_i S[a(i), i] over a similarity matrix S;
* ``lma`` (layer-wise model alignment): maximise Σ_j S[j, c(j)] over every deep position j ≥ a(0).

All three are O(m·n) suffix recursions (F[j][state] = the best value of positions j..m−1), built forwards
so that among optimal alignments the lexicographically smallest is returned: at each step the earliest
placement that attains the optimum is taken (ties are found exactly: a value is compared with the very
expression it was the maximum of).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from ..errors import HetfuseError

__all__ = ["ALIGNMENT_OBJECTIVES", "align_depth", "all_alignments", "alignment_cost", "alignment_objective",
           "cross_layer_alignment"]

ALIGNMENT_OBJECTIVES = {"cla": "cost", "sma": "similarity", "lma": "similarity"}


def check_sizes(m: int, n: int, fix_first: bool, fix_last: bool) -> None:
    if n < 1:
        raise HetfuseError("depth alignment needs at least one shallow unit (n == 0)")
    if m < n:
        raise HetfuseError(f"the deeper model must have at least as many units as the shallower one: m={m} < n={n}"
                           " (put the deeper model's units on the rows of the matrix)")
    if n == 1 and fix_first and fix_last and m > 1:
        raise HetfuseError(f"with a single shallow unit and m={m} deep units, fix_first (a[0]=0) and fix_last "
                           f"(a[0]={m - 1}) contradict each other; drop one of the constraints")


def as_matrix(matrix, what: str = "matrix") -> np.ndarray:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().double().numpy()
    try:
        c = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise HetfuseError(f"{what} must be a 2-D numeric array: {exc}") from exc
    if c.ndim != 2:
        raise HetfuseError(f"{what} must be a 2-D (m × n) matrix, got shape {tuple(c.shape)}")
    if not np.all(np.isfinite(c)):
        raise HetfuseError(f"{what} contains NaN or infinite values")
    return c


def _cla(cost: np.ndarray, fix_first: bool, fix_last: bool) -> list[int]:
    m, n = cost.shape
    cp = cost.copy()
    if fix_first:
        cp[1:, 0] = math.inf
    if fix_last:
        cp[: m - 1, n - 1] = math.inf
    f = np.full((m + 1, n + 1), math.inf)
    f[:, n] = 0.0
    for j in range(n - 1, -1, -1):
        for i in range(m - (n - j), -1, -1):  # deep index i can host shallow unit j if enough remain
            f[i, j] = min(f[i + 1, j], cp[i, j] + f[i + 1, j + 1])
    a, lo = [], 0
    for j in range(n):
        target = f[lo, j]
        hi = m - (n - j)
        cand = [cp[i, j] + f[i + 1, j + 1] for i in range(lo, hi + 1)]
        i = lo + next((k for k, v in enumerate(cand) if v == target), int(np.argmin(cand)))
        a.append(i)
        lo = i + 1
    return a


def _lma(sim: np.ndarray, fix_first: bool, fix_last: bool) -> list[int]:
    m, n = sim.shape
    ninf = -math.inf
    # state s = 0..n: s shallow units placed so far (the current one is s − 1); g[j][s] = best over j..m−1
    g = np.full((m + 1, n + 1), ninf)
    g[m, n] = 0.0

    def keep(j: int, s: int) -> float:
        if s == 0:
            return ninf if fix_first else g[j + 1, 0]
        if s == n and fix_last and j < m:  # a(n−1) = m−1: nothing comes after the last placement
            return ninf
        return sim[j, s - 1] + g[j + 1, s]

    def place(j: int, s: int) -> float:
        if s >= n or (fix_first and s == 0 and j != 0) or (fix_last and s == n - 1 and j != m - 1):
            return ninf
        return sim[j, s] + g[j + 1, s + 1]

    for j in range(m - 1, -1, -1):
        for s in range(n + 1):
            g[j, s] = max(keep(j, s), place(j, s))
    a, s = [], 0
    for j in range(m):
        if s < n and place(j, s) == g[j, s]:
            a.append(j)
            s += 1
    return a


def align_depth(matrix, method: str = "cla", *, fix_first: bool = True, fix_last: bool = True) -> list[int]:
    """Optimal depth alignment of a deep × shallow ``matrix`` (a cost for ``cla``, a similarity for ``sma``
    and ``lma``): ``a`` (0-based deep position of each shallow unit, strictly increasing). Raises
    :class:`~hetfuse.errors.HetfuseError` (a ``ValueError``) for a non-finite matrix, m < n or constraints
    that cannot hold."""
    if method not in ALIGNMENT_OBJECTIVES:
        raise HetfuseError(f"unknown depth alignment {method!r}; known: {', '.join(ALIGNMENT_OBJECTIVES)}")
    c = as_matrix(matrix, "cost" if method == "cla" else "similarity matrix")
    m, n = c.shape
    check_sizes(m, n, fix_first, fix_last)
    if method == "cla":
        return _cla(c, fix_first, fix_last)
    if method == "sma":
        return _cla(-c, fix_first, fix_last)
    return _lma(c, fix_first, fix_last)


def cross_layer_alignment(cost, *, fix_first: bool = True, fix_last: bool = True) -> list[int]:
    """CLAFusion's cross-layer alignment (``align_depth(cost, "cla", ...)``): minimise Σ_j cost[a[j], j]."""
    return align_depth(cost, "cla", fix_first=fix_first, fix_last=fix_last)


def all_alignments(m: int, n: int, *, fix_first: bool = True, fix_last: bool = True) -> list[list[int]]:
    """Every strictly increasing map {0..n−1} → {0..m−1} meeting the constraints, in lexicographic order."""
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise HetfuseError(f"{name} must be an integer, got {v!r}")
    check_sizes(m, n, fix_first, fix_last)
    return [list(c) for c in combinations(range(m), n)
            if (not fix_first or c[0] == 0) and (not fix_last or c[-1] == m - 1)]


def _check_alignment(c: np.ndarray, a) -> list[int]:
    m, n = c.shape
    a = list(a)
    if len(a) != n:
        raise HetfuseError(f"alignment has length {len(a)} but the matrix has {n} columns")
    for j, i in enumerate(a):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < m:
            raise HetfuseError(f"alignment entry a[{j}]={i!r} is not a deep index in [0, {m})")
    return [int(i) for i in a]


def alignment_objective(matrix, a, method: str = "cla") -> float:
    """The value an alignment ``a`` gets under ``method``'s objective (see the module docstring)."""
    c = as_matrix(matrix)
    a = _check_alignment(c, a)
    if method in ("cla", "sma"):
        return float(sum(c[i, j] for j, i in enumerate(a)))
    if method == "lma":
        total, cur = 0.0, -1
        for j in range(c.shape[0]):
            while cur + 1 < len(a) and a[cur + 1] <= j:
                cur += 1
            if cur >= 0:
                total += c[j, cur]
        return float(total)
    raise HetfuseError(f"unknown depth alignment {method!r}")


def alignment_cost(cost, a) -> float:
    """Σ_j cost[a[j]][j] for an alignment ``a`` of length n (validated)."""
    return alignment_objective(cost, a, "cla")
