"""Exact linear assignment.

``scipy.optimize.linear_sum_assignment`` is the default. ``lapjv`` (PyPI, MIT; Jonker–Volgenant) can be asked
for where it is installed; its answer is accepted only with a certificate of optimality — the dual variables it
returns must satisfy c[i, j] − u[i] − v[j] ≥ −tol everywhere and = 0 on the assignment (complementary
slackness, an O(n²) check) — else SciPy solves it. Measured here (``benchmarks/bench_assignment.py``,
``results/bench/``): lapjv is 2–3× faster than SciPy on uniform random costs, but on the activation-distance
costs of deep layers it can be 40× slower (7 s against 0.15 s at 1024 × 1024), so it is not the default.

:func:`sparse_assignment` is the opt-in approximate solver (``solver="sparse"`` of the activation matchers): the
exact assignment restricted to every row's and column's ``k`` cheapest entries (SciPy's sparse solver), with a bound
on how far its total is from the optimum (a dual solution of the whole problem). At 4096 × 4096 it is 3–4× faster
than SciPy where the costs single out few partners per neuron (uniform random costs, first layers' activation
distances; true gap there about 0.4 %) and no faster on nearly uniform costs (deep random layers' distances, where
k = 32 also leaves about 0.8 %): ``results/bench/wide_layers_sparse/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HetfuseError

SPARSE_K = 32  # partners per neuron of the approximate solver, by default

_LAPJV = None


def _lapjv():
    global _LAPJV
    if _LAPJV is None:
        try:
            from lapjv import lapjv
            _LAPJV = lapjv
        except ImportError:
            _LAPJV = False
    return _LAPJV or None


def solve_assignment(cost, *, maximize: bool = False, solver: str = "scipy") -> tuple[np.ndarray, str]:
    """The column assigned to every row of a square ``cost`` matrix, minimising (or maximising) the total, and the
    name of the solver that gave it (``lapjv`` or ``scipy``). ``solver``: ``scipy`` or ``lapjv``. ``cost``: a
    NumPy array or a torch tensor on any device — the solvers run on the host, so this is where a cost leaves the
    device (once); the assignment comes back as a host array of indices."""
    if solver not in ("scipy", "lapjv"):
        raise HetfuseError(f"unknown assignment solver {solver!r}; known: scipy, lapjv")
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().to(device="cpu", dtype=torch.float64).numpy()
    c = np.ascontiguousarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise HetfuseError(f"assignment needs a square matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise HetfuseError("assignment cost has NaN or Inf (check the model weights and the data)")
    n = c.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), "none"
    work = -c if maximize else c
    if solver == "lapjv" and n > 1:
        lapjv = _lapjv()
        if lapjv is None and solver == "lapjv":
            raise HetfuseError("solver 'lapjv' is not installed (pip install lapjv)")
        if lapjv is not None:
            shifted = work - work.min()  # lapjv is tuned for non-negative costs
            cols, _, (_, u, v) = lapjv(shifted, force_doubles=True)
            cols = np.asarray(cols, dtype=np.int64)
            if _certified(shifted, cols, np.asarray(u), np.asarray(v)):
                return cols, "lapjv"
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(work)
    out = np.empty(n, dtype=np.int64)
    out[rows] = cols
    return out, "scipy"


@dataclass
class SparseAssignment:
    """An assignment from :func:`sparse_assignment`: ``cols`` (the column of every row), ``total`` (its total cost or,
    maximising, score), ``gap`` (the optimum is at most this much better than ``total``: 0 ≤ |total − optimum| ≤
    gap) and ``solver`` (``sparse``, or ``scipy`` where the exact solver was used instead)."""

    cols: np.ndarray
    total: float
    gap: float
    solver: str

    @property
    def relative_gap(self) -> float:
        """``gap`` relative to the total (0 where the total is 0)."""
        return self.gap / abs(self.total) if self.total else 0.0


def sparse_assignment(cost, *, k: int = SPARSE_K, maximize: bool = False) -> SparseAssignment:
    """An approximate linear assignment of a square ``cost`` (NumPy array or torch tensor on any device) and a bound
    on its distance from the optimum.

    The assignment is the exact one among the entries that are among the ``k`` cheapest (maximising: the ``k``
    largest) of their row or of their column (SciPy's ``min_weight_full_bipartite_matching``; only those ``2kn``
    entries go to the host). The bound: potentials v that make the answer optimal on those entries (shortest paths
    over its "row i leaves its column for column j" arcs, Bellman-Ford), then the best row potentials for them over
    the whole matrix, u = min_j (c − v), and one more exchange (v = min_i (c − u), u again): every such (u, v) is a
    dual solution of the whole problem, so Σu + Σv is a lower bound of the optimum and ``total − Σu − Σv`` bounds the
    gap. Where ``2k ≥ n``, or those entries hold no complete assignment, the exact solver answers (gap 0)."""
    t = torch.as_tensor(cost).detach()
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise HetfuseError(f"assignment needs a square matrix, got shape {tuple(t.shape)}")
    if k < 1:
        raise HetfuseError(f"sparse assignment needs k >= 1, got {k}")
    n = t.shape[0]
    c = (-t if maximize else t).to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise HetfuseError("assignment cost has NaN or Inf (check the model weights and the data)")
    sign = -1.0 if maximize else 1.0

    def exact() -> SparseAssignment:
        cols, name = solve_assignment(t, maximize=maximize)
        picked = c[torch.arange(n, device=c.device), torch.as_tensor(cols, device=c.device)]
        return SparseAssignment(cols, sign * float(picked.sum()), 0.0, name)

    if 2 * k >= n:
        return exact()
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    dev = c.device
    ar = torch.arange(n, device=dev)
    keys = candidate_keys(c, k)
    i, j = keys // n, keys % n
    vals = c[i, j]
    shift = float(vals.min()) - 1.0  # the sparse solver reads stored zeros as missing entries: keep all positive
    graph = csr_matrix(((vals - shift).cpu().numpy(), (i.cpu().numpy(), j.cpu().numpy())), shape=(n, n))
    try:
        rows, cols = min_weight_full_bipartite_matching(graph)
    except ValueError:  # no complete assignment among those entries
        return exact()
    sol = torch.empty(n, dtype=torch.int64, device=dev)
    sol[torch.as_tensor(rows, device=dev)] = torch.as_tensor(cols, dtype=torch.int64, device=dev)
    own = c[ar, sol]
    total = float(own.sum())
    v = _potentials(n, sol[i], j, vals - own[i])
    lower = -float("inf")
    if v is not None:
        u = (c - v[None, :]).amin(1)
        lower = float(u.sum() + v.sum())
        v = (c - u[:, None]).amin(0)
        u = (c - v[None, :]).amin(1)
        lower = max(lower, float(u.sum() + v.sum()))
    return SparseAssignment(sol.cpu().numpy(), sign * total, max(0.0, total - lower), "sparse")


def candidate_keys(c: torch.Tensor, k: int) -> torch.Tensor:
    """The entries (as ``row * n + column``, sorted) that are among the ``k`` smallest of their row or of their
    column of the square ``c``."""
    n = c.shape[0]
    ar = torch.arange(n, device=c.device)
    by_row = torch.topk(c, k, dim=1, largest=False).indices
    by_col = torch.topk(c, k, dim=0, largest=False).indices
    return torch.unique(torch.cat([ar.repeat_interleave(k) * n + by_row.reshape(-1),
                                   by_col.T.reshape(-1) * n + ar.repeat(k)]))


def _potentials(n: int, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, max_iter: int = 100_000):
    """Shortest distances from a virtual source (an arc of length 0 to every node) over arcs src → dst of length w,
    by Bellman-Ford rounds over all arcs at once; None if they do not settle (a negative cycle)."""
    d = torch.zeros(n, dtype=torch.float64, device=w.device)
    for _ in range(min(max_iter, n + 1)):
        new = d.scatter_reduce(0, dst, d[src] + w, reduce="amin", include_self=True)
        if torch.equal(new, d):
            return d
        d = new
    return None


def _certified(c: np.ndarray, cols: np.ndarray, u: np.ndarray, v: np.ndarray) -> bool:
    n = c.shape[0]
    if cols.shape != (n,) or sorted(cols.tolist()) != list(range(n)) or u.shape != (n,) or v.shape != (n,):
        return False
    tol = 1e-9 * max(1.0, float(np.abs(c).max()))
    reduced = c - u[:, None] - v[None, :]
    return bool(reduced.min() >= -tol and np.abs(reduced[np.arange(n), cols]).max() <= tol)
