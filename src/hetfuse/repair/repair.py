"""REPAIR (Jordan et al. 2022) for BatchNorm-free layers."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..errors import HetfuseError
from ..graph.activations import layer_activations, rows
from ..registry import register
from .base import Repair


def repairable_spaces(graph) -> list[int]:
    """Spaces whose pre-activation is the output of one Linear/Conv2d (no BatchNorm, not a residual stream)."""
    return [layer for layer, s in enumerate(graph.spaces)
            if not s.stream and not s.norms and len(s.producers) == 1 and s.act_module == s.producers[0]]


ONE_PASS_BYTES = 1 << 30  # REPAIR runs in one pass over all samples when the values it keeps fit in this


def _with_biases(model: nn.Module, graph, spaces: list[int]) -> nn.Module:
    """``model`` with a (zero) bias in every producing layer of ``spaces`` (each addition recorded as an edit)."""
    from ..graph.rewrite import apply_edit, module_spec

    for layer in spaces:
        space = graph.spaces[layer]
        lin = model.get_submodule(space.producers[0])
        if lin.bias is None:
            new = type(lin)(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in module_spec(lin)["args"].items() if k != "bias"}, bias=True)
            new = new.to(device=lin.weight.device, dtype=lin.weight.dtype)
            new.weight.copy_(lin.weight)
            new.bias.zero_()
            spec = module_spec(new)
            model = apply_edit(model, {"op": "replace_module", "target": space.producers[0], "module": spec},
                               {space.producers[0]: new})
    return model


def _correct(lin: nn.Module, mu_f, sd_f, mu_t, sd_t, eps: float):
    """Rescale and shift ``lin``'s output neurons from (mu_f, sd_f) to (mu_t, sd_t); returns (scale, shift)."""
    dev = lin.weight.device
    mu_f, sd_f = mu_f.to(dev), sd_f.to(dev)
    mu_t, sd_t = mu_t.to(device=dev, dtype=torch.float64), sd_t.to(device=dev, dtype=torch.float64)
    scale = torch.where(sd_f > eps, sd_t / sd_f.clamp_min(eps), torch.ones_like(sd_f))
    w, b = lin.weight.to(torch.float64), lin.bias.to(torch.float64)
    lin.weight.copy_((w * scale.view(-1, *([1] * (w.dim() - 1)))).to(lin.weight.dtype))
    lin.bias.copy_(((b - mu_f) * scale + mu_t).to(lin.bias.dtype))
    return scale, mu_t - mu_f * scale


def _mean_std(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``r`` (observations x neurons), the mean and biased standard deviation in float64, from values
    shifted by the mean of the first rows (summed in ``r``'s precision, without the E[x²] - E[x]² cancellation,
    and without a float64 copy of ``r``)."""
    c = r[:64].mean(0, keepdim=True)
    d = r - c
    mean = d.sum(0).to(torch.float64) / r.shape[0]
    var = ((d * d).sum(0).to(torch.float64) / r.shape[0] - mean * mean).clamp_min(0.0)
    return mean + c[0].to(torch.float64), var.sqrt()


class _OnePass(fx.Interpreter):
    """Runs the network once on all samples, correcting each repaired layer as soon as its output is known (the
    values after it are then computed from the corrected output)."""

    def __init__(self, gm, fixes: dict[str, tuple[int, nn.Module]], target, eps: float, feature_last=frozenset()):
        super().__init__(gm)
        self.fixes, self.target, self.eps, self.feature_last = fixes, target, eps, feature_last

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.fixes:
            layer, lin = self.fixes[n.name]
            last = n.name in self.feature_last  # N x tokens x features
            r = out.reshape(-1, out.shape[-1]) if last else rows(out)
            scale, shift = _correct(lin, *_mean_std(r), *self.target(layer), self.eps)
            shape = [1] * (out.dim() - 1) + [-1] if last else [1, -1] + [1] * (out.dim() - 2)
            out = out * scale.to(out.dtype).view(shape) + shift.to(out.dtype).view(shape)
        return out


def _peak_bytes(graph, n: int) -> int:
    """A rough upper bound of the memory a one-pass REPAIR over ``n`` samples keeps (from the shapes recorded when
    the network was described)."""
    sizes = [int(torch.tensor(meta.shape).prod()) for node in graph.gm.graph.nodes
             if (meta := node.meta.get("tensor_meta")) is not None and hasattr(meta, "shape")]
    if not sizes:
        return 1 << 62
    per_sample = max(sizes) // 2  # recorded on two samples
    return 4 * per_sample * n * 8


@torch.no_grad()
def repair_spaces(model: nn.Module, graph, x: torch.Tensor, target, spaces: list[int], *,
                  eps: float = 1e-6) -> nn.Module:
    """Shift and scale each neuron of ``spaces`` (forward order, each correction seeing the corrected inputs) so
    its pre-activation's mean and standard deviation on ``x`` equal ``target(space)``. The producing layer is
    rescaled per output neuron and its bias shifted; a layer without a bias gets one (recorded as an edit).
    A neuron whose fused pre-activation is constant keeps its scale and only has its mean moved. One pass over
    all samples where the values fit in memory, else one batched pass per layer."""
    from ..graph.trace import trace

    model = _with_biases(model, graph, spaces)
    model.eval()
    if _peak_bytes(graph, x.shape[0]) <= ONE_PASS_BYTES:
        gm = trace(model)
        fixes = {graph.spaces[layer].act_nodes[0]: (layer, model.get_submodule(graph.spaces[layer].producers[0]))
                 for layer in spaces}
        dev = next(iter(model.parameters())).device
        _OnePass(gm, fixes, target, eps, graph.feature_last).run(x.to(dev))
        return model
    for layer in spaces:
        lin = model.get_submodule(graph.spaces[layer].producers[0])
        acts = layer_activations(model, graph, x, layers=[layer])[layer]
        _correct(lin, acts.mean(0), acts.std(0, unbiased=False), *target(layer), eps)
    return model


@register
class RepairMethod(Repair):
    rank = 2
    name = "repair"
    description = ("REPAIR: rescale and shift every BatchNorm-free neuron to the interpolated mean and std of its "
                   "matched parent neurons (adds biases to bias-free layers)")
    reference = "Jordan et al. 2022 (REPAIR)"

    def repair(self, model, ctx):
        spaces = repairable_spaces(ctx.graph)
        if not spaces:
            raise HetfuseError("repair='repair' found no BatchNorm-free layer to correct; use 'bn-reset' or 'auto'")
        return repair_spaces(model, ctx.graph, ctx.x, ctx.target_stats, spaces).eval()
