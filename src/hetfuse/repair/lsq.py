"""Least-squares refit after matching (PLeaS, Nasery et al., CVPR 2025): one-shot, no gradient steps.

After the matcher has put every network's neurons into the fused neuron spaces, each fused layer's weights are
set, layer by layer from the input, by the ridge-regularised least-squares solution that makes the fused layer's
output — computed on the fused network's own inputs to that layer, i.e. with every earlier layer already refitted —
reproduce the **weighted combination of the parents' matched features**:

    Y = Σ_i β_i ⊙ Y_i,     W = argmin ‖[X 1] W − Y‖² + λ ‖W − W₀‖²   (the bias column not regularised)

``Y_i`` is network i's own output of the same layer (its balanced network, on the same samples) moved into the
fused basis by its matcher's ``out`` map (columns normalised as the combination normalises them; a general linear
map, CCA's, as it is) — its *matched features*; ``β_i`` its share of each fused neuron (its
weight where the matching is a permutation; zero where it has no member, so a neuron kept apart by a width budget
is fitted to its own parent's feature), ``X`` the fused network's input to the layer, ``W₀`` the combined weights
(the merge itself): the ridge pulls toward the merge where the samples do not determine the weights, and a merge
that already reproduces the targets (a network fused with a permuted copy of itself) is kept exactly. The ridge
``λ`` is ``ridge`` times the mean diagonal of ``XᵀX``.

Why that target: it is what the averaged weights approximate — the fused neuron of matched neurons is meant to
compute their weighted mean — so the refit removes the error of averaging weights (the interference between
neurons that matched imperfectly) without changing what the merge is; at the output layer it is the weighted mean
of the parents' logits, the ensemble's prediction. Errors do not compound, because each layer is fitted on the
inputs that the already refitted layers produce.

Which layers: every layer whose op can state its input as a regression design (Linear and ungrouped Conv2d, see
:meth:`hetfuse.graph.ops.LayerOp.design`) and that the network calls as a module. A Conv/Linear followed directly by
its BatchNorm is fitted at the BatchNorm's output (the target moved back through the BatchNorm's affine map in eval
mode), a bias-free layer's bias then going into the BatchNorm's running mean; other bias-free layers get a bias
(recorded as an edit). Depthwise convolutions, normalisation layers and embeddings keep the merged values; where
the network has BatchNorm, its statistics are reset on the samples first (``bn-reset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import HetfuseError
from ..graph.ops import layer_op
from ..registry import register
from .base import Repair, has_batchnorm

DESIGN_BYTES = 128 << 20  # one batch's regression rows at most
LOCKSTEP_BYTES = 4 << 30  # all networks run once over all samples when their values fit in this (estimated as
# REPAIR's one pass estimates them), else every layer's inputs are recomputed from the network's input in batches


class _Stop(Exception):
    """Raised by a hook once the value it waits for is read: the rest of the forward pass is not needed."""


@dataclass
class LsqParams:
    ridge: float = field(default=1e-4, metadata={
        "help": "ridge toward the merged weights, relative to the mean diagonal of the layer inputs' Gram matrix"})
    fit_samples: int | None = field(default=None, metadata={
        "help": "fit on the first this many repair samples (default: all of them; see repair_samples)"})
    outputs: Literal["mean", "direction"] = field(default="mean", metadata={
        "help": "the output layer's target: the weighted mean of the parents' outputs, or (direction) of their "
                "outputs each scaled to the examples' mean norm: for outputs read by a cosine / embedding head, "
                "where a parent with larger outputs would otherwise dominate the mean"})

    def check(self) -> None:
        if not self.ridge >= 0:
            raise HetfuseError(f"lsq: ridge must be >= 0, got {self.ridge}")
        if self.fit_samples is not None and self.fit_samples < 2:
            raise HetfuseError(f"lsq: fit_samples must be >= 2, got {self.fit_samples}")


def _read(model: nn.Module, name: str, x: torch.Tensor, *, inputs: bool) -> torch.Tensor:
    """The input (``inputs``) or output of submodule ``name`` when ``model`` runs on ``x``."""
    mod = model.get_submodule(name)
    got: list[torch.Tensor] = []

    def pre(_m, args):
        got.append(args[0].detach())
        raise _Stop

    def post(_m, _args, out):
        got.append(out.detach())
        raise _Stop

    handle = mod.register_forward_pre_hook(pre) if inputs else mod.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise HetfuseError(f"lsq: module '{name}' was not called by the network's forward pass")
    return got[0]


class _Stepper:
    """A traced network run node by node on all samples, as far as each request needs: the input of a module's call
    (before the call runs, so a refit of that module is what the rest of the pass sees) or its output. Values are
    freed after their last use, as ``torch.fx.Interpreter`` frees them."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        from torch import fx

        from ..graph.trace import trace

        self.interp = fx.Interpreter(trace(model))
        self.interp.env = {}
        self.interp.args_iter = iter([x])
        self.nodes = list(self.interp.graph.nodes)
        self.first: dict[str, int] = {}  # module name -> position of its first call
        for k, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.first.setdefault(str(n.target), k)
        self.pos = 0

    def position(self, name: str) -> int | None:
        return self.first.get(name)

    def _advance(self, stop: int) -> None:
        it = self.interp
        while self.pos < stop:
            node = self.nodes[self.pos]
            it.env[node] = it.run_node(node)
            for done in it.user_to_last_uses.get(node, []):
                del it.env[done]
            self.pos += 1

    def input_of(self, name: str) -> torch.Tensor:
        k = self.first[name]
        if self.pos > k:
            raise HetfuseError(f"lsq: module '{name}' was passed already")
        self._advance(k)
        return self.interp.env[self.nodes[k].args[0]]

    def output_of(self, name: str) -> torch.Tensor:
        k = self.first[name]
        self._advance(k + 1)
        value = self.interp.env.get(self.nodes[k])
        if value is None:
            raise HetfuseError(f"lsq: the output of module '{name}' was freed already")
        return value


def _lockstep(model: nn.Module, parents: list[nn.Module], x: torch.Tensor, order: list[tuple[str, list[str]]],
              graphs) -> list[_Stepper] | None:
    """Steppers for the fused network and every parent where one pass over all samples fits in memory and every
    network reaches the layers in the order of ``order`` (fused layer, the parents' read points); else None."""
    from .repair import _peak_bytes

    if sum(_peak_bytes(g, x.shape[0]) for g in graphs) > LOCKSTEP_BYTES:
        return None
    try:
        steppers = [_Stepper(model, x)] + [_Stepper(p, x) for p in parents]
    except Exception:  # a network torch.fx does not trace here (an exported graph): the layer-by-layer route
        return None
    fused_at = [steppers[0].position(name) for name, _ in order]
    if any(k is None for k in fused_at) or fused_at != sorted(fused_at):
        return None
    for i, st in enumerate(steppers[1:]):
        at = [st.position(reads[i]) for _, reads in order]
        if any(k is None for k in at) or at != sorted(at):
            return None
    return steppers


def _following_norm(graph, info) -> str | None:
    """The BatchNorm module that alone reads ``info``'s output (a Conv/Linear + BatchNorm pair), if any."""
    node = next((n for n in graph.gm.graph.nodes if n.name == info.node), None)
    if node is None or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module":
        return None
    norm = next((m for m in graph.modules if m.name == user.target and m.kind == "norm"), None)
    return norm.name if norm is not None else None


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) of an eval-mode BatchNorm: y = a·z + c per channel."""
    var, mean = bn.running_var.to(torch.float64), bn.running_mean.to(torch.float64)
    a = 1.0 / torch.sqrt(var + bn.eps)
    c = -mean * a
    if bn.weight is not None:
        a, c = a * bn.weight.to(torch.float64), c * bn.weight.to(torch.float64)
    if bn.bias is not None:
        c = c + bn.bias.to(torch.float64)
    return a, c


def _add_biases(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` with a zero bias in each named bias-free layer (each addition recorded as an edit)."""
    from ..graph.rewrite import apply_edit, module_spec

    for name in names:
        lin = model.get_submodule(name)
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in module_spec(lin)["args"].items()
                if k != "bias"}
        new = type(lin)(**args, bias=True).to(device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            new.bias.zero_()
        model = apply_edit(model, {"op": "replace_module", "target": name, "module": module_spec(new)}, {name: new})
    return model


def _batch_size(n_rows_per_sample: int, width: int, n: int) -> int:
    return max(1, min(n, DESIGN_BYTES // max(1, n_rows_per_sample * (width + 1) * 8)))


@torch.no_grad()
def lsq_refit(model: nn.Module, ctx, *, ridge: float = 1e-4, samples: int | None = None,
              outputs: str = "mean") -> tuple[nn.Module, dict]:
    """Refit ``model``'s layers (see the module docstring); returns the model and per-layer details."""
    from ..combine import _shares_along, shares

    prepared = ctx.prepared
    if prepared is None or ctx.weights is None:
        raise HetfuseError("repair='lsq' needs the prepared fusion (the aligned parents): run it through hetfuse.fuse "
                           "or PreparedFusion.combine")
    graph, w = ctx.graph, list(ctx.weights)
    x = ctx.x if samples is None else ctx.x[:samples]
    parents = [m.eval() for m in prepared.balanced]
    targets = _TargetMaps(prepared)
    beta = shares(prepared.aligned, w)
    weight_slot = {(s.module, s.param): si for si, s in enumerate(prepared.aligned.slots)}
    if has_batchnorm(model):
        from .bn_reset import reset_batchnorm

        reset_batchnorm(model, x)
    model.eval()
    own = dict(model.named_modules())
    layers = []
    for mi, info in enumerate(graph.modules):
        if info.kind == "param" or info.name not in own or (mi, "weight") not in weight_slot:
            continue
        op = layer_op(info.kind)
        layers.append((mi, info, op, _following_norm(graph, info)))
    missing_bias = [info.name for _, info, _, norm in layers
                    if norm is None and getattr(own[info.name], "bias", "absent") is None]
    if missing_bias:
        model = _add_biases(model, missing_bias)
    dev = next(iter(model.parameters())).device
    x = x.to(dev)
    # what each layer is fitted from, decided before any is refitted (shapes and read points do not change)
    plan: list[dict] = []
    for mi, info, op, norm in layers:
        mod = model.get_submodule(info.name)
        try:
            first = _read(model, info.name, x[:1], inputs=True)
        except HetfuseError:
            plan.append({"layer": info.name, "refit": False, "why": "not called as a module"})
            continue
        probe = op.design(mod, first.to(torch.float64))
        if probe is None:
            plan.append({"layer": info.name, "refit": False, "why": "not an ungrouped linear map"})
            continue
        si = weight_slot[(mi, "weight")]
        read_at = [g.modules[mi].name for g in prepared.balanced_graphs]
        parent_layers = [p.get_submodule(name) for p, name in zip(parents, read_at, strict=True)]
        affine = None
        if norm is not None:
            a, c = _bn_affine(model.get_submodule(norm))
            if bool((a.abs() > 1e-8).all()):
                ni = next(k for k, m in enumerate(graph.modules) if m.name == norm)
                read_at, affine = [g.modules[ni].name for g in prepared.balanced_graphs], (a.to(dev), c.to(dev))
        if not targets.supported(si):
            plan.append({"layer": info.name, "refit": False, "why": "a packed projection"})
            continue
        plan.append({"layer": info.name, "refit": True, "op": op, "norm": norm, "si": si, "read_at": read_at,
                     "parent_layers": parent_layers, "affine": affine, "rows": probe.shape[0], "d": probe.shape[1]})
    fitted = [e for e in plan if e["refit"]]
    steppers = _lockstep(model, parents, x, [(e["layer"], e["read_at"]) for e in fitted],
                         [graph, *prepared.balanced_graphs])
    details = []
    for e in plan:
        if not e["refit"]:
            details.append(e)
            continue
        name, op, si, d, read_at, affine = e["layer"], e["op"], e["si"], e["d"], e["read_at"], e["affine"]
        mod = model.get_submodule(name)
        n_out = mod.weight.shape[0]
        producing = prepared.aligned.producing[si]
        b = [(_shares_along(n_out, producing, beta[i], w[i]) if producing
              else torch.full((n_out,), float(w[i]), dtype=torch.float64)).to(dev) for i in range(len(w))]
        if steppers is not None:  # every network once over all samples: this layer's input, the parents' outputs
            layer_in = steppers[0].input_of(name)
            parent_out = [st.output_of(r) for st, r in zip(steppers[1:], read_at, strict=True)]
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
        cross = torch.zeros(d + 1, n_out, dtype=torch.float64, device=dev)
        bs = _batch_size(e["rows"], d, x.shape[0])
        for start in range(0, x.shape[0], bs):
            if steppers is not None:
                inp = layer_in[start:start + bs]
                outs = [o[start:start + bs] for o in parent_out]
            else:  # recomputed from the input, batch by batch
                xb = x[start:start + bs]
                inp = _read(model, name, xb, inputs=True)
                outs = [_read(p, read_at[i], xb, inputs=False) for i, p in enumerate(parents)]
            design = op.design(mod, inp.to(torch.float64))
            design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=design.dtype, device=dev)], 1)
            own = [targets(i, si, op.outputs(e["parent_layers"][i], o.to(torch.float64)))
                   for i, o in enumerate(outs)]
            if outputs == "direction" and not producing:  # the output layer: every parent's rows at one norm
                norms = [o.norm(dim=1, keepdim=True) for o in own]
                common = sum(norms) / len(norms)
                own = [o / n.clamp_min(1e-12) * common for o, n in zip(own, norms, strict=True)]
            target = sum(b[i] * own[i] for i in range(len(own)))
            if affine is not None:  # the BatchNorm's output -> the layer's output
                target = (target - affine[1]) / affine[0]
            gram += design.T @ design
            cross += design.T @ target
        if steppers is not None:
            del layer_in, parent_out
        w0 = torch.cat([_current_solution(op, mod, d), _current_bias(mod, n_out, dev)[None]], 0)
        lam = ridge * float(gram[:d, :d].diagonal().mean()) if d else 0.0
        reg = torch.ones(d + 1, dtype=torch.float64, device=dev)
        reg[-1] = 0.0
        lhs = gram + lam * torch.diag(reg)
        rhs = cross - gram @ w0
        if lam > 0:
            try:
                delta = torch.linalg.solve(lhs, rhs)
            except RuntimeError:
                delta = torch.linalg.pinv(lhs, hermitian=True) @ rhs
        else:
            delta = torch.linalg.pinv(lhs, hermitian=True) @ rhs
        sol = w0 + delta
        before = float(((gram @ w0 - 2 * cross) * w0).sum())
        after = float(((gram @ sol - 2 * cross) * sol).sum())
        op.load_solution(mod, sol[:d])
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_(sol[d].to(mod.bias.dtype))
        elif affine is not None:  # a bias-free conv + BatchNorm: the bias moves into the running mean
            bn = model.get_submodule(e["norm"])
            bn.running_mean.copy_((bn.running_mean.to(torch.float64) - sol[d]).to(bn.running_mean.dtype))
        details.append({"layer": name, "refit": True, "at": read_at, "inputs": d,
                        "observations": int(gram[d, d]), "ridge": lam,
                        "objective_reduction": before - after})
    return model.eval(), {"layers": details}


class _TargetMaps:
    """Network i's own output rows of a layer (observations x its neurons) moved into the fused basis: through the
    ``out`` map of the space the layer produces (normalised columns; a linear map as it is); the output layer's
    rows as they are."""

    def __init__(self, prepared) -> None:
        from ..combine import _normalised_columns
        from ..graph.correspond import slot_axes

        self.prepared = prepared
        self._norm = _normalised_columns
        self._axes = slot_axes

    def supported(self, si: int) -> bool:
        """Whether the layer's output is one whole neuron space (or the output): a packed projection (q, k and v
        rows in one weight) is kept as merged."""
        producing = self.prepared.aligned.producing[si]
        return len(producing) <= 1 and all(ax.offset is None for _, ax in producing)

    def __call__(self, i: int, si: int, rows: torch.Tensor) -> torch.Tensor:
        producing = self.prepared.aligned.producing[si]
        if not producing:
            return rows
        s = producing[0][0]
        sm = self.prepared.match.maps[i][s]
        out = sm.out.to(device=rows.device, dtype=torch.float64)
        if not self.prepared.match.linear:
            out = self._norm(out)[0]
        return rows @ out


def _current_solution(op, mod: nn.Module, d: int) -> torch.Tensor:
    """The layer's current weight as a regression solution (inputs x outputs)."""
    wt = mod.weight.detach().to(torch.float64)
    return wt.reshape(wt.shape[0], -1).T.reshape(d, -1)


def _current_bias(mod: nn.Module, n_out: int, dev) -> torch.Tensor:
    bias = getattr(mod, "bias", None)
    if bias is None:
        return torch.zeros(n_out, dtype=torch.float64, device=dev)
    return bias.detach().to(torch.float64)


@register
class LeastSquares(Repair):
    rank = 4
    name = "lsq"
    description = ("least squares after matching: refit every Linear/Conv layer, from the input on, so that on the "
                   "fused network's own inputs it reproduces the weighted mean of the parents' matched features "
                   "(ridge toward the merge)")
    reference = "PLeaS (Nasery et al., CVPR 2025)"
    Params = LsqParams

    def repair(self, model, ctx):
        model, details = lsq_refit(model, ctx, ridge=self.params.ridge, samples=self.params.fit_samples,
                                   outputs=self.params.outputs)
        refit = [d["layer"] for d in details["layers"] if d["refit"]]
        if not refit:
            raise HetfuseError("repair='lsq' found no Linear/Conv layer it can refit")
        skipped = [f"{d['layer']} ({d['why']})" for d in details["layers"] if not d["refit"]]
        if skipped:
            ctx.notes.append("lsq kept the merged weights of " + ", ".join(skipped))
        return model
