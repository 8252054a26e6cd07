"""Exact linear assignment.

``scipy.optimize.linear_sum_assignment`` is the default. ``lapjv`` (PyPI, MIT; Jonker–Volgenant) can be asked
for where it is installed; its answer is accepted only with a certificate of optimality — the dual variables it
returns must satisfy c[i, j] − u[i] − v[j] ≥ −tol everywhere and = 0 on the assignment (complementary
slackness, an O(n²) check) — else SciPy solves it. Measured here (``benchmarks/bench_assignment.py``,
``results/bench/``): lapjv is 2–3× faster than SciPy on uniform random costs, but on the activation-distance
costs of deep layers it can be 40× slower (7 s against 0.15 s at 1024 × 1024), so it is not the default.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import HetfuseError

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


def _certified(c: np.ndarray, cols: np.ndarray, u: np.ndarray, v: np.ndarray) -> bool:
    n = c.shape[0]
    if cols.shape != (n,) or sorted(cols.tolist()) != list(range(n)) or u.shape != (n,) or v.shape != (n,):
        return False
    tol = 1e-9 * max(1.0, float(np.abs(c).max()))
    reduced = c - u[:, None] - v[None, :]
    return bool(reduced.min() >= -tol and np.abs(reduced[np.arange(n), cols]).max() <= tol)
