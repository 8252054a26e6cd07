"""The repair stage: correct the statistics of the fused network's neurons.

Averaging matched neurons shrinks their variance and moves their means; BatchNorm layers keep running
statistics averaged from the parents that no longer describe the fused pre-activations. A repair method
gets the fused network and a :class:`RepairContext`: the repair samples and, per neuron space, the target
statistics — the weight-interpolated mean and standard deviation of the parents' neurons matched to each
fused neuron (network i's matched neuron is the combination of its neurons its map sends there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph.spec import NetworkGraph
from ..models import has_batchnorm  # noqa: F401  (re-exported: repair.has_batchnorm)
from ..registry import Method


@dataclass
class RepairContext:
    graph: NetworkGraph
    x: torch.Tensor
    target_stats: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # space -> (mean, std), fused basis
    notes: list[str] = field(default_factory=list)
    prepared: Any = None  # the PreparedFusion (aligned parents, shares), for repairs that read the parents' layers
    weights: list[float] | None = None  # the normalised fusion weights


class Repair(Method):
    family = "repair"

    def repair(self, model: nn.Module, ctx: RepairContext) -> nn.Module:
        """Correct ``model`` (the fused network, changed in place or replaced) and return it in eval mode."""
        raise NotImplementedError

