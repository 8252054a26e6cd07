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
    def from_plan(cls, plan: np.ndarray, solver: str, cost: float) -> Transport:
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
    network simplex (``ot.emd``) in float64 with its result code checked. ``sinkhorn``: entropic OT in the
    log domain with regularisation ``reg`` relative to the largest cost entry. Only the solve leaves the
    cost's device.
    """
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().cpu().to(torch.float64).numpy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if not np.all(np.isfinite(cost)):
        raise HetfuseError("ground cost has NaN or Inf (check the model weights and the data)")
    n_src, n_dst = cost.shape
    mu = np.full(n_src, 1.0 / n_src)
    nu = np.full(n_dst, 1.0 / n_dst)
    if solver == "exact":
        if n_src == n_dst:
            cols, _name = solve_assignment(cost)
            rows = np.arange(n_src)
            plan = np.zeros_like(cost)
            plan[rows, cols] = 1.0 / n_src
            return Transport.from_plan(plan, "lap", float(cost[rows, cols].sum() / n_src))
        import ot

        plan, log = ot.emd(mu, nu, cost, numItermax=max_iter, log=True)
        if log.get("result_code") != 1 or log.get("warning"):
            raise HetfuseError(f"network simplex did not reach optimality ({log.get('warning')}); "
                               f"raise max_iter (now {max_iter}) or use solver='sinkhorn'")
        plan = np.where(plan > 1e-12 * plan.max(), plan, 0.0)  # drop round-off entries of the simplex
        return Transport.from_plan(plan, "emd", float(log["cost"]))
    if solver == "sinkhorn":
        if reg <= 0:
            raise HetfuseError(f"sinkhorn needs reg > 0, got {reg}")
        import ot

        scale = cost.max() if cost.max() > 0 else 1.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.sinkhorn(mu, nu, cost / scale, reg, method="sinkhorn_log", numItermax=10_000,
                               stopThr=1e-9)
        if any("did not converge" in str(w.message).lower() for w in caught):
            warnings.warn(f"sinkhorn did not converge (reg={reg}); the plan is approximate", stacklevel=2)
        if not np.all(np.isfinite(plan)):
            raise HetfuseError(f"sinkhorn produced NaN (reg={reg} too small?)")
        return Transport.from_plan(plan, "sinkhorn", float((plan * cost).sum()))
    raise HetfuseError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
