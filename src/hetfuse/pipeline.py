"""The fusion pipeline: the order of the stages, nothing else.

    describe → similarity + depth aligner → balancer → neuron matcher → apply maps and combine → repair

Each stage is a registered method chosen in :class:`~hetfuse.config.FusionConfig` (see ``hetfuse methods``).
``prepare_fusion`` runs every step that does not depend on the model weights once (alignment, balancing,
matching, the aligned networks, the parents' statistics); ``PreparedFusion.combine(weights)`` then costs a
weighted sum and the repair.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .align.base import DepthAlignment, ModelAlignment, GroupAlignment, align_depths
from .combine import AlignedNetworks, apply_maps, combine, fused_skeleton, load_fused, shares
from .config import FusionConfig, normalize_weights
from .errors import DataError, HetfuseError, UnsupportedModelError
from .graph.activations import node_moments
from .graph.correspond import ParamSlot, param_slots
from .graph.groups import check_group_pairing, depth_groups
from .graph.spec import NetworkGraph
from .graph.trace import describe
from .match.base import MatchContext, MatchResult
from .hf import Logits, unwrap, wrap
from .match.heads import attention_notes
from .repair.base import RepairContext


@dataclass
class FusionResult:
    """``model``: the fused network (an ``nn.Module`` in eval mode: a copy of the target's own class where the
    depth allows, else its balanced graph). ``report``: JSON-able dict with the depth alignments, the solver
    of every map, timings and notes. ``config``: the validated configuration."""

    model: nn.Module
    report: dict
    config: FusionConfig


@dataclass
class PreparedFusion:
    """Networks aligned into the fused neuron spaces; combine them with any weights."""

    config: FusionConfig
    target_index: int
    skeleton: nn.Module
    graph: NetworkGraph
    aligned: AlignedNetworks
    match: MatchResult
    balanced: list[nn.Module]
    balanced_graphs: list[NetworkGraph]
    samples: torch.Tensor
    repair_samples: torch.Tensor
    report: dict
    _stats: list | None = field(default=None, repr=False)
    _match_stats: object = field(default=None, repr=False)  # the matcher's SpaceStats on ``samples``, if any

    def combine(self, weights: Sequence[float] | None = None, *, repair: str | bool | None = None) -> nn.Module:
        """The fused network for ``weights`` (``weights[i]`` belongs to model i). ``repair``: a repair method
        name (``True``/``False`` = ``auto``/``none``), default the configuration's."""
        w = normalize_weights(weights if weights is not None else self.config.weights, len(self.balanced))
        model = load_fused(self.skeleton, self.aligned.slots, self.target_index, combine(self.aligned, w), self.graph)
        method = self._repair_method(repair)
        if self.config.preserve_until:  # the first K units of every model kept, one branch each (hetfuse.branches)
            if self.match.assemble is not None:
                raise HetfuseError(f"preserve_until={self.config.preserve_until} cannot be combined with a matcher "
                                   f"that builds its own kind of network ({self.config.match} with zip_until)")
            from .branches import assemble_branches

            return assemble_branches(self, w, model, method)
        if self.match.assemble is not None:  # a matcher that builds its own kind of network (partial zipping)
            return self.match.assemble(self, model, method)
        if method.name != "none":
            beta = shares(self.aligned, w)

            def target_stats(s: int) -> tuple[torch.Tensor, torch.Tensor]:
                stats = self.parent_stats()
                mean = sum(beta[i][s].to(stats[i][s][0].device) * stats[i][s][0] for i in range(len(w)))
                std = sum(beta[i][s].to(stats[i][s][1].device) * stats[i][s][1] for i in range(len(w)))
                return mean, std

            model = method.repair(model, RepairContext(self.graph, self.repair_samples, target_stats,
                                                       prepared=self, weights=w))
        return unwrap(self._as_input_class(model)).eval()

    def _as_input_class(self, model: nn.Module) -> nn.Module:
        """A Hugging Face model fused across depths comes back as a copy of the input model that already has the
        fused structure (the deeper one: its class and configuration), holding the fused tensors; the balanced
        ``GraphModule`` where no input model has it (or the copy would compute something else)."""
        from .graph.correspond import param_slots

        if not isinstance(model, fx.GraphModule):
            return model
        for m, g in zip(self.balanced, self.balanced_graphs, strict=True):
            if not (isinstance(m, Logits) and m.auto and not isinstance(m, fx.GraphModule)):
                continue
            try:
                slots = param_slots([self.graph, g])
            except HetfuseError:
                continue
            state = model.state_dict()
            copy_ = copy.deepcopy(m)
            own = copy_.state_dict()
            new = {s.keys[1]: state[s.keys[0]].to(own[s.keys[1]].dtype) for s in slots
                   if s.keys[0] is not None and s.keys[1] is not None}
            if any(own[k].is_floating_point() and k not in new for k in own) or \
                    any(tuple(v.shape) != tuple(own[k].shape) for k, v in new.items()):
                continue  # a tensor of the input model the fused structure does not cover, or of another width
            copy_.load_state_dict({**own, **new})
            with torch.no_grad():
                x = self.samples[:8]
                if torch.allclose(copy_.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5):
                    return copy_
        return model

    def _repair_method(self, repair):
        if repair is None:
            return self.config.method("repair")
        if isinstance(repair, bool):
            repair = "auto" if repair else "none"
        from .registry import build

        same = repair == self.config.repair
        return build("repair", repair, self.config.stage("repair").params if same else None)

    def aligned_model(self, i: int) -> nn.Module:
        """Model ``i`` moved into the fused structure alone (its own neurons, matched and averaged within itself):
        the fused network with weight 1 on model ``i`` where every fused neuron has a member of model ``i``."""
        tensors = [self.aligned.tensors[i][si] for si in range(len(self.aligned.slots))]
        return load_fused(self.skeleton, self.aligned.slots, self.target_index, tensors, self.graph)

    def parent_stats(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per model, per space: the (mean, std) of every neuron of the model's aligned network
        (:meth:`aligned_model`) on the repair samples — what REPAIR interpolates. At weight 1 on one model the
        fused network is that aligned network, so REPAIR then changes nothing."""
        if self._stats is None:
            self._stats = self._stats_from_matching()
        if self._stats is None:
            self._stats = [space_moments(self.aligned_model(i), self.graph, self.repair_samples)
                           for i in range(len(self.balanced))]
        return self._stats

    def _stats_from_matching(self) -> list | None:
        """:meth:`parent_stats` without running the networks again, where that is exact: the matcher read the same
        samples (alignment samples = repair samples) at the same points (pre-activations), and every map sends each
        fused neuron one neuron or none (a permutation, a selection): the aligned network's neuron k is then the
        network's neuron j with out[j, k] = 1, or constant 0."""
        st = self._match_stats
        if st is None or self.samples.shape != self.repair_samples.shape or \
                not torch.equal(self.samples, self.repair_samples):
            return None
        maps = self.match.maps
        if self.match.linear or any(not (sm.one_hot or _one_hot_columns(sm.out)) for row in maps for sm in row):
            return None
        return [[(sm.pull(st.mean(i, s)), sm.pull(st.std(i, s))) for s, sm in enumerate(row)]
                for i, row in enumerate(maps)]


def _one_hot_columns(m: torch.Tensor) -> bool:
    """Every column holds a single 1 or nothing, every other entry 0."""
    return bool(((m == 0) | (m == 1)).all()) and bool((m.sum(0) <= 1).all())


def space_moments(model: nn.Module, graph: NetworkGraph, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per neuron space of ``graph`` (the description of ``model``'s structure), every neuron's (mean, std) over
    the samples, all read points of a stream pooled together (:func:`hetfuse.graph.node_moments` per read point,
    combined by their observation counts)."""
    nodes = [n for sp in graph.spaces for n in sp.act_nodes]
    moments = node_moments(model, graph, nodes, x, counts=True)
    out = []
    for sp in graph.spaces:
        parts = [moments[n] for n in sp.act_nodes]
        total = sum(n for _, _, n in parts)
        mean = sum(m * n for m, _, n in parts) / total
        second = sum((v + m * m) * n for m, v, n in parts) / total
        out.append((mean, (second - mean * mean).clamp_min(0.0).sqrt()))
    return out


# ------------------------------------------------------------------------------------------------- inputs


POOL_BYTES = 256 * 2**20  # how much of an iterable of batches gather_samples holds to draw from


def gather_samples(data, n: int, *, seed: int = 0, at_least: int | None = None,
                   pool_bytes: int = POOL_BYTES) -> torch.Tensor:
    """Up to ``n`` inputs, a seeded random subset of ``data`` (the first ``k`` of them for any k are the same whatever
    ``n``). ``data``: a tensor, or an iterable of batches (a ``DataLoader``; batches may be tensors or ``(inputs,
    labels)`` pairs), read until it ends or has given max(``n``, as many rows as ``pool_bytes`` hold) rows, and drawn
    from the same way — so a ``DataLoader`` over a tensor of at most that size gives exactly the tensor's samples.
    Fewer than ``at_least`` (default ``n``) is a :class:`DataError`."""
    need = n if at_least is None else at_least
    if isinstance(data, torch.Tensor):
        pool = data
    elif not isinstance(data, Iterable):
        raise DataError(f"data must be a tensor or an iterable of batches, got {type(data).__name__}")
    else:
        parts, have, cap = [], 0, None
        for batch in data:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if not isinstance(batch, torch.Tensor):
                raise DataError(f"a data batch must be a tensor or (inputs, labels), got {type(batch).__name__}")
            if batch.dim() == 0:
                raise DataError("a data batch must hold a batch of inputs (a tensor with a batch dimension)")
            if cap is None:
                row = max(1, math.prod(batch.shape[1:]) * batch.element_size())
                cap = max(n, pool_bytes // row)
            parts.append(batch[:cap - have])
            have += parts[-1].shape[0]
            if have >= cap:
                break
        if not parts:
            raise DataError(f"fewer samples than requested: asked {need}, the data gave 0")
        pool = torch.cat(parts)
    if pool.shape[0] < need:
        raise DataError(f"fewer samples than requested: asked {need}, "
                        + (f"have {pool.shape[0]}" if pool is data else f"the data gave {pool.shape[0]}"))
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.shape[0], generator=g)[:n]]


def _copy_sharing(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``model`` (its own modules, buffers, training flags) holding the same parameter tensors where
    they are already on ``device``."""
    memo = {id(p): p for p in model.parameters() if p.device == torch.device(device)}
    return copy.deepcopy(model, memo)


def _check_finite(i: int, model: nn.Module) -> None:
    for name, p in model.state_dict().items():  # min and max carry any NaN / Inf (no full-size boolean copy)
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(p))).all()):
            raise HetfuseError(f"model {i}: parameter '{name}' contains NaN or Inf")


def _fit_inputs(x: torch.Tensor, graph: NetworkGraph) -> torch.Tensor:
    """The samples in the layout the networks read: images for a network that starts with a convolution, token ids
    for one that starts with an embedding, flat feature vectors (flattened if need be) for one that starts with a
    Linear layer."""
    if graph.input_layout == "tokens":  # N x tokens x features
        if x.dim() != 3 or x.shape[-1] != graph.input_dim:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])}; the models expect sequences of "
                            f"{graph.input_dim} features (N x tokens x {graph.input_dim})")
        return x
    if graph.token_input:
        if x.dim() != 2 or x.is_floating_point():
            raise DataError(f"data samples have shape {tuple(x.shape[1:])} ({x.dtype}); the models expect token ids "
                            "(N x tokens, integers)")
        return x
    if graph.image_input:
        if x.dim() != 4 or x.shape[1] != graph.input_dim:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])}; the models expect images with "
                            f"{graph.input_dim} channels (N x C x H x W)")
        return x
    feat = math.prod(x.shape[1:]) if x.dim() > 1 else 0
    if feat != graph.input_dim:
        raise DataError(f"data samples have shape {tuple(x.shape[1:])} ({feat} features); the models expect "
                        f"{graph.input_dim} input features")
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# ------------------------------------------------------------------------------------------------- pipeline


def prepare_inputs(models: Sequence[nn.Module], data, config: FusionConfig
                   ) -> tuple[list[nn.Module], list[NetworkGraph], torch.Tensor, torch.Tensor]:
    """Checked eval-mode copies of ``models`` on the first model's device, their descriptions, the alignment
    samples and the repair samples drawn from ``data``."""
    models = [wrap(m) for m in models]  # a Hugging Face classifier: its logits
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise HetfuseError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
        _check_finite(i, m)
    try:
        graphs = [describe(m) for m in models]
    except UnsupportedModelError as first:  # some layouts are known only from the inputs' shape (N x T x F)
        example = gather_samples(data, 2, seed=config.seed)
        try:
            graphs = [describe(m, example=example.to(next(iter(m.parameters())).device)) for m in models]
        except Exception:
            raise first from None
    if len({g.input_dim for g in graphs}) > 1:
        raise HetfuseError(f"models take different input sizes: {[g.input_dim for g in graphs]}")
    if len({g.output_dim for g in graphs}) > 1:
        raise HetfuseError(f"models give different output sizes: {[g.output_dim for g in graphs]}")
    kinds = {(g.image_input, g.token_input) for g in graphs}
    if len(kinds) > 1:
        raise HetfuseError("cannot fuse networks that read different inputs (images, token ids, feature vectors: "
                           "their first layers are a convolution, an embedding or a Linear layer)")
    n_repair = max(config.samples, config.repair_samples)
    pool = gather_samples(data, n_repair, seed=config.seed, at_least=config.samples)
    pool = _fit_inputs(pool, graphs[0])
    first = next(iter(models[0].parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    real = first.dtype if first is not None and first.is_floating_point() else torch.float32
    pool = pool.to(device=device, dtype=torch.long if graphs[0].token_input else real)  # the models' precision
    x, x_repair = pool[:config.samples], pool[:config.repair_samples]
    from .io.sequential import remember_sequential_base

    # a plain nn.Sequential remembers its description, so that what the fusion makes of it saves without base=
    # the copies share the parameters already on ``device`` (no stage writes into an input network's parameters;
    # layers it edits or inserts are new modules), so wide networks are not held twice
    models = [remember_sequential_base(_copy_sharing(m, device).to(device).eval()) for m in models]
    try:
        graphs = [describe(m, example=x[:2]) for m in models]
    except RuntimeError as exc:
        raise DataError(f"data samples of shape {tuple(x.shape[1:])} do not fit the models: {exc}") from exc
    return models, graphs, x, x_repair


def balance_depths(models: list[nn.Module], graphs: list[NetworkGraph], x: torch.Tensor, x_repair: torch.Tensor,
                   config: FusionConfig, target: int) -> tuple[list[nn.Module], list[NetworkGraph], DepthAlignment]:
    """Stages 1 and 2: align the depth groups of networks that differ in depth and balance them (new lists;
    networks already at the common depth are kept as they are)."""
    models, graphs = list(models), list(graphs)
    groups = [depth_groups(g) for g in graphs]
    counts = [[len(gr.units) for gr in gs] for gs in groups]
    balancer = config.method("balance")
    if all(c == counts[0] for c in counts):
        depth = DepthAlignment([ModelAlignment(i, "kept", [GroupAlignment(gr.name, gr.kind, len(gr.units),
                                                                         len(gr.units), i,
                                                                         list(range(len(gr.units))))
                                                           for gr in gs]) for i, gs in enumerate(groups)])
        return models, graphs, depth
    check_group_pairing(groups)
    depth = align_depths(models, graphs, groups, x, aligner=config.method("depth_align"),
                         similarity=config.method("similarity"), direction=balancer.direction, target=target)
    for ma in _progress(depth.models, "balance", config.progress):
        if ma.changed:
            i = ma.model
            before = models[i]
            models[i] = balancer.balance(models[i], graphs[i], groups[i], ma, x, x_repair).to(x.device).eval()
            graphs[i] = describe(models[i], example=x[:2])
            if balancer.direction == "add":  # meant to keep the function: say by how much it did not
                change = _relative_change(before, models[i], x[:64])
                if change > 1e-4:
                    note = (f"model {i}: the units added to balance its depth change its outputs by {change:.3g} "
                            "(largest difference relative to the largest output, on the alignment samples)"
                            + ("; post-norm layers (LayerNorm after the residual addition, as in BERT) make a "
                               "zero layer LayerNorm(x), not x" if _post_norm(graphs[i]) else ""))
                    warnings.warn(note, stacklevel=3)
                    depth.notes.append(note)
    return models, graphs, depth


@torch.no_grad()
def _relative_change(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))


def _post_norm(graph: NetworkGraph) -> bool:
    from .graph.groups import residual_blocks

    return any(b.post_norm for b in residual_blocks(graph))


def prepare_fusion(models: Sequence[nn.Module], data, config: FusionConfig | None = None) -> PreparedFusion:
    """Every weight-independent step of the fusion (see the module docstring)."""
    t_start = time.perf_counter()
    config = config if config is not None else FusionConfig()
    config.validate(len(models))
    timings: dict[str, float] = {}
    models, graphs, x, x_repair = prepare_inputs(models, data, config)
    depths = [g.depth for g in graphs]
    widths_in = [g.widths for g in graphs]
    target = config.target if config.target is not None else min(range(len(models)), key=lambda i: depths[i])

    # 1) depth alignment and 2) balancing
    memory = _StagePeaks(x.device)
    t0 = time.perf_counter()
    models, graphs, depth = balance_depths(models, graphs, x, x_repair, config, target)
    timings["depth_s"] = time.perf_counter() - t0
    memory.mark("depth")

    # 3) neuron matching
    t0 = time.perf_counter()
    slots: list[ParamSlot] = param_slots(graphs)
    ctx = MatchContext(models, graphs, target, slots, x, progress=config.progress, seed=config.seed,
                       positions=config.positions)
    result = config.method("match").match(ctx)
    timings["match_s"] = time.perf_counter() - t0
    memory.mark("match")

    # 4) apply the maps (weight-independent part of the combination)
    t0 = time.perf_counter()
    ctx._states = None  # a weight-based matcher's float64 copies of the networks are no longer needed
    match_stats = _moments_only(ctx._stats.get(("target", False), ctx._stats.get(("all", False))))
    ctx._stats = {}  # nor the cross-model products of the activations
    aligned = apply_maps([m.state_dict() for m in models], graphs, slots, result, target)
    skeleton = fused_skeleton(models[target], graphs[target], slots, result.widths, target)
    skeleton_graph = describe(skeleton, example=x[:2])
    timings["apply_maps_s"] = time.perf_counter() - t0
    timings["prepare_total_s"] = time.perf_counter() - t_start
    memory.mark("apply_maps")

    report = {
        "n_models": len(models),
        "target": target,
        "methods": {s: st.method for s, st in config.stages.items()},
        "depths_in": depths,
        "widths_in": widths_in,
        "balanced_widths": [g.widths for g in graphs],
        "fused_widths": list(result.widths),
        "mappings": depth.to_list(),
        "solvers": result.info.get("solvers"),
        "match_info": {k: v for k, v in result.info.items() if k != "solvers"},
        "samples": int(x.shape[0]),
        "repair_samples": int(x_repair.shape[0]),
        "timings": timings,
        **({"gpu_peak_mb": memory.peaks} if memory.peaks else {}),
        "notes": list(depth.notes) + attention_notes(graphs, result, target),
        "config": config.to_dict(),
    }
    return PreparedFusion(config=config, target_index=target, skeleton=skeleton, graph=skeleton_graph,
                          aligned=aligned, match=result, balanced=models, balanced_graphs=graphs, samples=x,
                          repair_samples=x_repair, report=report,
                          _match_stats=match_stats)


class _StagePeaks:
    """Peak CUDA memory per stage (MB; the allocator's peak since the previous mark), for models on a GPU; empty
    elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.peaks: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def mark(self, stage: str) -> None:
        if self.cuda:
            self.peaks[stage] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
            torch.cuda.reset_peak_memory_stats(self.device)


def _moments_only(st):
    """The matcher's statistics without the cross-model products (n x n per space), which only matching reads."""
    if st is None:
        return None
    from .graph.activations import SpaceStats

    return SpaceStats(st.count, st.sums, st.squares, {}, st.eps)


def fuse(models: Sequence[nn.Module], data, *, weights: Sequence[float] | None = None, target: int | None = None,
         representation: str | None = None, balance: str | None = None, match: str | None = None,
         samples: int = 400, repair: str | bool | None = None, seed: int = 0, config: FusionConfig | None = None,
         **options) -> FusionResult:
    """Fuse ``models`` (``nn.Module``s of any depths and widths) into one network.

    ``data``: a tensor of inputs or an iterable of batches (a ``DataLoader``; tensors or ``(inputs, labels)``),
    from which ``samples`` inputs are drawn at random (with ``seed``) for activations and alignment and
    ``repair_samples`` (default 2000, capped by the data) for the repair — from a tensor and from an iterable
    alike (see :func:`gather_samples`: an iterable is read up to max(samples, repair_samples) rows or 256 MiB).
    ``weights[i]`` is the weight of ``models[i]`` (uniform when None). ``target``:
    whose widths and neuron order the fused network takes (default: the shallowest). The stages:
    ``representation`` (alias ``similarity``), ``depth_align``, ``balance``, ``match``, ``repair`` (a method name;
    ``True``/``False`` = ``"auto"``/``"none"``); every other keyword is a parameter of a chosen method (e.g.
    ``solver``, ``reg``, ``fix_first``, ``merge_sign``) or a run option (``repair_samples``, ``progress``,
    ``preserve_until``: keep the first K depth units of every model unmerged, :mod:`hetfuse.branches`). Or pass
    ``config`` (a :class:`FusionConfig`), which then replaces all of them.
    """
    if config is None:
        config = FusionConfig(weights=list(weights) if weights is not None else None, target=target,
                              representation=representation, balance=balance, match=match, samples=samples,
                              repair=repair, seed=seed, **options)
    t0 = time.perf_counter()
    prepared = prepare_fusion(models, data, config)
    t1 = time.perf_counter()
    memory = _StagePeaks(prepared.samples.device)
    model = prepared.combine()
    memory.mark("combine")
    report = dict(prepared.report)
    report["timings"] = dict(report["timings"], combine_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0)
    if memory.peaks:
        report["gpu_peak_mb"] = dict(report.get("gpu_peak_mb", {}), **memory.peaks)
    report["weights"] = prepared.config.weights
    return FusionResult(model=model, report=report, config=prepared.config)


__all__ = ["FusionResult", "PreparedFusion", "balance_depths", "fuse", "gather_samples", "prepare_fusion",
           "prepare_inputs"]
