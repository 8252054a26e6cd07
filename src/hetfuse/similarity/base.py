"""The similarity family: how alike two units (layers or residual blocks) of two networks are.

A method computes, for the units of a deeper network's group (rows) and a shallower network's group
(columns), either a **cost** (smaller = more alike; what ``cla`` minimises) or a **similarity** (larger =
more alike; what ``sma`` and ``lma`` maximise). Each method implements one of the two and derives the other:
bounded measures in [0, 1] as 1 − x, unbounded ones by negation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from ..errors import HetfuseError
from ..registry import Method


@dataclass
class LayerRep:
    """What is known about one unit.

    width:  number of neurons (channels).
    acts:   t × width activations over t samples (conv: (sample, position) rows).
    weight: width × fan_in matrix producing the unit (conv kernels flattened).
    """

    width: int
    acts: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer)) or self.width < 1:
            raise HetfuseError(f"LayerRep.width must be a positive integer, got {self.width!r}")


class Similarity(Method):
    """Base class of the similarity family."""

    family = "similarity"
    needs: ClassVar[Literal["width", "acts", "weight"]] = "acts"
    native: ClassVar[Literal["cost", "similarity"]] = "similarity"
    bounded: ClassVar[bool] = True  # values in [0, 1]: the other form is 1 - x (else: -x)

    def matrix(self, deep: Sequence[LayerRep], shallow: Sequence[LayerRep], kind: str = "cost") -> torch.Tensor:
        """The len(deep) × len(shallow) float64 matrix of costs (``kind="cost"``) or similarities."""
        if kind not in ("cost", "similarity"):
            raise HetfuseError(f"kind must be 'cost' or 'similarity', got {kind!r}")
        deep, shallow = list(deep), list(shallow)
        for name, reps in (("deep", deep), ("shallow", shallow)):
            for k, r in enumerate(reps):
                if not isinstance(r, LayerRep):
                    raise HetfuseError(f"{name}[{k}] must be a LayerRep, got {type(r).__name__}")
        if not deep or not shallow:
            return torch.zeros(len(deep), len(shallow), dtype=torch.float64)
        m = self.compute(deep, shallow)
        if kind != self.native:
            m = 1.0 - m if self.bounded else -m
        return m

    def compute(self, deep: list[LayerRep], shallow: list[LayerRep]) -> torch.Tensor:
        raise NotImplementedError


class ActivationSimilarity(Similarity):
    """A measure of two units' activation matrices (same samples), pair by pair."""

    needs = "acts"
    native = "similarity"

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> float:
        raise NotImplementedError

    def compute(self, deep, shallow):
        da = [acts_of(r, f"deep layer {i}") for i, r in enumerate(deep)]
        sa = [acts_of(r, f"shallow layer {j}") for j, r in enumerate(shallow)]
        out = torch.zeros(len(da), len(sa), dtype=torch.float64)
        for i, a in enumerate(da):
            for j, b in enumerate(sa):
                if a.shape[0] != b.shape[0]:
                    raise HetfuseError(f"deep layer {i} has activations over {a.shape[0]} samples but shallow "
                                       f"layer {j} over {b.shape[0]}; they must use the same samples")
                out[i, j] = self.pair(a, b)
        return out


def as_float64_matrix(a, name: str, device=None) -> torch.Tensor:
    """``a`` as a finite, non-empty 2-D float64 tensor, or a :class:`HetfuseError`."""
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise HetfuseError(f"{name} must be real-valued, got complex dtype {a.dtype}")
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except Exception as exc:  # ragged nested lists etc.
            raise HetfuseError(f"{name} could not be converted to an array: {exc}") from exc
        if arr.dtype == object or np.iscomplexobj(arr):
            raise HetfuseError(f"{name} must be a real numeric matrix, got dtype {arr.dtype}")
        try:
            t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float64, copy=False)))
        except (TypeError, ValueError) as exc:
            raise HetfuseError(f"{name} must be a real numeric matrix: {exc}") from exc
    if t.dim() != 2:
        raise HetfuseError(f"{name} must be 2-D (samples × features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise HetfuseError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    t = t.to(dtype=torch.float64, device=device if device is not None else t.device)
    if not bool(torch.isfinite(t).all()):
        raise HetfuseError(f"{name} contains NaN or infinite values")
    return t


def acts_of(rep: LayerRep, where: str) -> torch.Tensor:
    if rep.acts is None:
        raise HetfuseError(f"{where}: this representation needs activations but LayerRep.acts is None")
    a = as_float64_matrix(rep.acts, f"{where} acts")
    if a.shape[1] != rep.width:
        raise HetfuseError(f"{where}: acts has {a.shape[1]} columns but the layer width is {rep.width}")
    return a


def weight_of(rep: LayerRep, where: str) -> torch.Tensor:
    if rep.weight is None:
        raise HetfuseError(f"{where}: the 'weights' representation needs LayerRep.weight but it is None")
    w = rep.weight if isinstance(rep.weight, torch.Tensor) else torch.as_tensor(np.asarray(rep.weight))
    if w.dim() < 2:
        raise HetfuseError(f"{where}: weight must have at least 2 dimensions, got shape {tuple(w.shape)}")
    w = as_float64_matrix(w.reshape(w.shape[0], -1), f"{where} weight")
    if w.shape[0] != rep.width:
        raise HetfuseError(f"{where}: weight has {w.shape[0]} rows but the layer width is {rep.width}")
    return w
