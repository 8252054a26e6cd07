"""CCA Merge: every network's neurons mapped onto the target's by a general linear map from canonical correlation
analysis of their activations (Horoi et al., ICML 2024, "Harmony in Diversity: Merging Neural Networks with
Canonical Correlation Analysis").

Per neuron space s and network i ≠ target t, with a = network i's neurons (n_i) and b = the target's (n_t) read on
the same samples (pre-activations by default; ``features="post"``: after the ReLU), from the moments of
:meth:`MatchContext.statistics` (``pairs="all"``: the covariances within each network are needed too):

* covariances Σ_aa, Σ_bb, Σ_ab, each of Σ_aa and Σ_bb ridge-regularised by ``reg`` × its mean diagonal
  (Σ + reg · tr(Σ)/n · I): the regularised CCA of the paper, whose public code adds a constant γ instead (0.1 by
  default, searched over 1e-6…1e7 per experiment); a relative ridge does not depend on the activations' scale;
* K = Σ_aa^-½ Σ_ab Σ_bb^-½ = U diag(ρ) Vᵀ (thin SVD; U: n_i × m, V: n_t × m, m = min(n_i, n_t)): the canonical
  directions are Σ_aa^-½ U (network i) and Σ_bb^-½ V (target), ρ the canonical correlations;
* the map that takes a into the target's basis — project a onto network i's canonical directions (unit-variance
  canonical variates Uᵀ Σ_aa^-½ a), read them as the target's variates, and go back from the target's canonical
  directions into its basis — is b̂ = T a, T = Σ_bb^½ V Uᵀ Σ_aa^-½ (n_t × n_i). The producing side is
  ``out = Tᵀ = Σ_aa^-½ U Vᵀ Σ_bb^½`` (fused neuron k = Σ_j out[j, k] · a_j), the map of the public code;
* the consuming side is the way back, ``inn = Σ_aa^½ U Vᵀ Σ_bb^-½`` (n_i × n_t; the next layer's columns W → W inn,
  so it reads â = inn b̂). Where n_i ≤ n_t, inn is a left inverse of the out map (inn outᵀ = I: the next layer sees
  network i's own neurons exactly); in the square case (every pair kept) it is pinv(out)ᵀ = T^-1, as the engine's
  ``linear`` maps expect; where n_i > n_t it is the least-squares reconstruction of a from T a (under the
  regularised covariance), a left inverse being impossible there.

The fused width is the target's (the target's maps are the identity); with K ≥ 2 models every network is mapped
onto the target on its own. Different widths: only the min(n_i, n_t) canonical pairs exist, so T has rank at most
min(n_i, n_t): a narrower network fills an n_i-dimensional subspace of the target's neurons, a wider one keeps its
n_t best-correlated directions (the rest of it is dropped). Canonical pairs whose correlation is zero (ρ ≤ 1e-9:
directions where a covariance is singular, as dead neurons, constant channels, fewer samples than neurons, or
more neurons than inputs give) are left out: CCA does not determine the map there (any rotation between the two
null spaces is a solution), so T is zero on them rather than an arbitrary rotation.

Exact copies: where network i's activations are the target's permuted (on the samples, within a relative mean
squared difference of 1e-8 — a permuted copy), every canonical correlation of the unregularised problem is 1 and
the CCA map is that permutation on every direction the samples span (exactly, whatever the ridge: it commutes with
the permutation); it is taken as the exact permutation (solver ``cca (snapped to a permutation)``), which also
settles the null directions that CCA leaves open. So a network fused with a permuted copy of itself comes back.

Not every space takes a general linear map: the query/key and value spaces of attention heads
(``ctx.graphs[t].attention``) are matched as perm-acts matches them, by a head-structured permutation of the
activations' correlations (:func:`~hetfuse.match.heads.head_structured`; solver ``permutation (heads as units)``),
and a space read by a depthwise convolution (each channel filtered on its own, so channels cannot be mixed) by a
linear assignment of the correlations (``permutation (depthwise convolution)``); both need equal widths there.

A linear map commutes with ReLU, BatchNorm and LayerNorm (and max pooling) only when it is a permutation (for
ReLU, BatchNorm and max pooling also one with positive scales), so across the nonlinearities the CCA-aligned
network only approximates network i (as in the paper): a repair (BN reset / REPAIR, the default ``auto``)
matters. BatchNorm entries are mixed by the out map like every other producing tensor (a running variance can
come out negative until the BN reset recomputes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..graph.activations import SpaceStats
from ..registry import register
from .assignment import solve_assignment
from .base import MatchContext, MatchResult, NeuronMatcher, SpaceMap
from .heads import head_structured
from .perm import permutation_map

SNAP_TOL = 1e-8  # relative mean squared difference under which network i's activations are the target's permuted
RHO_MIN = 1e-9  # canonical correlations at or below it belong to no pair (null directions of a covariance)


@dataclass
class CCAParams:
    reg: float = field(default=1.0, metadata={
        "help": "ridge added to both networks' covariance matrices, relative to their mean diagonal (> 0); small "
                "values amplify the low-variance directions (on class-split MNIST 1e-4 gave chance level, 1 the "
                "default, larger tends to orthogonal Procrustes)"})
    features: Literal["pre", "post"] = field(default="pre", metadata={
        "help": "correlate pre-activations (default: every neuron varies, so a permutation is identifiable) or the "
                "values after the ReLU (dead neurons then tie)"})

    def check(self) -> None:
        if not self.reg > 0:
            raise HetfuseError(f"cca: reg must be positive, got {self.reg}")


def _roots(cov: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ^½ and Σ^-½ of a covariance matrix ridge-regularised by ``reg`` × its mean diagonal."""
    n = cov.shape[0]
    cov = (cov + cov.T) / 2
    scale = float(torch.diagonal(cov).clamp_min(0).mean()) if n else 0.0
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0) + reg * (scale if scale > 0 else 1.0)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T


def cca_maps(cov_a: torch.Tensor, cov_b: torch.Tensor, cov_ab: torch.Tensor,
             reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CCA map of network i's neurons a onto the target's b (see the module docstring): ``(out, inn, rho)``
    with ``out = Σ_aa^-½ U Vᵀ Σ_bb^½`` and ``inn = Σ_aa^½ U Vᵀ Σ_bb^-½`` (both n_i × n_t) and the canonical
    correlations ``rho`` (descending). ``cov_ab``: the n_i × n_t covariance between a (rows) and b (columns)."""
    cov_a, cov_b, cov_ab = (c.to(torch.float64) for c in (cov_a, cov_b, cov_ab))
    half_a, inv_a = _roots(cov_a, reg)
    half_b, inv_b = _roots(cov_b, reg)
    u, rho, vh = torch.linalg.svd(inv_a @ cov_ab @ inv_b, full_matrices=False)
    keep = rho > RHO_MIN
    rotation = u[:, keep] @ vh[keep]  # U Vᵀ over the canonical pairs
    return inv_a @ rotation @ half_b, half_a @ rotation @ inv_b, rho


def exact_permutation(st: SpaceStats, i: int, t: int, s: int, tol: float | None = None) -> np.ndarray | None:
    """``cols`` (network i's neuron j is the target's neuron ``cols[j]``) where network i's activations of space s
    are the target's permuted on the samples (relative mean squared difference at most ``tol``; default
    ``SNAP_TOL``, or 100 machine epsilons of the precision the moments were summed in if that is coarser), else
    None."""
    if tol is None:
        tol = max(SNAP_TOL, 100 * st.eps)
    sq_i, sq_t = st.squares[i][s], st.squares[t][s]
    if sq_i.shape != sq_t.shape:
        return None
    scale = float(sq_t.sum())
    # a permuted copy has the same second moments, in another order: a cheap test before the assignment
    if float((sq_i.sort().values - sq_t.sort().values).abs().sum()) > 1e-4 * scale:
        return None
    d = st.sq_distances(i, t, s)
    cols, _ = solve_assignment(d)
    if float(d[torch.arange(len(cols), device=d.device), torch.as_tensor(cols, device=d.device)].sum()) > tol * scale:
        return None
    return cols


def _need_equal(n_i: int, n_t: int, i: int, s: int, name: str, what: str) -> None:
    if n_i != n_t:
        raise HetfuseError(f"cca maps {what} by a permutation, which needs equal widths; hidden space {s} ('{name}') "
                           f"has {n_i} neurons in model {i} and {n_t} in the target")


@register
class CCA(NeuronMatcher):
    name = "cca"
    description = ("CCA Merge: a general linear map onto the target per space from the regularised canonical "
                   "correlation analysis of the activations (any widths; attention heads and depthwise channels are "
                   "permuted); pair with a repair")
    reference = "CCA Merge (Horoi et al., ICML 2024)"
    Params = CCAParams

    def match(self, ctx: MatchContext) -> MatchResult:
        t = ctx.target
        graph = ctx.graphs[t]
        widths = [sp.size for sp in graph.spaces]
        st = ctx.statistics("all", post=self.params.features == "post")
        heads = {s: att for att in graph.attention for s in (att.qk, att.v)}
        depthwise = {m.in_space for m in graph.modules if m.kind == "depthwise"}
        maps, solvers, rhos = [], [], []
        for i in range(ctx.n_models):
            if i == t:
                maps.append([SpaceMap.identity(n) for n in widths])
                solvers.append(["identity"] * len(widths))
                rhos.append(None)
                continue
            row: list[SpaceMap | None] = [None] * len(widths)
            names: list[str] = [""] * len(widths)
            mean_rho: list[float | None] = [None] * len(widths)
            for att in graph.attention:
                for s in (att.qk, att.v):
                    _need_equal(ctx.graphs[i].spaces[s].size, widths[s], i, s, graph.spaces[s].name,
                                "the spaces of attention heads")
                corr = [st.correlation(i, t, s) for s in (att.qk, att.v)]
                for s, cols in zip((att.qk, att.v), head_structured(corr, att.heads), strict=True):
                    row[s], names[s] = permutation_map(cols), "permutation (heads as units)"
            for s, n_t in enumerate(widths):
                if s in heads:
                    continue
                n_i = ctx.graphs[i].spaces[s].size
                if s in depthwise:
                    _need_equal(n_i, n_t, i, s, graph.spaces[s].name, "a space read by a depthwise convolution")
                    cols, _ = solve_assignment(st.correlation(i, t, s), maximize=True)
                    row[s], names[s] = permutation_map(cols), "permutation (depthwise convolution)"
                    continue
                cols = exact_permutation(st, i, t, s)
                if cols is not None:
                    row[s], names[s] = permutation_map(cols), "cca (snapped to a permutation)"
                    continue
                cov_a, cov_b = st.covariance(i, i, s), st.covariance(t, t, s)
                out, inn, rho = cca_maps(cov_a, cov_b, st.covariance(i, t, s), self.params.reg)
                row[s], names[s] = SpaceMap(out, inn), "cca"
                mean_rho[s] = float(rho.mean()) if rho.numel() else 0.0
            maps.append(row)
            solvers.append(names)
            rhos.append(mean_rho)
        return MatchResult(widths, maps, {"solvers": solvers, "mean_canonical_correlation": rhos}, linear=True)
