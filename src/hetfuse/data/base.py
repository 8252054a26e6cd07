"""The in-memory data set type shared by every loader."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Dataset:
    """A classification data set held in memory (x float32 N x C x H x W, y int64)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    note: str | None = None  # caveat to report with results, e.g. "JPEG re-encoding of CIFAR-10"

    @property
    def input_dim(self) -> int:
        return int(math.prod(self.input_shape))
