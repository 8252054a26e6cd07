"""Layer balancing for chains of Linear + ReLU layers (CLAFusion §3.2).

``add_identity_layers`` inserts identity layers into the shallower model; ``merge_layers`` collapses
the deeper model's unmatched layers. Both take a cross-layer alignment ``a`` (0-based, strictly
increasing, ``a[j]`` = the deep layer matched to shallow layer ``j``) and return an :class:`MLP`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.spec import NetworkGraph
from ..models.mlp import MLP

MERGE_SIGNS = ("sum", "majority")


def chain_layers(model: nn.Module, graph: NetworkGraph) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Weights and biases (or None) of a chain model's Linear layers, input to output, detached CPU copies."""
    if not graph.chain:
        raise HetfuseError(f"{type(model).__name__} is not a plain chain of layers; layer balancing of "
                           "branched models is not supported")
    modules = dict(model.named_modules())
    ws, bs = [], []
    for name in graph.layer_modules:
        lin = modules[name]
        ws.append(lin.weight.detach().cpu().clone())
        bs.append(None if lin.bias is None else lin.bias.detach().cpu().clone())
    return ws, bs


def to_mlp(model: nn.Module, graph: NetworkGraph, *, bias: bool | None = None) -> MLP:
    """The same function as ``model`` as the canonical :class:`MLP`.

    ``bias=True`` gives every layer a bias (zeros where the original had none) so models with and
    without biases can be fused; ``None`` keeps each layer's own choice.
    """
    ws, bs = chain_layers(model, graph)
    if bias:
        bs = [torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b for w, b in zip(ws, bs)]
    return MLP.from_weights(ws, bs)


def _check_alignment(a: Sequence[int], m: int, n: int) -> list[int]:
    a = [int(x) for x in a]
    if len(a) != n:
        raise HetfuseError(f"alignment has {len(a)} entries for a model with {n} hidden layers")
    if any(x < 0 or x >= m for x in a) or any(a[i] >= a[i + 1] for i in range(n - 1)):
        raise HetfuseError(f"alignment {a} must be strictly increasing indices into {m} deep layers")
    return a


def add_identity_layers(shallow: MLP, alignment: Sequence[int], deep_depth: int) -> MLP:
    """Insert identity layers into ``shallow`` so that its hidden layer j lands at position ``a[j]``.

    An identity layer (weight I, zero bias) placed after a ReLU layer is exactly the identity since
    its input is non-negative. Deep positions before ``a[0]`` get identity layers on the raw input,
    which is *not* function-preserving when inputs can be negative (the paper keeps the first layer
    matched for that reason); a warning says so.
    """
    ws, bs = chain_layers(shallow, _mlp_graph(shallow))
    n = len(ws) - 1
    a = _check_alignment(alignment, deep_depth, n)
    has_bias = any(b is not None for b in bs)
    dtype = ws[0].dtype

    def identity(width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.eye(width, dtype=dtype), (torch.zeros(width, dtype=dtype) if has_bias else None)

    new_w: list[torch.Tensor] = []
    new_b: list[torch.Tensor | None] = []
    if a[0] > 0:
        warnings.warn("identity layers inserted before the first hidden layer pass the raw input through a "
                      "ReLU: not function-preserving when inputs can be negative", stacklevel=2)
    for _ in range(a[0]):
        w, b = identity(ws[0].shape[1])
        new_w.append(w)
        new_b.append(b)
    for j in range(n):
        new_w.append(ws[j])
        new_b.append(bs[j])
        gap = (a[j + 1] if j + 1 < n else deep_depth) - a[j] - 1
        for _ in range(gap):
            w, b = identity(ws[j].shape[0])
            new_w.append(w)
            new_b.append(b)
    new_w.append(ws[-1])
    new_b.append(bs[-1])
    if has_bias:
        new_b = [torch.zeros(w.shape[0], dtype=dtype) if b is None else b for w, b in zip(new_w, new_b)]
    return MLP.from_weights(new_w, new_b)


def relu_sign_estimate(preacts: torch.Tensor, sign: str = "sum") -> torch.Tensor:
    """Diagonal of D (0/1 per neuron) estimating ReLU's gate from ``t x n`` pre-activations.

    ``sum``: 1 where the sum over samples is positive; ``majority``: 1 where at least half the
    samples are positive.
    """
    if sign == "sum":
        return (preacts.sum(0) > 0).to(preacts.dtype)
    if sign == "majority":
        return ((preacts > 0).to(preacts.dtype).sum(0) >= preacts.shape[0] / 2).to(preacts.dtype)
    raise HetfuseError(f"unknown merge sign estimate {sign!r}; known: {', '.join(MERGE_SIGNS)}")


def merge_layers(deep: MLP, alignment: Sequence[int], preacts: Sequence[torch.Tensor], *,
                 sign: str = "sum") -> MLP:
    """Remove the hidden layers of ``deep`` that ``alignment`` leaves unmatched.

    A removed layer k (pre-activations z_k, gate estimate D_k) is folded into the next layer:
    W ← W_{k+1} · D_k · W_k and b ← W_{k+1} · D_k · b_k + b_{k+1}; repeated for runs of removed layers
    (also before the first matched layer and after the last, into the output layer). Exact whenever
    each removed neuron's sign is constant over the data.
    """
    ws, bs = chain_layers(deep, _mlp_graph(deep))
    m = len(ws) - 1
    if len(preacts) != m:
        raise HetfuseError(f"merge needs pre-activations of all {m} hidden layers, got {len(preacts)}")
    keep = set(int(x) for x in alignment)
    if len(keep) != len(alignment) or any(x < 0 or x >= m for x in keep):
        raise HetfuseError(f"alignment {list(alignment)} is not a set of distinct layers of a {m}-layer model")
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    new_w: list[torch.Tensor] = []
    new_b: list[torch.Tensor | None] = []
    merged_bias = False
    for i in range(m + 1):
        w, b = ws[i].to(torch.float64), bs[i]
        b = None if b is None else b.to(torch.float64)
        if pending is not None:
            pw, pb = pending
            b = w @ pb + (b if b is not None else 0.0)
            w = w @ pw
            merged_bias = True
        if i == m or i in keep:
            new_w.append(w)
            new_b.append(b)
            pending = None
        else:
            d = relu_sign_estimate(preacts[i].to(torch.float64), sign)
            pb = b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            pending = (d[:, None] * w, d * pb)
    dtype = ws[0].dtype
    if merged_bias or any(b is not None for b in new_b):
        new_b = [torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b for w, b in zip(new_w, new_b)]
    # A bias-free model merged from bias-free layers keeps zero biases: drop them to keep it bias-free.
    if all(b is None or not torch.any(b != 0) for b in new_b) and all(b is None for b in bs):
        new_b = [None] * len(new_w)
    return MLP.from_weights([w.to(dtype) for w in new_w], [None if b is None else b.to(dtype) for b in new_b])


def _mlp_graph(model: nn.Module) -> NetworkGraph:
    from ..graph.trace import describe

    return describe(model)
