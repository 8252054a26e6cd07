"""Similarity of the weight matrices producing two units, through their singular-value spectra."""

from __future__ import annotations

import torch

from ..registry import register
from .base import Similarity, weight_of
from .base import as_float64_matrix

__all__ = ["weight_spectrum_distance", "WeightSpectra"]


def weight_spectrum_distance(w1, w2) -> float:
    """Cosine distance between the descending singular-value spectra of two weight matrices.

    The spectra are zero-padded to the same length. Singular values do not change when rows or columns
    are permuted (or mixed orthogonally), so the distance needs no neuron alignment and works for matrices
    of different shapes. Two zero matrices are at distance 0; a zero and a non-zero one at 1. In [0, 1].
    """
    s1 = torch.linalg.svdvals(as_float64_matrix(w1, "weight 1"))
    s2 = torch.linalg.svdvals(as_float64_matrix(w2, "weight 2", device=s1.device))
    k = max(s1.numel(), s2.numel())
    s1 = torch.nn.functional.pad(s1, (0, k - s1.numel()))
    s2 = torch.nn.functional.pad(s2, (0, k - s2.numel()))
    n1, n2 = float(torch.linalg.norm(s1)), float(torch.linalg.norm(s2))
    if n1 == 0.0 or n2 == 0.0:
        return 0.0 if n1 == n2 else 1.0
    cos = float((s1 / n1) @ (s2 / n2))
    return float(min(1.0, max(0.0, 1.0 - cos)))


@register
class WeightSpectra(Similarity):
    family = "similarity"
    name = "weights"
    description = ("cosine distance between the singular-value spectra of the units' weight matrices "
                   "(comparable across shapes and neuron orders)")
    reference = "CLAFusion §3.1 (weights representation)"
    needs = "weight"
    native = "cost"
    bounded = True

    def compute(self, deep, shallow):
        dw = [weight_of(r, f"deep layer {i}") for i, r in enumerate(deep)]
        sw = [weight_of(r, f"shallow layer {j}") for j, r in enumerate(shallow)]
        out = torch.zeros(len(dw), len(sw), dtype=torch.float64)
        for i, a in enumerate(dw):
            for j, b in enumerate(sw):
                out[i, j] = weight_spectrum_distance(a, b)
        return out
