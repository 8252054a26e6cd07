"""Cross-layer alignment (CLAFusion, Definition 1 / Algorithm 1).

Given a cost matrix C (m × n, m ≥ n) between the hidden layers of a deeper model (rows) and a
shallower one (columns), find a strictly increasing map a: {0..n−1} → {0..m−1} minimising
Σ_j C[a[j], j], optionally with a[0] = 0 (fix_first) and a[n−1] = m−1 (fix_last).

Dynamic program (suffix form): F[i, j] = the least cost of assigning shallow layers j..n−1 to
deep layers ≥ i, i.e. F[i, n] = 0, F[i, j] = +inf when m − i < n − j, otherwise
F[i, j] = min(F[i+1, j], C'[i, j] + F[i+1, j+1]) where C' is C with +inf on entries the
constraints forbid.  O(mn) time and memory.  The map is then built forwards, taking for each j
the *smallest* deep index attaining the optimum, which yields the lexicographically smallest
optimal map (ties are detected exactly: F[i, j] is a min over exactly the candidate sums compared).

Tie-break rule: among all optimal maps, the lexicographically smallest one is returned (the
first optimal map in the order of :func:`all_alignments`).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from hetfuse.errors import HetfuseError

__all__ = ["cross_layer_alignment", "all_alignments", "alignment_cost"]


def _check_sizes(m: int, n: int, fix_first: bool, fix_last: bool) -> None:
    if n < 1:
        raise HetfuseError("cross-layer alignment needs at least one shallow layer (n == 0)")
    if m < n:
        raise HetfuseError(
            f"the deeper model must have at least as many layers as the shallower one: m={m} < n={n}"
            " (put the deeper model's layers on the rows of the cost matrix)"
        )
    if n == 1 and fix_first and fix_last and m > 1:
        raise HetfuseError(
            f"with a single shallow layer and m={m} deep layers, fix_first (a[0]=0) and fix_last "
            f"(a[0]={m - 1}) contradict each other; drop one of the constraints"
        )


def _as_cost(cost) -> np.ndarray:
    if hasattr(cost, "detach"):
        cost = cost.detach().cpu().double().numpy()
    try:
        c = np.asarray(cost, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise HetfuseError(f"cost must be a 2-D numeric array: {exc}") from exc
    if c.ndim != 2:
        raise HetfuseError(f"cost must be a 2-D (m × n) matrix, got shape {tuple(c.shape)}")
    if not np.all(np.isfinite(c)):
        raise HetfuseError("cost matrix contains NaN or infinite values")
    return c


def cross_layer_alignment(cost, *, fix_first: bool = True, fix_last: bool = True) -> list[int]:
    """Optimal cross-layer alignment for an m × n cost matrix (deep rows, shallow columns, m ≥ n).

    Returns ``a`` (length n, 0-based deep-layer indices, strictly increasing) minimising
    Σ_j cost[a[j]][j], with a[0] == 0 if ``fix_first`` and a[n−1] == m−1 if ``fix_last``.
    Among optimal maps the lexicographically smallest is returned.
    Raises :class:`HetfuseError` (a ValueError) for non-2-D or non-finite costs, n == 0, m < n,
    and for n == 1 with both constraints when m > 1 (they would demand a[0] = 0 = m−1).
    """
    c = _as_cost(cost)
    m, n = c.shape
    _check_sizes(m, n, fix_first, fix_last)
    cp = c.copy()
    if fix_first:
        cp[1:, 0] = math.inf
    if fix_last:
        cp[: m - 1, n - 1] = math.inf
    inf = math.inf
    f = np.full((m + 1, n + 1), inf)
    f[:, n] = 0.0
    for j in range(n - 1, -1, -1):
        # deep index i can host shallow layer j only if enough deep layers remain after it
        for i in range(m - (n - j), -1, -1):
            f[i, j] = min(f[i + 1, j], cp[i, j] + f[i + 1, j + 1])
    if not math.isfinite(f[0, 0]):  # pragma: no cover - excluded by _check_sizes
        raise HetfuseError("no alignment satisfies the constraints")
    a: list[int] = []
    lo = 0
    for j in range(n):
        target = f[lo, j]
        hi = m - (n - j)  # last deep index that leaves room for the remaining shallow layers
        cand = [cp[i, j] + f[i + 1, j + 1] for i in range(lo, hi + 1)]
        # f[lo, j] is the exact min of these sums, so the first index equal to it exists.
        i = lo + next((k for k, v in enumerate(cand) if v == target), int(np.argmin(cand)))
        a.append(i)
        lo = i + 1
    return a


def all_alignments(m: int, n: int, *, fix_first: bool = True, fix_last: bool = True) -> list[list[int]]:
    """Every strictly increasing map {0..n−1} → {0..m−1} meeting the constraints, in
    lexicographic order (brute-force reference; there are C(m, n) without constraints).
    Raises :class:`HetfuseError` for the same size problems as :func:`cross_layer_alignment`."""
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise HetfuseError(f"{name} must be an integer, got {v!r}")
    _check_sizes(m, n, fix_first, fix_last)
    out = []
    for combo in combinations(range(m), n):
        if fix_first and combo[0] != 0:
            continue
        if fix_last and combo[-1] != m - 1:
            continue
        out.append(list(combo))
    return out


def alignment_cost(cost, a) -> float:
    """Σ_j cost[a[j]][j] for an alignment ``a`` of length n (validated: indices in range)."""
    c = _as_cost(cost)
    m, n = c.shape
    a = list(a)
    if len(a) != n:
        raise HetfuseError(f"alignment has length {len(a)} but the cost matrix has {n} columns")
    total = 0.0
    for j, i in enumerate(a):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < m:
            raise HetfuseError(f"alignment entry a[{j}]={i!r} is not a deep-layer index in [0, {m})")
        total += float(c[i, j])
    return total
