"""Neuron alignment between two layers: ground costs and transport plans (OTFusion, step 2-4).

A :class:`Transport` maps the ``n_src`` neurons of a source layer onto the ``n_dst`` neurons of a
target layer. It carries two matrices (both ``n_src x n_dst``):

* ``forward`` = T · diag(1/ν), the barycentric projection ("correction"): each target neuron
  receives a convex combination of source neurons. Used on the axes that *produce* the layer
  (weight rows, biases, BatchNorm entries).
* ``incoming`` = diag(1/rowsum) · T · diag(1/ν): used on the axes that *consume* the layer (the next
  layer's input columns). A source neuron copied into k target neurons then counts once, not k
  times, in the next layer (the reference code's ``forward``-only version multiplies it by k).

For equal widths and uniform marginals the exact plan is a permutation; both matrices are then that
permutation matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import HetfuseError
from .assignment import SPARSE_K, solve_assignment, sparse_assignment

SOLVERS = ("exact", "sinkhorn", "sparse")


class Transport:
    """An optimal transport between a source's and a target's neurons: ``forward`` (n_src x n_dst, columns
    normalised: how each target neuron is made of source neurons) and ``incoming`` (rows normalised: how each
    source neuron is read from the target's), the solver's name and the transport cost. A permutation (the exact
    solver between equal sizes) is held as ``cols`` (source neuron j goes to target neuron ``cols[j]``); its
    matrices are formed only on request (:meth:`space_map` keeps it as indices)."""

    def __init__(self, forward: torch.Tensor | None = None, incoming: torch.Tensor | None = None, solver: str = "",
                 cost: float = 0.0, *, cols=None, gap: float = 0.0):
        if cols is None and (forward is None or incoming is None):
            raise ValueError("Transport needs forward and incoming matrices, or cols")
        self._forward, self._incoming = forward, incoming
        self.cols = None if cols is None else np.asarray(cols, dtype=np.int64)
        self.solver, self.cost = solver, cost
        self.gap = gap  # an approximate solver's bound on (cost - optimum) / cost; 0 for the exact ones

    @classmethod
    def identity(cls, n: int) -> Transport:
        return cls(cols=np.arange(n), solver="identity", cost=0.0)

    @classmethod
    def from_plan(cls, plan, solver: str, cost: float) -> Transport:
        """The transport of a plan (rows: source neurons, columns: target neurons); a NumPy plan gives host tensors,
        a torch plan tensors on its device (float64 both)."""
        if isinstance(plan, torch.Tensor):
            plan = plan.to(torch.float64)
            col = plan.sum(0)
            if bool((col <= 0).any()):
                raise HetfuseError(f"{solver}: transport plan leaves a target neuron without mass")
            fwd = plan / col[None, :]
            row = fwd.sum(1)
            inc = torch.where(row[:, None] > 0, fwd / torch.where(row > 0, row, 1.0)[:, None], 0.0)
            return cls(fwd, inc, solver, float(cost))
        plan = np.asarray(plan, dtype=np.float64)
        col = plan.sum(axis=0)
        if np.any(col <= 0):
            raise HetfuseError(f"{solver}: transport plan leaves a target neuron without mass")
        fwd = plan / col[None, :]
        row = fwd.sum(axis=1)
        inc = np.where(row[:, None] > 0, fwd / np.where(row > 0, row, 1.0)[:, None], 0.0)
        return cls(torch.from_numpy(fwd), torch.from_numpy(inc), solver, float(cost))

    def _permutation_matrix(self) -> torch.Tensor:
        return self.space_map().out  # the one-hot map's dense matrix (SpaceMap builds it)

    @property
    def forward(self) -> torch.Tensor:
        return self._permutation_matrix() if self.cols is not None else self._forward

    @property
    def incoming(self) -> torch.Tensor:
        return self._permutation_matrix() if self.cols is not None else self._incoming

    def space_map(self):
        """The matcher's map of this transport (:class:`~hetfuse.match.base.SpaceMap`): indices for a
        permutation, the two matrices otherwise."""
        from .base import SpaceMap

        if self.cols is not None:
            return SpaceMap.from_cols(self.cols)
        return SpaceMap(self._forward, self._incoming)

    @property
    def is_permutation(self) -> bool:
        if self.cols is not None:
            return True
        f = self._forward
        return f.shape[0] == f.shape[1] and bool(torch.all((f == 0) | (f == 1))) and \
            bool(torch.all(f.sum(0) == 1)) and bool(torch.all(f.sum(1) == 1))


def ground_cost(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distance (not squared, as in the published OTFusion runs) between neuron
    feature vectors: ``src`` is ``n_src x d`` and ``dst`` is ``n_dst x d``. float64, on ``src``'s device."""
    a = src.to(torch.float64)
    b = dst.to(device=a.device, dtype=torch.float64)
    if a.shape[1] != b.shape[1]:
        raise HetfuseError(f"neuron features differ in length: {a.shape[1]} vs {b.shape[1]}")
    c = torch.cdist(a, b)
    if not bool(torch.isfinite(c).all()):
        raise HetfuseError("ground cost has NaN or Inf (check the model weights and the data)")
    return c


def solve_transport(cost, *, solver: str = "exact", reg: float = 0.01, max_iter: int = 10_000_000,
                    k: int = SPARSE_K) -> Transport:
    """Optimal transport between uniform marginals for an ``n_src x n_dst`` ground cost (array or tensor).

    ``exact``: equal sizes use an exact linear assignment (:func:`~hetfuse.match.assignment.solve_assignment`:
    lapjv with a certificate, else SciPy; the exact plan is then a permutation); different sizes use POT's
    network simplex (``ot.emd``) in float64 with its result code checked; both on the host. ``sinkhorn``: entropic
    OT with regularisation ``reg`` relative to the largest cost entry, log-domain stabilised
    (:func:`sinkhorn_plan`), in float64 torch tensors on the cost's device; the transport stays there. ``sparse``
    (equal sizes only): the approximate assignment of :func:`~hetfuse.match.assignment.sparse_assignment` on each
    neuron's ``k`` nearest partners, with its bound on the relative optimality gap as ``gap``.
    """
    if solver == "sinkhorn":
        if reg <= 0:
            raise HetfuseError(f"sinkhorn needs reg > 0, got {reg}")
        c = torch.as_tensor(cost).detach().to(torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise HetfuseError("ground cost has NaN or Inf (check the model weights and the data)")
        top = float(c.max()) if c.numel() else 0.0
        plan, converged = sinkhorn_plan(c / (top if top > 0 else 1.0), reg)
        if not converged:
            warnings.warn(f"sinkhorn did not converge (reg={reg}); the plan is approximate", stacklevel=2)
        if not bool(torch.isfinite(plan).all()):
            raise HetfuseError(f"sinkhorn produced NaN (reg={reg} too small?)")
        return Transport.from_plan(plan, "sinkhorn", float((plan * c).sum()))
    if solver == "sparse":
        c = torch.as_tensor(cost).detach()
        if c.shape[0] != c.shape[1]:
            raise HetfuseError(f"solver='sparse' is an assignment between equal widths; these are {c.shape[0]} and "
                               f"{c.shape[1]} neurons (use solver='exact' or 'sinkhorn')")
        found = sparse_assignment(c, k=k)
        n = max(1, c.shape[0])
        return Transport(cols=found.cols, solver=found.solver, cost=found.total / n, gap=found.relative_gap)
    if solver == "exact":
        c = torch.as_tensor(cost).detach()
        if not bool(torch.isfinite(c).all()):
            raise HetfuseError("ground cost has NaN or Inf (check the model weights and the data)")
        n_src, n_dst = c.shape
        if n_src == n_dst:  # a permutation: kept as indices
            cols, _name = solve_assignment(c)
            picked = c[torch.arange(n_src, device=c.device), torch.as_tensor(cols, device=c.device)]
            return Transport(cols=cols, solver="lap", cost=float(picked.to(torch.float64).sum()) / n_src)
        plan, total = exact_plan(c, max_iter)
        return Transport.from_plan(plan, "emd", total)
    raise HetfuseError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")


def exact_plan(cost: torch.Tensor, max_iter: int = 10_000_000) -> tuple[np.ndarray, float]:
    """POT's network simplex (``ot.emd``) between uniform marginals, in float64 on the host (where the cost goes,
    once), its result code checked; returns the plan (round-off entries dropped) and its cost."""
    import ot

    c = np.ascontiguousarray(cost.detach().to(device="cpu", dtype=torch.float64).numpy())
    n_src, n_dst = c.shape
    mu = np.full(n_src, 1.0 / n_src)
    nu = np.full(n_dst, 1.0 / n_dst)
    plan, log = ot.emd(mu, nu, c, numItermax=max_iter, log=True)
    if log.get("result_code") != 1 or log.get("warning"):
        raise HetfuseError(f"network simplex did not reach optimality ({log.get('warning')}); "
                           f"raise max_iter (now {max_iter}) or use solver='sinkhorn'")
    plan = np.where(plan > 1e-12 * plan.max(), plan, 0.0)  # drop round-off entries of the simplex
    return plan, float(log["cost"])


def sinkhorn_plan(cost: torch.Tensor, reg: float, *, max_iter: int = 10_000, tol: float = 1e-9,
                  tau: float = 1e50, check_every: int = 10) -> tuple[torch.Tensor, bool]:
    """The entropic optimal transport plan between uniform marginals: argmin ⟨P, C⟩ − reg·H(P), ``cost`` C a float
    tensor (computed in float64 on its device). Returns the plan and whether the column marginals came within
    ``tol`` (L2 norm, the rows being exact after each step) in ``max_iter`` iterations — the stopping rule of POT's
    ``sinkhorn_log``, whose fixed point this is.

    Log-domain stabilised scaling (Schmitzer 2019, "absorption"): the potentials f, g are kept in the log domain
    and the kernel ``K = exp((f_i + g_j − C_ij) / reg)`` is formed from them, so its entries stay in range whatever
    ``reg``; between absorptions each iteration is two matrix–vector products with K (no exponentials, unlike a
    logsumexp per iteration); the scalings u, v are folded into f, g — and K rebuilt — once they leave
    [1/tau, tau] or a product underflows. The potentials start with two exact log-domain (c-transform) updates, so
    the first kernel's rows hold their marginals."""
    c = cost.to(torch.float64)
    n, m = c.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=c.device)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=c.device)
    log_a, log_b = a.log(), b.log()
    f = torch.zeros(n, dtype=torch.float64, device=c.device)

    def absorb(f):
        """Exact log-domain updates of g then f (c-transforms), and the kernel they give: its rows hold a."""
        g = reg * (log_b - torch.logsumexp((f[:, None] - c) / reg, dim=0))
        f = reg * (log_a - torch.logsumexp((g[None, :] - c) / reg, dim=1))
        return f, torch.exp((f[:, None] + g[None, :] - c) / reg)

    f, kernel = absorb(f)
    u = torch.ones(n, dtype=torch.float64, device=c.device)
    v = torch.ones(m, dtype=torch.float64, device=c.device)
    converged = False
    for it in range(max_iter):
        ktu = kernel.T @ u
        if it % check_every == 0 and float(torch.linalg.vector_norm(v * ktu - b)) < tol:
            converged = True
            break
        v = b / ktu
        u_new = a / (kernel @ v)
        lo = float(torch.minimum(u_new.min(), v.min()))
        hi = float(torch.maximum(u_new.max(), v.max()))
        if not (1.0 / tau < lo and hi < tau):  # also catches inf and NaN: fold u into f, rebuild from there
            f, kernel = absorb(f + reg * u.log())
            u = torch.ones_like(u)
            v = torch.ones_like(v)
        else:
            u = u_new
    return u[:, None] * kernel * v[None, :], converged
