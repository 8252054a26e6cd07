"""The fusion pipeline: describe → cross-layer alignment → balance depth → align neurons → average → repair.

``fuse`` is the one-call API. ``prepare_fusion`` does every step that does not depend on the model
weights (alignment, balancing, transport plans, parent statistics) once, so a sweep over weights
(``PreparedFusion.combine``) costs one weighted average and an optional repair per point.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .align.cla import cross_layer_alignment
from .balance.mlp import add_identity_layers, merge_layers, to_mlp
from .config import FusionConfig, normalize_weights
from .errors import DataError, HetfuseError
from .graph.activations import layer_activations
from .graph.spec import NetworkGraph
from .graph.trace import describe
from .match.align import align_model
from .repair.stats import Stats, has_batchnorm, interpolate_stats, neuron_stats, repair_model, reset_batchnorm
from .similarity.representations import LayerRep, layer_cost_matrix


@dataclass
class FusionResult:
    """``model``: the fused network (an ordinary ``nn.Module``, eval mode). ``report``: JSON-able dict
    with the layer mappings, CLA cost matrices, the solver used per layer and timings."""

    model: nn.Module
    report: dict
    config: FusionConfig


@dataclass
class PreparedFusion:
    """Models aligned to the target; combine them with any weights."""

    config: FusionConfig
    target_index: int
    target_model: nn.Module
    target_graph: NetworkGraph
    aligned_states: list[dict[str, torch.Tensor]]
    samples: torch.Tensor
    report: dict
    _stats: list[Stats] | None = field(default=None, repr=False)

    def parent_stats(self) -> list[Stats]:
        """Per aligned model, per layer, each neuron's pre-activation (mean, std) on the samples."""
        if self._stats is None:
            self._stats = []
            for state in self.aligned_states:
                self._stats.append(neuron_stats(self.model_from_state(state), self.target_graph, self.samples))
        return self._stats

    def model_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        model = copy.deepcopy(self.target_model)
        ref = model.state_dict()
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
        return model.eval()

    def aligned_model(self, i: int) -> nn.Module:
        """Model ``i`` after balancing and alignment: target's widths and depth, (nearly) model i's function."""
        return self.model_from_state(self.aligned_states[i])

    def combine(self, weights: Sequence[float] | None = None, *, repair: bool | None = None) -> nn.Module:
        """The fused model for ``weights`` (``weights[i]`` belongs to model i)."""
        w = normalize_weights(weights if weights is not None else self.config.weights, len(self.aligned_states))
        repair = self.config.repair if repair is None else repair
        keys = self.aligned_states[0].keys()
        fused_state = {}
        for k in keys:
            tensors = [s[k] for s in self.aligned_states]
            if tensors[0].is_floating_point():
                fused_state[k] = sum(wi * t for wi, t in zip(w, tensors))
            else:
                fused_state[k] = self.aligned_states[self.target_index][k]
        model = self.model_from_state(fused_state)
        if repair:
            if has_batchnorm(model):
                reset_batchnorm(model, self.samples)
            else:
                target_stats = interpolate_stats(self.parent_stats(), w)
                repair_model(model, self.target_graph, self.samples, target_stats)
        return model.eval()


def gather_samples(data, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` inputs from a tensor (a seeded random subset) or from an iterable of batches (the first
    ``n``, in order); batches may be tensors or ``(inputs, labels)`` pairs."""
    if isinstance(data, torch.Tensor):
        if data.shape[0] < n:
            raise DataError(f"fewer samples than requested: asked {n}, have {data.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        return data[torch.randperm(data.shape[0], generator=g)[:n]]
    if not isinstance(data, Iterable):
        raise DataError(f"data must be a tensor or an iterable of batches, got {type(data).__name__}")
    parts, have = [], 0
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise DataError(f"a data batch must be a tensor or (inputs, labels), got {type(batch).__name__}")
        parts.append(batch)
        have += batch.shape[0]
        if have >= n:
            break
    if have < n:
        raise DataError(f"fewer samples than requested: asked {n}, the data gave {have}")
    return torch.cat(parts)[:n]


def _check_model(i: int, model: nn.Module) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.all(torch.isfinite(p)):
            raise HetfuseError(f"model {i}: parameter '{name}' contains NaN or Inf")


def _layer_reps(model: nn.Module, graph: NetworkGraph, acts: list[torch.Tensor]) -> list[LayerRep]:
    modules = dict(model.named_modules())
    reps = []
    for space, a in zip(graph.spaces, acts):
        w = modules[space.producers[0]].weight.detach()
        reps.append(LayerRep(width=space.size, acts=a, weight=w.reshape(w.shape[0], -1)))
    return reps


def prepare_fusion(models: Sequence[nn.Module], data, config: FusionConfig) -> PreparedFusion:
    """Every weight-independent step of the fusion (see module docstring)."""
    t_start = time.perf_counter()
    models = list(models)
    config.validate(len(models))
    timings: dict[str, float] = {}
    graphs = [describe(m) for m in models]
    for i, m in enumerate(models):
        _check_model(i, m)
    in_dims = {g.input_dim for g in graphs}
    out_dims = {g.output_dim for g in graphs}
    if len(in_dims) > 1:
        raise HetfuseError(f"models take different input sizes: {[g.input_dim for g in graphs]}")
    if len(out_dims) > 1:
        raise HetfuseError(f"models give different output sizes: {[g.output_dim for g in graphs]}")
    conv = [g.conv for g in graphs]
    if any(conv) and not all(conv):
        raise HetfuseError("cannot fuse convolutional with fully connected models")
    x = gather_samples(data, config.samples, seed=config.seed)
    if conv[0]:
        if x.dim() != 4 or x.shape[1] != graphs[0].input_dim:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])}; the models expect images with "
                            f"{graphs[0].input_dim} channels (N x C x H x W)")
    else:
        feat = int(np.prod(x.shape[1:])) if x.dim() > 1 else 0
        if feat != graphs[0].input_dim:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])} ({feat} features); the models expect "
                            f"{graphs[0].input_dim} input features")
    params = [p for p in models[0].parameters()]
    device = params[0].device if params else torch.device("cpu")
    x = x.to(device=device, dtype=torch.float32)

    if conv[0]:
        # Convolutional networks keep their own modules; their structures must correspond parameter by
        # parameter (same architecture code, any widths).
        models = [copy.deepcopy(m).to(device).eval() for m in models]
        try:
            graphs = [describe(m, example=x[:2]) for m in models]
        except RuntimeError as exc:
            raise DataError(f"data samples of shape {tuple(x.shape[1:])} do not fit the models: {exc}") from exc
        # Networks of different depth are balanced in the CLA/balancing step below (conv branch).
    else:
        # Canonical form: every model as an MLP, all with biases if any has one (so parameters correspond).
        any_bias = any(m.bias is not None for mod in models for m in mod.modules() if isinstance(m, nn.Linear))
        models = [to_mlp(m, g, bias=any_bias or None).to(device).eval() for m, g in zip(models, graphs)]
        graphs = [describe(m) for m in models]
    depths = [g.depth for g in graphs]
    widths_in = [g.widths for g in graphs]
    target = config.target if config.target is not None else int(np.argmin(depths))

    t0 = time.perf_counter()
    acts = [layer_activations(m, g, x) for m, g in zip(models, graphs)]
    timings["activations_s"] = time.perf_counter() - t0

    # 1) cross-layer alignment and 2) balancing.
    t0 = time.perf_counter()
    mappings: list[dict] = []
    notes: list[str] = []
    if conv[0] and len(set(depths)) > 1:
        # CNNs: group-wise CLA (pooling groups / residual stages), balanced by adding identity convs or
        # zero residual blocks (hetfuse.align.cnn, hetfuse.balance.cnn).
        from .align.cnn import balance_cnn_models, conv_groups

        if config.balance != "add":
            raise HetfuseError("merge for convolutional layers is not supported (open research); "
                               "use balance='add'")
        counts = [[len(g.units) for g in conv_groups(m, gr)] for m, gr in zip(models, graphs)]
        if any(c != counts[0] for c in counts):
            best = max(depths)
            ref = target if depths[target] == best else depths.index(best)
            balanced, mappings, cnn_notes = balance_cnn_models(
                models, x, reference=ref, representation=config.representation, fix_first=config.fix_first,
                fix_last=config.fix_last)
            notes.extend(cnn_notes)
            for i, m in enumerate(balanced):
                if m is not models[i]:
                    models[i] = m.to(device).eval()
                    graphs[i] = describe(models[i], example=x[:2])
                    acts[i] = layer_activations(models[i], graphs[i], x)
    elif len(set(depths)) > 1:
        if config.balance == "add":
            best = max(depths)
            ref = target if depths[target] == best else depths.index(best)
        else:
            best = min(depths)
            ref = target if depths[target] == best else depths.index(best)
        for i in range(len(models)):
            if depths[i] == depths[ref]:
                mappings.append({"model": i, "reference": ref, "alignment": list(range(depths[i])), "cost": None})
                continue
            deep, shallow = (ref, i) if config.balance == "add" else (i, ref)
            cost = layer_cost_matrix(_layer_reps(models[deep], graphs[deep], acts[deep]),
                                     _layer_reps(models[shallow], graphs[shallow], acts[shallow]),
                                     config.representation)
            fix_first, fix_last = config.fix_first, config.fix_last
            if depths[shallow] == 1 and depths[deep] > 1 and fix_first and fix_last:
                # One shallow layer cannot be both the first and the last match: keep the first-layer
                # constraint, the one that matters when inputs can be negative (CLAFusion App. C).
                fix_last = False
                notes.append(f"model {shallow} has one hidden layer: the last-layer constraint was dropped")
            a = cross_layer_alignment(cost, fix_first=fix_first, fix_last=fix_last)
            mappings.append({"model": i, "reference": ref, "deep": deep, "shallow": shallow,
                             "alignment": [int(v) for v in a], "cost": np.asarray(cost).tolist()})
            if config.balance == "add":
                models[i] = add_identity_layers(models[i], a, depths[ref]).to(device).eval()
            else:
                models[i] = merge_layers(models[i], a, acts[i], sign=config.merge_sign).to(device).eval()
            graphs[i] = describe(models[i])
            acts[i] = layer_activations(models[i], graphs[i], x)
    timings["cla_balance_s"] = time.perf_counter() - t0

    # 3) neuron alignment onto the target.
    t0 = time.perf_counter()
    tgt_state = models[target].state_dict()
    aligned, solvers = [], []
    it = range(len(models))
    if config.progress:
        it = tqdm(it, desc="align", unit="model")
    for i in it:
        if i == target:
            aligned.append({k: v.detach().to(torch.float64) if v.is_floating_point() else v.clone()
                            for k, v in tgt_state.items()})
            solvers.append(["identity"] * graphs[i].depth)
            continue
        al = align_model(models[i].state_dict(), graphs[i], tgt_state, graphs[target], match=config.match,
                         src_acts=acts[i], dst_acts=acts[target], solver=config.solver, reg=config.reg)
        aligned.append(al.state)
        solvers.append([tr.solver for tr in al.transports])
    timings["align_s"] = time.perf_counter() - t0
    timings["prepare_total_s"] = time.perf_counter() - t_start

    report = {
        "n_models": len(models),
        "target": target,
        "depths_in": depths,
        "widths_in": widths_in,
        "balanced_widths": [g.widths for g in graphs],
        "fused_widths": graphs[target].widths,
        "mappings": mappings,
        "solvers": solvers,
        "timings": timings,
        "notes": notes,
        "config": config.to_dict(),
    }
    return PreparedFusion(config=config, target_index=target, target_model=models[target],
                          target_graph=graphs[target], aligned_states=aligned, samples=x, report=report)


def fuse(models: Sequence[nn.Module], data, *, weights: Sequence[float] | None = None, target: int | None = None,
         representation: str = "neurons", balance: str = "add", match: str = "ot-acts", samples: int = 400,
         repair: bool = True, seed: int = 0, config: FusionConfig | None = None, **options) -> FusionResult:
    """Fuse ``models`` (a list of ``nn.Module``, any depths and widths) into one network.

    ``data``: a tensor of inputs or an iterable of batches (tensors or ``(inputs, labels)``), from
    which ``samples`` inputs are taken for activations, alignment and repair. ``weights[i]`` is the
    weight of ``models[i]`` (uniform when None). ``target``: index of the model whose widths the fused
    model takes (default: the shallowest). Other options (``solver``, ``reg``, ``fix_first``,
    ``fix_last``, ``merge_sign``, ``progress``) are fields of :class:`FusionConfig`; pass ``config``
    to give them all at once (it then overrides the keyword arguments).
    """
    if config is None:
        config = FusionConfig(weights=list(weights) if weights is not None else None, target=target,
                              representation=representation, balance=balance, match=match, samples=samples,
                              repair=repair, seed=seed, **options)
    t0 = time.perf_counter()
    prepared = prepare_fusion(models, data, config)
    t1 = time.perf_counter()
    model = prepared.combine()
    report = dict(prepared.report)
    report["timings"] = dict(report["timings"], combine_s=time.perf_counter() - t1,
                             total_s=time.perf_counter() - t0)
    report["weights"] = prepared.config.weights
    return FusionResult(model=model, report=report, config=prepared.config)


__all__ = ["FusionResult", "PreparedFusion", "fuse", "gather_samples", "prepare_fusion"]
