"""Preserving the early layers: every model keeps its first k depth units unmerged, the rest is merged.

Qu & Horváth ("vanishing features", PFM) observe that merging hurts most in the early layers and keep the first
layers of every model as they are: the input runs through one *branch* per model (model i's first k depth units,
moved into the fused neuron spaces: :meth:`~hetfuse.pipeline.PreparedFusion.aligned_model`, cut after unit k), the
branches' outputs are averaged with every model's share of each fused neuron, and the *tail* — the fused network
after unit k — reads the average. Its cost: k units computed once per model.

The average of features computed by different networks has a smaller spread than each of them (the variance
collapse REPAIR corrects inside a merged network); the *renormalisation* at the junction is a per-feature affine
map that gives the averaged features, on the repair samples, the share-weighted mean and standard deviation of the
branches' own features (identity where the branches agree).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .errors import HetfuseError


class MultiBranch(nn.Module):
    """One branch per model, their share-weighted average (renormalised), then the merged tail.

    ``forward(x) = tail(scale · Σ_i shares[i] · branch_i(x) + shift)``, per feature of the junction (the features
    are on axis ``feature_axis``: 1 for N x C (x H x W), -1 for N x tokens x C). ``shares``: branches x features,
    every column sums to 1 (model i's share of each fused neuron: its weight, or less where its matched neurons
    are fewer); ``scale``/``shift``: the renormalisation (1 and 0 when off). The output is the tail's, a normal
    (batch, outputs) tensor."""

    def __init__(self, branches: list[nn.Module], tail: nn.Module, features: int, feature_axis: int = 1) -> None:
        super().__init__()
        if len(branches) < 2:
            raise HetfuseError(f"a multi-branch network needs at least two branches, got {len(branches)}")
        if feature_axis not in (1, -1):
            raise HetfuseError(f"feature_axis must be 1 or -1, got {feature_axis!r}")
        self.branches = nn.ModuleList(branches)
        self.tail = tail
        self.features = int(features)
        self.feature_axis = int(feature_axis)
        self.register_buffer("shares", torch.full((len(branches), self.features), 1.0 / len(branches)))
        self.register_buffer("scale", torch.ones(self.features))
        self.register_buffer("shift", torch.zeros(self.features))

    def _view(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shape = [1] * z.dim()
        shape[self.feature_axis] = -1
        return v.to(z.dtype).reshape(shape)

    def mixed(self, x: torch.Tensor) -> torch.Tensor:
        """The branches' share-weighted average, before the renormalisation."""
        z = None
        for i, b in enumerate(self.branches):
            f = b(x)
            term = self._view(self.shares[i], f) * f
            z = term if z is None else z + term
        return z

    def junction(self, x: torch.Tensor) -> torch.Tensor:
        """What the tail reads: the renormalised average of the branches."""
        z = self.mixed(x)
        return z * self._view(self.scale, z) + self._view(self.shift, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.junction(x))

    def path(self, i: int = 0) -> fx.GraphModule:
        """Branch ``i`` followed by the tail as one plain network (sharing their layers; no junction): the fused
        network's structure, which :func:`hetfuse.graph.describe` can describe where the multi-branch network as a
        whole (parallel branches) is no network it describes — its input and output sizes, its neuron spaces."""
        from .graph.rewrite import Unmerge
        from .graph.trace import trace

        branch, tail = trace(self.branches[i]), trace(self.tail)
        root = nn.Module()
        root.branch, root.tail = branch, tail
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}

        def copy_nodes(gm: fx.GraphModule, prefix: str, start) -> fx.Node:
            for n in gm.graph.nodes:
                if n.op == "placeholder":
                    env[n] = start if start is not None else graph.placeholder(n.name)
                elif n.op == "output":
                    return fx.map_arg(n.args[0], lambda a: env[a])
                elif n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), Unmerge):
                    index = gm.get_submodule(str(n.target)).index
                    if not torch.equal(index.cpu(), torch.arange(index.numel())):
                        raise HetfuseError("the tail of this multi-branch network reorders its input features")
                    env[n] = env[n.args[0]]
                else:
                    new = graph.node_copy(n, lambda a: env[a])
                    if n.op in ("call_module", "get_attr"):
                        new.target = f"{prefix}.{n.target}"
                    env[n] = new
            raise HetfuseError("a traced part of the multi-branch network has no output")

        out = copy_nodes(branch, "branch", None)
        graph.output(copy_nodes(tail, "tail", out))
        return fx.GraphModule(root, graph, f"{type(self.tail).__name__}Path")


# ------------------------------------------------------------------------------------------------- statistics


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Observations x features (features on ``axis``: 1, or -1 for the tokens layout)."""
    if axis == -1:
        return t.reshape(-1, t.shape[-1])
    from .graph.activations import rows

    return rows(t)


def _batches(x: torch.Tensor, model: nn.Module):
    from .repair.bn_reset import ONE_BATCH_BYTES, _per_sample_elements

    dev = next(iter(model.parameters())).device
    per = _per_sample_elements(model, x[:1].to(dev))
    size = x.shape[0] if 4 * 8 * per * x.shape[0] <= ONE_BATCH_BYTES else 500
    return dev, size


class _Moments:
    """Streaming per-feature mean and standard deviation (float64)."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, r: torch.Tensor) -> None:
        r = r.detach().to(torch.float64)
        self.n += r.shape[0]
        self.s1 = self.s1 + r.sum(0)
        self.s2 = self.s2 + (r * r).sum(0)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / max(self.n, 1)
        return mean, (self.s2 / max(self.n, 1) - mean * mean).clamp_min(0.0).sqrt()


@torch.no_grad()
def renormalise(model: MultiBranch, x: torch.Tensor, *, eps: float = 1e-6) -> MultiBranch:
    """Set ``model``'s junction affine (``scale``, ``shift``) so that the averaged branch features have, on ``x``,
    the share-weighted mean and standard deviation of the branches' own features: target mean Σ_i β_i·mean_i and
    std Σ_i β_i·std_i per feature (β = ``shares``, the interpolation REPAIR uses for a fused neuron). A feature whose
    average is constant keeps scale 1 and only has its mean moved."""
    model.eval()
    dev, size = _batches(x, model)
    axis = model.feature_axis
    per_branch = [_Moments() for _ in model.branches]
    mixed = _Moments()
    shares = model.shares.to(torch.float64)
    for start in range(0, x.shape[0], size):
        xb = x[start:start + size].to(dev)
        z = None
        for i, b in enumerate(model.branches):
            f = _rows(b(xb), axis).to(torch.float64)
            per_branch[i].add(f)
            z = shares[i] * f if z is None else z + shares[i] * f
        mixed.add(z)
    mean_t = sum(shares[i] * m.get()[0] for i, m in enumerate(per_branch))
    std_t = sum(shares[i] * m.get()[1] for i, m in enumerate(per_branch))
    mean_z, std_z = mixed.get()
    scale = torch.where(std_z > eps, std_t / std_z.clamp_min(eps), torch.ones_like(std_z))
    model.scale.copy_(scale.to(model.scale.dtype))
    model.shift.copy_((mean_t - mean_z * scale).to(model.shift.dtype))
    return model


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def repair_tail(model: MultiBranch, graph, x: torch.Tensor, target, spaces: list[int], *,
                eps: float = 1e-6) -> MultiBranch:
    """REPAIR of the tail: shift and scale each neuron of ``spaces`` whose producing layer is in the tail (forward
    order, each correction seeing the corrected inputs) so that its pre-activation's mean and standard deviation on
    ``x`` — the multi-branch network run as a whole, the junction included — equal ``target(space)``. Bias-free
    producers get a bias (recorded as an edit of the tail). One pass over all samples where the values fit in
    memory (forward hooks correcting each layer as its output is known, as REPAIR's one pass), else one batched
    pass per layer."""
    from .graph.activations import rows
    from .repair.repair import _correct, _with_biases

    def in_tail(name: str) -> bool:
        try:
            model.tail.get_submodule(name)
            return True
        except AttributeError:
            return False

    mine = [s for s in spaces if in_tail(graph.spaces[s].producers[0])]
    if not mine:
        return model
    model.tail = _with_biases(model.tail, graph, mine)
    model.eval()

    def obs(s: int, out: torch.Tensor) -> torch.Tensor:
        last = graph.spaces[s].act_nodes[0] in graph.feature_last
        return (out.reshape(-1, out.shape[-1]) if last else rows(out)).to(torch.float64)

    def fix(s: int, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        last = graph.spaces[s].act_nodes[0] in graph.feature_last
        shape = [1] * (out.dim() - 1) + [-1] if last else [1, -1] + [1] * (out.dim() - 2)
        return (out.to(torch.float64) * scale.view(shape) + shift.view(shape)).to(out.dtype)

    dev, size = _batches(x, model)
    layers = {s: model.tail.get_submodule(graph.spaces[s].producers[0]) for s in mine}
    if size >= x.shape[0]:  # one pass: each hook corrects its layer, later layers see the corrected output
        def hook_for(s):
            def hook(lin, _args, out):
                r = obs(s, out)
                scale, shift = _correct(lin, r.mean(0), r.std(0, unbiased=False), *target(s), eps)
                return fix(s, out, scale, shift)
            return hook

        hooks = [layers[s].register_forward_hook(hook_for(s)) for s in mine]
        try:
            model(x.to(dev))
        finally:
            for h in hooks:
                h.remove()
        return model
    for s in mine:  # forward order (spaces are listed in forward order)
        acc = _Moments()
        h = layers[s].register_forward_hook(lambda _m, _a, out, s=s, acc=acc: acc.add(obs(s, out)))
        try:
            for start in range(0, x.shape[0], size):
                model(x[start:start + size].to(dev))
        finally:
            h.remove()
        mean, std = acc.get()
        _correct(layers[s], mean, std, *target(s), eps)
    return model


# ------------------------------------------------------------------------------------------------- assembly


def preserve_cut(graph, k: int) -> tuple[str, int]:
    """The fx node after the first ``k`` depth units of the fused network and the neuron space its value lives in;
    ``k`` must leave at least one unit to merge."""
    from .graph.groups import depth_groups

    units = [u for g in depth_groups(graph) for u in g.units]
    if not 1 <= k < len(units):
        raise HetfuseError(f"preserve_until={k}: the fused network has {len(units)} depth units "
                           f"({', '.join(u.name for u in units)}); keep between 1 and {len(units) - 1} of them "
                           "unmerged (0 or None: the plain merge)")
    return units[k - 1].out_node, units[k - 1].space


def assemble_branches(prepared, weights: list[float], fused: nn.Module, method) -> MultiBranch:
    """The multi-branch network of a prepared fusion (``prepared.config.preserve_until`` = k > 0): every model's
    aligned network truncated after unit k, the share-weighted average renormalised (``preserve_renorm``), the fused
    network ``fused`` after unit k as the tail; then the repair ``method`` (see :func:`repair_branches`)."""
    from .combine import shares
    from .graph.rewrite import Unmerge, apply_edit, editable_copy

    k = int(prepared.config.preserve_until)
    graph = prepared.graph
    cut, space = preserve_cut(graph, k)
    width = graph.spaces[space].size
    axis = -1 if cut in graph.feature_last else 1
    branches = [apply_edit(editable_copy(prepared.aligned_model(i)), {"op": "truncate", "at": cut})
                for i in range(len(prepared.balanced))]
    beta = shares(prepared.aligned, weights)
    generic = method.name not in _OWN_RULES
    if generic:  # a repair without a rule of its own here: it repairs the whole fused network, whose tail is kept
        fused = _repair_whole(prepared, weights, fused, method)
    ident = Unmerge(width)
    ident.index.copy_(torch.arange(width))
    ref = next(iter(fused.parameters()))
    edit = {"op": "tail", "after": cut, "features": width, "module": "hetfuse_unmerge"}
    tail = apply_edit(editable_copy(fused), edit, {"hetfuse_unmerge": ident.to(ref.device)})
    model = MultiBranch(branches, tail, width, axis).to(device=ref.device)
    model.shares.copy_(torch.stack([b[space] for b in beta]).to(model.shares.dtype))
    model.eval()
    if not generic:
        model = repair_branches(model, prepared, weights, method)
    elif prepared.config.preserve_renorm:
        renormalise(model, prepared.repair_samples)
    return model.eval()


_OWN_RULES = {"none", "bn-reset", "repair", "auto"}


def _target_stats(prepared, beta):
    """space -> (mean, std): the parents' statistics interpolated with the shares ``beta`` (what REPAIR sets a
    fused neuron to; as :meth:`~hetfuse.pipeline.PreparedFusion.combine`)."""

    def target(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        stats = prepared.parent_stats()
        mean = sum(beta[i][s].to(stats[i][s][0].device) * stats[i][s][0] for i in range(len(beta)))
        std = sum(beta[i][s].to(stats[i][s][1].device) * stats[i][s][1] for i in range(len(beta)))
        return mean, std

    return target


def _repair_whole(prepared, weights: list[float], fused: nn.Module, method) -> nn.Module:
    """The whole fused network repaired by ``method``, as the plain merge repairs it."""
    from .combine import shares
    from .repair.base import RepairContext

    target = _target_stats(prepared, shares(prepared.aligned, weights))
    return method.repair(fused, RepairContext(prepared.graph, prepared.repair_samples, target, prepared=prepared,
                                              weights=list(weights)))


def repair_branches(model: MultiBranch, prepared, weights: list[float], method) -> MultiBranch:
    """The statistics repair of a multi-branch network, in forward order: the BN reset of the branches (their
    BatchNorms see what the parents' would), the junction's renormalisation, then the tail — its BatchNorms reset
    on the renormalised junction (``bn-reset``, ``auto``), its BatchNorm-free layers corrected by REPAIR towards the
    interpolated parent statistics (``repair``, ``auto``; :func:`repair_tail`). ``none`` leaves the network as
    assembled (the renormalisation, if on, still runs: it is part of the assembly)."""
    from .combine import shares
    from .repair.bn_reset import reset_batchnorm
    from .repair.repair import repairable_spaces

    x = prepared.repair_samples
    name = method.name
    bn = name in ("bn-reset", "auto") and bool(_norms(model))
    rep = name in ("repair", "auto")
    spaces = repairable_spaces(prepared.graph) if rep else []
    if name == "repair" and not spaces:
        raise HetfuseError("repair='repair' found no BatchNorm-free layer to correct; use 'bn-reset' or 'auto'")
    if bn and any(_norms(b) for b in model.branches):
        reset_batchnorm(model, x, only=[m for b in model.branches for m in _norms(b)])
    if prepared.config.preserve_renorm:
        renormalise(model, x)
    tail_norms = _norms(model.tail)
    if bn and tail_norms:  # every BatchNorm normalising with batch statistics during the pass, as the full reset
        reset_batchnorm(model, x, only=tail_norms, train_all=True)
    if spaces:
        beta = shares(prepared.aligned, weights)
        model = repair_tail(model, prepared.graph, x, _target_stats(prepared, beta), spaces)
        if bn and tail_norms:  # corrected layers change what later BatchNorms see
            reset_batchnorm(model, x, only=tail_norms, train_all=True)
    return model.eval()
