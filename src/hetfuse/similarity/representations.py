"""Layer representations and the cross-layer cost matrix used by CLAFusion (§3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetfuse.errors import HetfuseError
from hetfuse.similarity.cka import as_float64_matrix, linear_cka, rbf_cka
from hetfuse.similarity.wasserstein import neuron_wasserstein

__all__ = ["LayerRep", "REPRESENTATIONS", "layer_cost_matrix", "weight_spectrum_distance"]

REPRESENTATIONS = ("neurons", "cka", "cka-rbf", "wasserstein", "weights")


@dataclass
class LayerRep:
    """What is known about one hidden layer.

    width:  number of neurons (channels for a conv layer).
    acts:   t × width (pre-)activations over t samples (conv: already flattened to t rows).
    weight: width × fan_in matrix producing the layer (conv kernels flattened; a tensor with more
            than two dimensions is flattened from dimension 1 on).
    """

    width: int
    acts: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer)) or self.width < 1:
            raise HetfuseError(f"LayerRep.width must be a positive integer, got {self.width!r}")


def _acts(rep: LayerRep, where: str) -> np.ndarray:
    if rep.acts is None:
        raise HetfuseError(f"{where}: this representation needs activations but LayerRep.acts is None")
    a = as_float64_matrix(rep.acts, f"{where} acts")
    if a.shape[1] != rep.width:
        raise HetfuseError(
            f"{where}: acts has {a.shape[1]} columns but the layer width is {rep.width}"
        )
    return a


def _weight(rep: LayerRep, where: str) -> np.ndarray:
    if rep.weight is None:
        raise HetfuseError(f"{where}: the 'weights' representation needs LayerRep.weight but it is None")
    w = rep.weight
    if hasattr(w, "detach"):
        w = w.detach().cpu().double().numpy()
    w = np.asarray(w)
    if w.ndim < 2:
        raise HetfuseError(f"{where}: weight must have at least 2 dimensions, got shape {tuple(w.shape)}")
    w = w.reshape(w.shape[0], -1)
    w = as_float64_matrix(w, f"{where} weight")
    if w.shape[0] != rep.width:
        raise HetfuseError(f"{where}: weight has {w.shape[0]} rows but the layer width is {rep.width}")
    return w


def weight_spectrum_distance(w1, w2) -> float:
    """Cosine distance between the descending singular-value spectra of two weight matrices.

    The spectra are zero-padded to the same length.  Singular values are unchanged by permuting
    (or orthogonally mixing) rows or columns, so the distance needs no neuron alignment and works
    for matrices of different shapes.  Two zero matrices are at distance 0; a zero matrix and a
    non-zero one at distance 1.  Result in [0, 1].
    """
    s1 = np.linalg.svd(as_float64_matrix(w1, "weight 1"), compute_uv=False)
    s2 = np.linalg.svd(as_float64_matrix(w2, "weight 2"), compute_uv=False)
    k = max(s1.size, s2.size)
    s1 = np.pad(s1, (0, k - s1.size))
    s2 = np.pad(s2, (0, k - s2.size))
    n1 = float(np.linalg.norm(s1))
    n2 = float(np.linalg.norm(s2))
    if n1 == 0.0 or n2 == 0.0:
        return 0.0 if n1 == n2 else 1.0
    cos = float(np.dot(s1 / n1, s2 / n2))
    return float(min(1.0, max(0.0, 1.0 - cos)))


def layer_cost_matrix(
    deep: Sequence[LayerRep], shallow: Sequence[LayerRep], representation: str
) -> np.ndarray:
    """Cost matrix C (len(deep) × len(shallow), float64) with C[i, j] = dissimilarity of deep
    hidden layer i and shallow hidden layer j.

    representation:
      "neurons":     (width_i − width_j)², squared Euclidean distance of the layer widths.
      "cka":         1 − linear CKA of the activation matrices.
      "cka-rbf":     1 − RBF CKA (bandwidth 0.5 × median distance) of the activation matrices.
      "wasserstein": 2-Wasserstein distance between the neuron point clouds of the activations.
      "weights":     cosine distance between the weight matrices' singular-value spectra
                     (descending, zero-padded to equal length).  Weight matrices of different
                     shapes with unaligned neurons cannot be compared entry-wise; the spectrum is
                     invariant to neuron permutations and defined for any shape, so we compare it
                     (see :func:`weight_spectrum_distance`).
    Activation-based costs need the same number of samples t in every layer.
    Raises :class:`HetfuseError` for an unknown representation or a missing acts/weight.
    """
    if representation not in REPRESENTATIONS:
        raise HetfuseError(
            f"unknown layer representation {representation!r}; known: {', '.join(REPRESENTATIONS)}"
        )
    deep = list(deep)
    shallow = list(shallow)
    for name, reps in (("deep", deep), ("shallow", shallow)):
        for k, r in enumerate(reps):
            if not isinstance(r, LayerRep):
                raise HetfuseError(f"{name}[{k}] must be a LayerRep, got {type(r).__name__}")
    m, n = len(deep), len(shallow)
    cost = np.zeros((m, n), dtype=np.float64)
    if m == 0 or n == 0:
        return cost

    if representation == "neurons":
        wd = np.array([float(r.width) for r in deep])
        ws = np.array([float(r.width) for r in shallow])
        return (wd[:, None] - ws[None, :]) ** 2

    if representation == "weights":
        dw = [_weight(r, f"deep layer {i}") for i, r in enumerate(deep)]
        sw = [_weight(r, f"shallow layer {j}") for j, r in enumerate(shallow)]
        for i in range(m):
            for j in range(n):
                cost[i, j] = weight_spectrum_distance(dw[i], sw[j])
        return cost

    da = [_acts(r, f"deep layer {i}") for i, r in enumerate(deep)]
    sa = [_acts(r, f"shallow layer {j}") for j, r in enumerate(shallow)]
    for i in range(m):
        for j in range(n):
            if da[i].shape[0] != sa[j].shape[0]:
                raise HetfuseError(
                    f"deep layer {i} has activations over {da[i].shape[0]} samples but shallow "
                    f"layer {j} over {sa[j].shape[0]}; they must use the same samples"
                )
            if representation == "cka":
                cost[i, j] = 1.0 - linear_cka(da[i], sa[j])
            elif representation == "cka-rbf":
                cost[i, j] = 1.0 - rbf_cka(da[i], sa[j])
            else:
                cost[i, j] = neuron_wasserstein(da[i], sa[j])
    return cost
