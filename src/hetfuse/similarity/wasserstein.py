"""2-Wasserstein distance between the neuron point clouds of two layers."""

from __future__ import annotations

import math

import numpy as np
import ot

from hetfuse.errors import HetfuseError
from hetfuse.similarity.cka import check_pair

__all__ = ["neuron_wasserstein"]

_NUM_ITER_MAX = 10_000_000


def neuron_wasserstein(X, Y) -> float:
    """2-Wasserstein distance between the columns of ``X`` (t × p) and ``Y`` (t × q).

    Each column (a neuron's responses to the same t samples) is a point in R^t; the p points of X
    and the q points of Y carry uniform weights 1/p and 1/q.  The exact optimal transport cost
    on float64 squared Euclidean distances is computed with POT's ``ot.emd2`` and its square root
    returned.  Zero for identical or column-permuted inputs; symmetric.
    Raises :class:`HetfuseError` for invalid inputs or if the solver does not report optimality.
    """
    x, y = check_pair(X, Y)
    xp = np.ascontiguousarray(x.T)
    yq = np.ascontiguousarray(y.T)
    cost = ot.dist(xp, yq, metric="sqeuclidean").astype(np.float64)
    cost = np.maximum(cost, 0.0)
    a = np.full(xp.shape[0], 1.0 / xp.shape[0], dtype=np.float64)
    b = np.full(yq.shape[0], 1.0 / yq.shape[0], dtype=np.float64)
    value, log = ot.emd2(a, b, cost, numItermax=_NUM_ITER_MAX, log=True)
    warning = log.get("warning")
    code = log.get("result_code", 1)
    if warning is not None or code != 1:
        raise HetfuseError(
            f"optimal transport solver did not converge (result_code={code}, warning={warning!r}) "
            f"for point clouds of sizes {xp.shape[0]} and {yq.shape[0]}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise HetfuseError("optimal transport solver returned a non-finite cost")
    return math.sqrt(max(value, 0.0))
