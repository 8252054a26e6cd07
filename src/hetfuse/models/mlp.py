"""Multi-layer perceptron of Linear + ReLU layers, the project's canonical fully connected model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``input_dim -> hidden[0] -> ... -> hidden[-1] -> output_dim`` with ReLU after every hidden layer.

    The layers live in ``self.layers`` (an ``nn.Sequential`` of ``Flatten, Linear, ReLU, ..., Linear``)
    so the model traces with torch.fx into a plain chain. ``bias`` is one flag for every Linear or a list
    with one flag per Linear (``len(hidden) + 1``).
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], output_dim: int,
                 bias: bool | Sequence[bool] = True) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if input_dim <= 0 or output_dim <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(f"MLP sizes must be positive, got input {input_dim}, hidden {hidden}, output {output_dim}")
        n_linear = len(hidden) + 1
        if isinstance(bias, bool):
            bias_flags = [bias] * n_linear
        else:
            bias_flags = [bool(b) for b in bias]
            if len(bias_flags) != n_linear:
                raise ValueError(f"bias needs {n_linear} flags (one per Linear), got {len(bias_flags)}")
        self.input_dim = int(input_dim)
        self.hidden = hidden
        self.output_dim = int(output_dim)
        self.bias_flags = bias_flags
        dims = [self.input_dim, *hidden, self.output_dim]
        mods: list[nn.Module] = [nn.Flatten()]
        for i in range(n_linear):
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=bias_flags[i]))
            if i < n_linear - 1:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def arch(self) -> dict:
        """JSON-serialisable architecture, stored in checkpoint metadata."""
        flags = self.bias_flags
        bias: bool | list[bool] = flags[0] if len(set(flags)) == 1 else list(flags)
        return {"type": "mlp", "input_dim": self.input_dim, "hidden": list(self.hidden),
                "output_dim": self.output_dim, "bias": bias}

    @classmethod
    def from_arch(cls, arch: dict) -> MLP:
        if arch.get("type") != "mlp":
            raise ValueError(f"not an MLP architecture: {arch!r}")
        return cls(arch["input_dim"], arch["hidden"], arch["output_dim"], bias=arch.get("bias", True))

    def extra_repr(self) -> str:
        return f"arch={self.arch()}"
