"""Centred kernel alignment (CKA) between two representations of the same samples.

Both functions take ``X`` (t × p) and ``Y`` (t × q): the same t samples (rows) seen through two
layers with p and q features.  Inputs may be torch tensors or numpy arrays of any real float (or
integer) dtype; everything is computed in float64 on the CPU.

Degenerate inputs: a constant column is simply centred to zero and contributes nothing (no NaN).
If *every* column of ``X`` or of ``Y`` is constant (zero variance, including t == 1) CKA is
undefined (0/0); both functions then return ``0.0`` — "no shared structure" — rather than NaN.
Results are clipped to [0, 1] to remove floating-point overshoot.
"""

from __future__ import annotations

import math

import numpy as np

from hetfuse.errors import HetfuseError

__all__ = ["linear_cka", "rbf_cka", "as_float64_matrix", "check_pair"]


def as_float64_matrix(a, name: str) -> np.ndarray:
    """Return ``a`` as a finite 2-D float64 numpy array, or raise :class:`HetfuseError`."""
    if hasattr(a, "detach"):  # torch tensor (possibly on an accelerator / requiring grad)
        a = a.detach().cpu()
        if a.is_complex():
            raise HetfuseError(f"{name} must be real-valued, got complex dtype {a.dtype}")
        a = a.double().numpy()
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged nested lists etc.
        raise HetfuseError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.dtype == object or np.iscomplexobj(arr):
        raise HetfuseError(f"{name} must be a real numeric matrix, got dtype {arr.dtype}")
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise HetfuseError(f"{name} must be a real numeric matrix: {exc}") from exc
    if arr.ndim != 2:
        raise HetfuseError(f"{name} must be 2-D (samples × features), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HetfuseError(f"{name} must be non-empty, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise HetfuseError(f"{name} contains NaN or infinite values")
    return arr


def check_pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a pair of matrices sharing their rows (samples)."""
    x = as_float64_matrix(X, "X")
    y = as_float64_matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise HetfuseError(
            f"X and Y must have the same number of rows (samples): got {x.shape[0]} and {y.shape[0]}"
        )
    return x, y


def _centre_columns(a: np.ndarray) -> np.ndarray:
    """Subtract column means; columns that are constant up to rounding become exactly zero."""
    c = a - a.mean(axis=0, keepdims=True)
    # A constant column can leave rounding residue (mean not exactly representable); treat a
    # column as constant when its centred values are at rounding level relative to its magnitude.
    scale = np.max(np.abs(a), axis=0)
    tol = 8.0 * np.finfo(np.float64).eps * scale * max(1, a.shape[0])
    c[:, np.max(np.abs(c), axis=0) <= tol] = 0.0
    return c


def _clip01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


def linear_cka(X, Y) -> float:
    """Linear CKA: ``||YcᵀXc||_F² / (||XcᵀXc||_F ||YcᵀYc||_F)`` with column-centred Xc, Yc.

    ``X`` is t × p, ``Y`` is t × q (same t samples).  Symmetric, in [0, 1], equal to 1 for
    identical inputs, invariant to orthogonal transforms and isotropic scaling of either input.
    Returns 0.0 when X or Y has zero variance in every column (see module docstring).
    Raises :class:`HetfuseError` for non-2-D, empty, non-finite or row-mismatched inputs.
    """
    x, y = check_pair(X, Y)
    xc = _centre_columns(x)
    yc = _centre_columns(y)
    # Normalise each matrix first (CKA is scale invariant) to avoid overflow/underflow.
    nx = np.linalg.norm(xc)
    ny = np.linalg.norm(yc)
    if nx == 0.0 or ny == 0.0:
        return 0.0
    xc = xc / nx
    yc = yc / ny
    t, p = xc.shape
    q = yc.shape[1]
    if t * t <= p * q:  # Gram (t × t) form is cheaper
        k = xc @ xc.T
        l = yc @ yc.T
        hsic_xy = float(np.sum(k * l))
        hsic_xx = float(np.linalg.norm(k))
        hsic_yy = float(np.linalg.norm(l))
    else:
        hsic_xy = float(np.linalg.norm(yc.T @ xc) ** 2)
        hsic_xx = float(np.linalg.norm(xc.T @ xc))
        hsic_yy = float(np.linalg.norm(yc.T @ yc))
    denom = hsic_xx * hsic_yy
    if denom == 0.0:
        return 0.0
    return _clip01(hsic_xy / denom)


def _rbf_gram(a: np.ndarray, sigma_frac: float) -> np.ndarray:
    # Distances are translation invariant; centring first removes constant columns exactly and
    # reduces cancellation in the ||u||² + ||v||² − 2⟨u, v⟩ expansion.
    a = _centre_columns(a)
    sq = np.sum(a * a, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (a @ a.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    iu = np.triu_indices(a.shape[0], k=1)
    dists = np.sqrt(d2[iu])
    positive = dists[dists > 0]
    if positive.size == 0:  # all samples identical: constant kernel (zero variance)
        return np.ones_like(d2)
    med = float(np.median(dists))
    if med == 0.0:  # more than half the pairs coincide: fall back to the positive distances
        med = float(np.median(positive))
    sigma = sigma_frac * med
    return np.exp(-d2 / (2.0 * sigma * sigma))


def _centre_gram(k: np.ndarray) -> np.ndarray:
    return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()


def rbf_cka(X, Y, sigma_frac: float = 0.5) -> float:
    """CKA with RBF kernels ``k(u, v) = exp(-||u − v||² / (2σ²))`` on the rows (samples).

    σ is chosen per input as ``sigma_frac`` × the median Euclidean distance between distinct
    samples (pairs i < j), following Kornblith et al. (2019); if that median is 0 the median of
    the positive distances is used.  CKA = ⟨HKH, HLH⟩_F / (||HKH||_F ||HLH||_F) with the
    centring matrix H.  Returns 0.0 when X or Y has zero variance (all rows identical, or t == 1).
    Invariant to orthogonal transforms, translations and isotropic scaling of either input.
    """
    if isinstance(sigma_frac, bool) or not isinstance(sigma_frac, (int, float)) or not (
        math.isfinite(sigma_frac) and sigma_frac > 0
    ):
        raise HetfuseError(f"sigma_frac must be a positive finite number, got {sigma_frac!r}")
    x, y = check_pair(X, Y)
    if x.shape[0] < 2:
        return 0.0
    kc = _centre_gram(_rbf_gram(x, float(sigma_frac)))
    lc = _centre_gram(_rbf_gram(y, float(sigma_frac)))
    nk = float(np.linalg.norm(kc))
    nl = float(np.linalg.norm(lc))
    # A constant kernel centres to rounding noise only; treat as zero variance.
    tol = 1e-12 * x.shape[0]
    if nk <= tol or nl <= tol:
        return 0.0
    return _clip01(float(np.sum(kc * lc)) / (nk * nl))
