"""Collect the (pre-)activations of every neuron space on a batch of inputs."""

from __future__ import annotations

import torch
from torch import nn

from .spec import NetworkGraph


@torch.no_grad()
def layer_activations(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, *,
                      batch_size: int = 1000) -> list[torch.Tensor]:
    """Pre-activations of each hidden layer: one ``t x n_l`` float64 tensor per neuron space.

    Read at the output of each space's ``act_module`` (the Linear, or its BatchNorm) and cloned at
    once, so an in-place ReLU that follows cannot overwrite them. Evaluated in eval mode.
    """
    modules = dict(model.named_modules())
    store: list[list[torch.Tensor]] = [[] for _ in graph.spaces]
    handles = []
    for i, space in enumerate(graph.spaces):
        def hook(_m, _inp, out, i=i):
            o = out.detach()
            if o.dim() > 2:  # conv channels: (batch, C, H, W) -> rows are (sample, position)
                o = o.movedim(1, -1).reshape(-1, o.shape[1])
            store[i].append(o.to(torch.float64, copy=True).cpu())
        handles.append(modules[space.act_module].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in store]
