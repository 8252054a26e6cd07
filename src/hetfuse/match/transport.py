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
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HetfuseError
from .assignment import solve_assignment

SOLVERS = ("exact", "sinkhorn")


@dataclass
class Transport:
    forward: torch.Tensor
    incoming: torch.Tensor
    solver: str
    cost: float

    @classmethod
    def identity(cls, n: int) -> Transport:
        eye = torch.eye(n, dtype=torch.float64)
        return cls(eye, eye.clone(), "identity", 0.0)

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

    @property
    def is_permutation(self) -> bool:
        f = self.forward
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


def solve_transport(cost, *, solver: str = "exact", reg: float = 0.01, max_iter: int = 10_000_000) -> Transport:
    """Optimal transport between uniform marginals for an ``n_src x n_dst`` ground cost (array or tensor).

    ``exact``: equal sizes use an exact linear assignment (:func:`~hetfuse.match.assignment.solve_assignment`:
    lapjv with a certificate, else SciPy; the exact plan is then a permutation); different sizes use POT's
    network simplex (``ot.emd``) in float64 with its result code checked; both on the host. ``sinkhorn``: entropic
    OT with regularisation ``reg`` relative to the largest cost entry, log-domain stabilised
    (:func:`sinkhorn_plan`), in float64 torch tensors on the cost's device; the transport stays there.
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
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().cpu().to(torch.float64).numpy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if not np.all(np.isfinite(cost)):
        raise HetfuseError("ground cost has NaN or Inf (check the model weights and the data)")
    n_src, n_dst = cost.shape
    if solver == "exact":
        if n_src == n_dst:
            cols, _name = solve_assignment(cost)
            rows = np.arange(n_src)
            plan = np.zeros_like(cost)
            plan[rows, cols] = 1.0 / n_src
            return Transport.from_plan(plan, "lap", float(cost[rows, cols].sum() / n_src))
        import ot

        mu = np.full(n_src, 1.0 / n_src)
        nu = np.full(n_dst, 1.0 / n_dst)
        plan, log = ot.emd(mu, nu, cost, numItermax=max_iter, log=True)
        if log.get("result_code") != 1 or log.get("warning"):
            raise HetfuseError(f"network simplex did not reach optimality ({log.get('warning')}); "
                               f"raise max_iter (now {max_iter}) or use solver='sinkhorn'")
        plan = np.where(plan > 1e-12 * plan.max(), plan, 0.0)  # drop round-off entries of the simplex
        return Transport.from_plan(plan, "emd", float(log["cost"]))
    raise HetfuseError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")


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
