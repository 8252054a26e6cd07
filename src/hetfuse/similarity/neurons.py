"""Similarity by the number of neurons (CLAFusion's default layer representation)."""

from __future__ import annotations

import torch

from ..registry import register
from .base import Similarity


@register
class Neurons(Similarity):
    family = "similarity"
    name = "neurons"
    description = "number of neurons: cost (width_i − width_j)²"
    reference = "CLAFusion §3.1, Fig. 2"
    needs = "width"
    native = "cost"
    bounded = False

    def compute(self, deep, shallow):
        wd = torch.tensor([float(r.width) for r in deep], dtype=torch.float64)
        ws = torch.tensor([float(r.width) for r in shallow], dtype=torch.float64)
        return (wd[:, None] - ws[None, :]) ** 2
