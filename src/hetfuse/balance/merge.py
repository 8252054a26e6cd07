"""Balancing by merging the deeper network's unmatched fully connected layers (CLAFusion §3.2, "merge").

A removed layer k (weights W_k, b_k; an eval-mode BatchNorm after it is folded in first) is folded into the
layer that consumes it: W ← W_{k+1} · D_k · W_k and b ← W_{k+1} · D_k · b_k + b_{k+1}, where the diagonal 0/1
matrix D_k estimates its ReLU from its pre-activations over the samples (``sum``: the sign of their sum;
``majority``: positive on at least half of the samples). Runs of removed layers fold one after another.
Exact whenever every removed neuron's sign is constant over the data. Convolutional layers are not
merged: composing two kernels changes the kernel size, and no paper defines it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.activations import layer_activations
from ..graph.rewrite import apply_edit, editable_copy, module_spec
from ..graph.trace import trace
from ..registry import register
from .base import Balancer

MERGE_SIGNS = ("sum", "majority")


def relu_sign_estimate(preacts: torch.Tensor, sign: str = "sum") -> torch.Tensor:
    """Diagonal of D (0/1 per neuron) estimating ReLU's gate from ``t x n`` pre-activations."""
    if sign == "sum":
        return (preacts.sum(0) > 0).to(preacts.dtype)
    if sign == "majority":
        return ((preacts > 0).to(preacts.dtype).sum(0) >= preacts.shape[0] / 2).to(preacts.dtype)
    raise HetfuseError(f"unknown merge sign estimate {sign!r}; known: {', '.join(MERGE_SIGNS)}")


@dataclass
class MergeParams:
    merge_sign: Literal["sum", "majority"] = field(default="sum", metadata={
        "help": "ReLU gate estimate of a merged layer: sign of the summed pre-activations, or majority vote"})


@register
class MergeUnits(Balancer):
    name = "merge"
    description = ("fold the deeper networks' unmatched fully connected layers into their consumers with a ReLU "
                   "sign estimate (exact where the signs are constant)")
    reference = "CLAFusion §3.2"
    direction = "merge"
    Params = MergeParams

    def balance(self, model, graph, groups, alignment, x, stats_x=None):
        fold = []
        for g, ga in zip(groups, alignment.groups, strict=False):
            if ga.deep == ga.shallow:
                continue
            if g.kind != "linear":
                what = "residual blocks" if g.kind == "block" else "convolutional layers"
                raise HetfuseError(f"merge of {what} is not supported (group {g.name}): folding them would compose "
                                   "kernels or blocks, which no method defines; use balance='add'")
            if len(g.units) != ga.deep:
                raise HetfuseError(f"group {g.name} has {len(g.units)} units, the alignment expects {ga.deep}")
            keep = set(ga.alignment)
            fold.extend(u for j, u in enumerate(g.units) if j not in keep)
        if not fold:
            return model
        if x is None:
            raise HetfuseError("merge needs samples to estimate the ReLU gates of the merged layers")
        acts = layer_activations(model, graph, x, layers=[u.space for u in fold])
        out = editable_copy(model)
        for u in fold:
            out = _fold_unit(out, u, acts[u.space], self.params.merge_sign)
        return out.train(model.training)


def _fold_unit(model: nn.Module, u, preacts: torch.Tensor, sign: str) -> nn.Module:
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    producer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == u.weight]
    if len(producer_nodes) != 1:
        raise HetfuseError(f"cannot fold layer '{u.weight}': it is not called exactly once")
    p_node = producer_nodes[0]
    out_node = nodes[u.out_node]
    users = list(out_node.users)
    if len(users) != 1 or users[0].op != "call_module" or not isinstance(modules[users[0].target], nn.Linear):
        raise HetfuseError(f"cannot fold layer '{u.weight}' into its consumer: its output must feed exactly one "
                           "Linear layer directly")
    c_node = users[0]
    producer, consumer = modules[u.weight], modules[c_node.target]
    if not isinstance(producer, nn.Linear):
        raise HetfuseError(f"merge folds Linear layers only; '{u.weight}' is a {type(producer).__name__}")
    w = producer.weight.detach().to(torch.float64)
    b = producer.bias.detach().to(torch.float64) if producer.bias is not None else torch.zeros(w.shape[0],
                                                                                                dtype=torch.float64,
                                                                                                device=w.device)
    has_bias = producer.bias is not None or consumer.bias is not None
    for name in u.modules[1:]:
        bn = modules[name]
        scale = 1.0 / (bn.running_var.detach().to(torch.float64) + bn.eps).sqrt()
        shift = -bn.running_mean.detach().to(torch.float64) * scale
        if bn.affine:
            g = bn.weight.detach().to(torch.float64)
            scale, shift = scale * g, shift * g + bn.bias.detach().to(torch.float64)
        w, b = scale[:, None] * w, scale * b + shift
        has_bias = True
    chain = []
    n = out_node
    while n is not p_node:
        chain.append(n)
        n = n.args[0]
    gate = relu_sign_estimate(preacts.to(torch.float64).to(w.device), sign) if any(
        _is_relu(c, modules) for c in chain) else torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
    cw = consumer.weight.detach().to(torch.float64)
    new_w = cw @ (gate[:, None] * w)
    new_b = cw @ (gate * b) + (consumer.bias.detach().to(torch.float64) if consumer.bias is not None else 0.0)
    new = nn.Linear(w.shape[1], cw.shape[0], bias=has_bias).to(device=cw.device, dtype=consumer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(new_w)
        if has_bias:
            new.bias.copy_(new_b)
    source = p_node.args[0]
    edit = {"op": "fold", "consumer": c_node.name, "source": source.name, "module": module_spec(new)}
    return apply_edit(model, edit, {str(c_node.target): new})


def _is_relu(node, modules) -> bool:
    from ..graph.ops import is_relu

    return is_relu(node, modules)
