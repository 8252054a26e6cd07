"""Collect the (pre-)activations of every neuron space on a batch of inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .spec import NetworkGraph
from .trace import trace


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[int]], store: list[list[torch.Tensor]]):
        super().__init__(gm)
        self.wanted = wanted
        self.store = store

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for i in self.wanted.get(n.name, ()):
            o = out.detach()
            if o.dim() > 2:  # conv channels: (batch, C, H, W) -> rows are (sample, position)
                o = o.movedim(1, -1).reshape(-1, o.shape[1])
            # copied at once, so an in-place ReLU that follows cannot overwrite it
            self.store[i].append(o.to(torch.float64, copy=True).cpu())
        return out


@torch.no_grad()
def layer_activations(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, *, batch_size: int = 1000,
                      layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Pre-activations of each hidden layer: one ``t x n_l`` float64 tensor per neuron space.

    Read at the space's ``act_nodes`` (the Linear/Conv output, or the BatchNorm after it; for a
    residual stream every point where it is formed, stacked along the rows) in eval mode. A conv
    channel contributes one row per sample and spatial position. ``layers`` restricts the result to
    those spaces (the others come back empty).
    """
    wanted: dict[str, list[int]] = {}
    for i, space in enumerate(graph.spaces):
        if layers is None or i in layers:
            for node in space.act_nodes:
                wanted.setdefault(node, []).append(i)
    store: list[list[torch.Tensor]] = [[] for _ in graph.spaces]
    was_training = model.training
    model.eval()
    try:
        gm = trace(model)
        for start in range(0, x.shape[0], batch_size):
            _Recorder(gm, wanted, store).run(x[start:start + batch_size])
    finally:
        model.train(was_training)
    return [torch.cat(parts) if parts else torch.empty(0, graph.spaces[i].size, dtype=torch.float64)
            for i, parts in enumerate(store)]
