"""2-Wasserstein distance between the neuron point clouds of two layers."""

from __future__ import annotations

import math

import torch

from ..errors import HetfuseError
from ..registry import register
from .base import ActivationSimilarity
from .cka import check_pair

__all__ = ["neuron_wasserstein", "Wasserstein"]

_NUM_ITER_MAX = 10_000_000


def neuron_wasserstein(X, Y) -> float:
    """2-Wasserstein distance between the columns of ``X`` (t × p) and ``Y`` (t × q).

    Each column (a neuron's responses to the same t samples) is a point in R^t; the p points of X and the
    q points of Y carry uniform weights. Exact optimal transport (POT's ``emd2``, float64, result code
    checked) on squared Euclidean distances; the square root is returned. Zero for identical or
    column-permuted inputs; symmetric.
    """
    import ot

    x, y = check_pair(X, Y)
    cost = torch.cdist(x.T, y.T).pow(2).cpu().numpy()
    a = torch.full((x.shape[1],), 1.0 / x.shape[1], dtype=torch.float64).numpy()
    b = torch.full((y.shape[1],), 1.0 / y.shape[1], dtype=torch.float64).numpy()
    value, log = ot.emd2(a, b, cost, numItermax=_NUM_ITER_MAX, log=True)
    warning, code = log.get("warning"), log.get("result_code", 1)
    if warning is not None or code != 1:
        raise HetfuseError(f"optimal transport solver did not converge (result_code={code}, warning={warning!r}) "
                           f"for point clouds of sizes {x.shape[1]} and {y.shape[1]}")
    value = float(value)
    if not math.isfinite(value):
        raise HetfuseError("optimal transport solver returned a non-finite cost")
    return math.sqrt(max(value, 0.0))


@register
class Wasserstein(ActivationSimilarity):
    family = "similarity"
    name = "wasserstein"
    description = "2-Wasserstein distance between the units' neuron point clouds (cost)"
    reference = "CLAFusion §3.1"
    native = "cost"
    bounded = False

    def pair(self, a, b):
        return neuron_wasserstein(a, b)
