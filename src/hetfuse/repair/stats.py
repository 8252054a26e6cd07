"""Statistics repair of a fused network (REPAIR, Jordan et al.) for BatchNorm-free layers.

Averaging aligned neurons shrinks their pre-activation variance. REPAIR shifts and scales each fused
neuron's pre-activation so that its mean and standard deviation over the alignment samples equal the
weight-interpolated mean and standard deviation of the matched (aligned) parent neurons. Layers are
corrected in forward order so each correction sees the already corrected inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.activations import layer_activations
from ..graph.spec import NetworkGraph

Stats = list[tuple[torch.Tensor, torch.Tensor]]


def neuron_stats(model: nn.Module, graph: NetworkGraph, x: torch.Tensor) -> Stats:
    """Per hidden layer, the (mean, std) of every neuron's pre-activation over ``x`` (float64)."""
    return [(a.mean(0), a.std(0, unbiased=False)) for a in layer_activations(model, graph, x)]


def interpolate_stats(stats: Sequence[Stats], weights: Sequence[float]) -> Stats:
    """Weighted average of several models' per-neuron statistics (models already aligned)."""
    out = []
    for layer in zip(*stats):
        mean = sum(w * m for w, (m, _) in zip(weights, layer))
        std = sum(w * s for w, (_, s) in zip(weights, layer))
        out.append((mean, std))
    return out


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``x`` (the "BN reset" of REPAIR/ZipIt).

    The statistics are reset and accumulated as exact averages over the batches (momentum None);
    only the BatchNorm layers run in training mode, so dropout stays off. The model ends in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size])
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.eval()
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def repair_model(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, target: Stats, *,
                 eps: float = 1e-6) -> nn.Module:
    """Correct ``model`` in place so each hidden neuron matches ``target`` (mean, std) on ``x``.

    The producing Linear or Conv2d of each layer is rescaled per output neuron and its bias shifted
    (a zero bias is added where the layer had none). A neuron whose fused pre-activation is constant
    keeps its scale and only has its mean moved. Residual streams are left as fused (their channels
    are sums of several producers); the layers inside the blocks are corrected. For networks with
    BatchNorm use :func:`reset_batchnorm` instead.
    """
    modules = dict(model.named_modules())
    for l, space in enumerate(graph.spaces):
        if space.stream:
            # A residual stream is a sum of several producers read at several points: one per-channel
            # affine correction of one producer cannot set its statistics everywhere. Left as fused.
            continue
        if len(space.producers) != 1 or space.act_module != space.producers[0]:
            raise HetfuseError(f"REPAIR of the normalised layer '{space.name}' is not supported; networks with "
                               "BatchNorm are repaired by resetting its statistics")
        lin = modules[space.producers[0]]
        acts = layer_activations(model, graph, x, layers=[l])[l]
        mu_f, sd_f = acts.mean(0), acts.std(0, unbiased=False)
        dev = lin.weight.device
        mu_f, sd_f = mu_f.to(dev), sd_f.to(dev)
        mu_t, sd_t = (t.to(dev) for t in target[l])
        scale = torch.where(sd_f > eps, sd_t / sd_f.clamp_min(eps), torch.ones_like(sd_f))
        w = lin.weight.to(torch.float64)
        b = lin.bias.to(torch.float64) if lin.bias is not None else \
            torch.zeros(w.shape[0], dtype=torch.float64, device=dev)
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        new_b = (b - mu_f) * scale + mu_t
        lin.weight.copy_(new_w.to(lin.weight.dtype))
        if lin.bias is None:
            lin.bias = nn.Parameter(new_b.to(lin.weight.dtype))
        else:
            lin.bias.copy_(new_b.to(lin.bias.dtype))
    return model
