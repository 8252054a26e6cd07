"""Centered kernel alignment (Kornblith et al., 2019), linear and RBF, computed in torch (float64, on the
inputs' device), and the registered similarity methods ``cka`` and ``cka-rbf``.

Inputs are ``t x p`` matrices of t samples of a layer with p features (torch tensors or anything numpy
accepts). Degenerate inputs: a constant column is centred to zero and contributes nothing; if *every*
column of X or of Y is constant (zero variance, including t == 1) CKA is undefined (0/0) and 0.0 —
"no shared structure" — is returned. Results are clipped to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import HetfuseError
from ..registry import register
from .base import ActivationSimilarity, as_float64_matrix

__all__ = ["linear_cka", "rbf_cka", "as_float64_matrix", "check_pair", "LinearCKA", "RbfCKA"]


def check_pair(X, Y) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert a pair of matrices sharing their rows (samples); Y goes to X's device."""
    x = as_float64_matrix(X, "X")
    y = as_float64_matrix(Y, "Y", device=x.device)
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(f"X and Y must have the same number of rows (samples): got {x.shape[0]} and {y.shape[0]}")
    return x, y


def centre_columns(a: torch.Tensor) -> torch.Tensor:
    """Subtract column means; columns that are constant up to rounding become exactly zero."""
    c = a - a.mean(dim=0, keepdim=True)
    scale = a.abs().amax(dim=0)
    tol = 8.0 * torch.finfo(torch.float64).eps * scale * max(1, a.shape[0])
    c[:, c.abs().amax(dim=0) <= tol] = 0.0
    return c


def _clip01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


def linear_cka(X, Y) -> float:
    """Linear CKA: ``||YcᵀXc||_F² / (||XcᵀXc||_F ||YcᵀYc||_F)`` with column-centred Xc, Yc.

    Symmetric, in [0, 1], 1 for identical inputs, invariant to orthogonal transforms and isotropic
    scaling of either input; 0.0 when X or Y has zero variance in every column.
    """
    x, y = check_pair(X, Y)
    xc, yc = centre_columns(x), centre_columns(y)
    nx, ny = torch.linalg.norm(xc), torch.linalg.norm(yc)
    if nx == 0 or ny == 0:
        return 0.0
    xc, yc = xc / nx, yc / ny  # CKA is scale invariant: normalise first against overflow
    t, p = xc.shape
    q = yc.shape[1]
    if t * t <= p * q:  # the t x t Gram form is cheaper
        kx, ky = xc @ xc.T, yc @ yc.T
        hxy, hxx, hyy = float((kx * ky).sum()), float(torch.linalg.norm(kx)), float(torch.linalg.norm(ky))
    else:
        hxy = float(torch.linalg.norm(yc.T @ xc) ** 2)
        hxx, hyy = float(torch.linalg.norm(xc.T @ xc)), float(torch.linalg.norm(yc.T @ yc))
    denom = hxx * hyy
    return 0.0 if denom == 0.0 else _clip01(hxy / denom)


def _rbf_gram(a: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    a = centre_columns(a)  # distances are translation invariant; centring reduces cancellation
    sq = (a * a).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1, device=a.device)
    dists = d2[iu[0], iu[1]].sqrt()
    positive = dists[dists > 0]
    if positive.numel() == 0:  # all samples identical: constant kernel (zero variance)
        return torch.ones_like(d2)
    med = _median(dists)
    if med == 0.0:  # more than half the pairs coincide: fall back to the positive distances
        med = _median(positive)
    sigma = sigma_frac * med
    return torch.exp(-d2 / (2.0 * sigma * sigma))


def _median(t: torch.Tensor) -> float:
    """The median as numpy defines it (the mean of the two middle values for an even count)."""
    v = t.sort().values
    k = v.numel()
    return float(v[k // 2]) if k % 2 else float((v[k // 2 - 1] + v[k // 2]) / 2)


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def rbf_cka(X, Y, sigma_frac: float = 0.5) -> float:
    """CKA with RBF kernels ``exp(-||u − v||² / (2σ²))`` on the rows; σ = ``sigma_frac`` × the median distance
    between distinct samples (the median of the positive distances if that is 0). 0.0 when X or Y has
    zero variance. Invariant to orthogonal transforms, translations and isotropic scaling."""
    if isinstance(sigma_frac, bool) or not isinstance(sigma_frac, (int, float)) or not (
            math.isfinite(sigma_frac) and sigma_frac > 0):
        raise HetfuseError(f"sigma_frac must be a positive finite number, got {sigma_frac!r}")
    x, y = check_pair(X, Y)
    if x.shape[0] < 2:
        return 0.0
    kc = _centre_gram(_rbf_gram(x, float(sigma_frac)))
    lc = _centre_gram(_rbf_gram(y, float(sigma_frac)))
    nk, nl = float(torch.linalg.norm(kc)), float(torch.linalg.norm(lc))
    tol = 1e-12 * x.shape[0]
    if nk <= tol or nl <= tol:
        return 0.0
    return _clip01(float((kc * lc).sum()) / (nk * nl))


@register
class LinearCKA(ActivationSimilarity):
    family = "similarity"
    name = "cka"
    description = "linear CKA of the units' activations (pre-activations; a block: the stream at its addition)"
    reference = "Kornblith et al. 2019; CLAFusion §3.1"

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return linear_cka(a, b)


@dataclass
class _RbfParams:
    sigma_frac: float = field(default=0.5, metadata={"help": "RBF bandwidth as a fraction of the median distance"})

    def check(self) -> None:
        if not self.sigma_frac > 0:
            raise HetfuseError(f"sigma_frac must be positive, got {self.sigma_frac}")


@register
class RbfCKA(ActivationSimilarity):
    family = "similarity"
    name = "cka-rbf"
    description = "RBF-kernel CKA of the units' activations"
    reference = "Kornblith et al. 2019"
    Params = _RbfParams

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return rbf_cka(a, b, self.params.sigma_frac)
