"""Fusion as an initialisation: the depth-aligned shallow network alone, and heterogeneous model transfer.

* :func:`deepen` — the shallower network brought to a deeper one's depth by stages 1–2 of the pipeline alone
  (depth alignment, then the ``add`` balancer: identity layers and zero residual blocks at the unmatched
  positions). It computes the same function as the input (the paper's "MB depth-aligned", a
  Net2DeeperNet-style baseline) in the deeper network's structure.
* :func:`transfer` — heterogeneous model transfer (HMT, Wang et al. 2021, as CLAFusion §4.2.1 uses it): the
  weights of SRC's layers are copied into DST's layers, DST keeps its own weights elsewhere. Layers are the
  convolutions and Linear layers on the main path (not residual shortcut projections, not the output
  layer), in graph order. ``mapping="chain"`` pairs them in order, the i-th with the i-th, for as many as the
  shorter list has (HMT's "longest chain"); ``mapping="cla"`` pairs the units of each depth group by the
  cross-layer alignment (the deep position of every shallow unit) and the layers outside units (a residual
  network's stem) in order. A copy where the shapes differ follows HMT: output channel ``o`` takes SRC's
  ``o mod C_out``, input channel ``i`` takes ``i mod C_in``, and a kernel of another size is resized by
  bilinear interpolation. Biases are copied with the weights where both layers have one; BatchNorm is not
  transferred (HMT's choice). ``then="avg"`` averages the transferred network with DST parameter by
  parameter (naive averaging), ``then="ot"`` fuses it with DST by the pipeline (OTFusion).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig
from .errors import HetfuseError
from .graph.groups import depth_groups
from .graph.ops import channelwise
from .graph.spec import OUTPUT, NetworkGraph
from .graph.trace import describe

MAPPINGS = ("chain", "cla")
THEN = ("ot", "avg")


@dataclass
class TransferResult:
    """``model``: the result. ``pairs``: (SRC layer, DST layer) names copied. ``report``: the alignment and the
    fusion report (when ``then`` fused)."""

    model: nn.Module
    pairs: list[tuple[str, str]]
    report: dict = field(default_factory=dict)


def deepen(model: nn.Module, like: nn.Module, data, *, config: FusionConfig | None = None,
           **options) -> tuple[nn.Module, dict]:
    """``model`` brought to the depth of ``like`` by depth alignment and the ``add`` balancer (see the module
    docstring). ``data``: inputs (as for :func:`hetfuse.fuse`) for the similarity and the identity BatchNorms.
    ``options``: ``similarity``, ``depth_align``, ``samples``, ``seed`` or their parameters, or a ``config``.
    Returns the deepened network and the depth alignment (as in a fusion report)."""
    from .pipeline import balance_depths, prepare_inputs

    if config is None:
        config = FusionConfig(**{"balance": "add", **options})
    elif options:
        raise HetfuseError("pass either config or options, not both")
    if config.balance != "add":
        raise HetfuseError(f"deepen adds layers (balance 'add'); got balance {config.balance!r}")
    config.validate(2)
    models, graphs, x, x_repair = prepare_inputs([model, like], data, config)
    counts = [[len(g.units) for g in depth_groups(gr)] for gr in graphs]
    if len(counts[0]) != len(counts[1]):
        raise HetfuseError(f"the networks have different depth groups ({len(counts[0])} vs {len(counts[1])})")
    if any(a > b for a, b in zip(*counts, strict=False)):
        raise HetfuseError(f"deepen adds layers, but the model has more units than the reference in some group "
                           f"(units per group: {counts[0]} vs {counts[1]})")
    balanced, _, depth = balance_depths(models, graphs, x, x_repair, config, target=1)
    return balanced[0].eval(), depth.models[0].to_dict()


def main_layers(graph: NetworkGraph) -> list[tuple[str, tuple[int, int] | None]]:
    """The weight layers HMT transfers, in graph order: (module name, (group, unit) or None outside units).
    Convolutions and Linear layers, without residual shortcut projections and the output layer."""
    groups = depth_groups(graph)
    where: dict[str, tuple[int, int]] = {}
    shortcut: set[str] = set()
    kinds = {m.name: m for m in graph.modules}
    for gi, g in enumerate(groups):
        for ui, u in enumerate(g.units):
            for name in u.modules:
                where[name] = (gi, ui)
                info = kinds[name]
                if u.kind == "block" and not channelwise(info.kind) and info.out_space == u.space and \
                        name != u.weight:
                    shortcut.add(name)
    return [(m.name, where.get(m.name)) for m in graph.modules
            if not channelwise(m.kind) and m.out_space != OUTPUT and m.name not in shortcut]


def _chain_pairs(src: NetworkGraph, dst: NetworkGraph) -> list[tuple[str, str]]:
    a, b = main_layers(src), main_layers(dst)
    return [(a[i][0], b[i][0]) for i in range(min(len(a), len(b)))]


def _aligned_pairs(src: NetworkGraph, dst: NetworkGraph, alignment: list[list[int]]) -> list[tuple[str, str]]:
    """Layer pairs from a per-group unit alignment (SRC unit j of group g → DST unit alignment[g][j])."""
    a, b = main_layers(src), main_layers(dst)
    pairs = []
    outside_a = [n for n, w in a if w is None]
    outside_b = [n for n, w in b if w is None]
    pairs.extend(zip(outside_a, outside_b, strict=False))
    by_unit_b: dict[tuple[int, int], list[str]] = {}
    for n, w in b:
        if w is not None:
            by_unit_b.setdefault(w, []).append(n)
    by_unit_a: dict[tuple[int, int], list[str]] = {}
    for n, w in a:
        if w is not None:
            by_unit_a.setdefault(w, []).append(n)
    for (g, u), names in by_unit_a.items():
        target = by_unit_b.get((g, alignment[g][u]), [])
        pairs.extend(zip(names, target, strict=False))
    order = {n: i for i, (n, _) in enumerate(b)}
    return sorted(pairs, key=lambda p: order[p[1]])


@torch.no_grad()
def copy_layer(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """HMT's copy of one weight (or bias) into another shape: channels taken cyclically, kernels resized."""
    src = src.detach().to(dst.device, dst.dtype)
    if src.dim() != dst.dim():
        raise HetfuseError(f"cannot transfer a {src.dim()}-d parameter into a {dst.dim()}-d one")
    if src.dim() == 4 and tuple(src.shape[2:]) != tuple(dst.shape[2:]):
        src = F.interpolate(src, size=tuple(dst.shape[2:]), mode="bilinear", align_corners=True)
    out_idx = torch.arange(dst.shape[0], device=dst.device) % src.shape[0]
    res = src.index_select(0, out_idx)
    if src.dim() >= 2:
        in_idx = torch.arange(dst.shape[1], device=dst.device) % src.shape[1]
        res = res.index_select(1, in_idx)
    return res.contiguous()


def average_weights(models: list[nn.Module]) -> nn.Module:
    """Naive averaging: the parameter-by-parameter mean of networks of one architecture (floating-point
    buffers such as BatchNorm statistics averaged too, integer buffers taken from the first)."""
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise HetfuseError(f"naive averaging needs one architecture; model {i} differs from model 0")
    out = copy.deepcopy(models[0])
    avg = {k: (sum(s[k] for s in states) / len(states)) if states[0][k].is_floating_point() else states[0][k]
           for k in keys}
    out.load_state_dict(avg)
    return out.eval()


def transfer(src: nn.Module, dst: nn.Module, data=None, *, mapping: str = "chain", then: str | None = None,
             config: FusionConfig | None = None, **options) -> TransferResult:
    """Heterogeneous model transfer of ``src`` into ``dst`` (see the module docstring). ``data``: inputs, needed
    for ``mapping="cla"`` with an activation similarity and for ``then="ot"``. ``config``/``options``: the
    fusion configuration of the CLA mapping and of ``then="ot"`` (default: the pipeline's defaults, the
    result taking DST's structure)."""
    if mapping not in MAPPINGS:
        raise HetfuseError(f"unknown mapping {mapping!r}; known: {', '.join(MAPPINGS)}")
    if then is not None and then not in THEN:
        raise HetfuseError(f"unknown 'then' {then!r}; known: {', '.join(THEN)}")
    if config is None:
        config = FusionConfig(target=1, **options)
    elif options:
        raise HetfuseError("pass either config or options, not both")
    gs, gd = describe(src), describe(dst)
    if gs.modules[0].kind != gd.modules[0].kind:
        raise HetfuseError("cannot transfer between a network that starts with a convolution and one that starts "
                           "with a Linear layer")
    report: dict = {"mapping": mapping, "then": then}
    if mapping == "chain":
        pairs = _chain_pairs(gs, gd)
    else:
        if data is None:
            raise HetfuseError("the CLA mapping needs data (inputs for the layer similarity)")
        from .align.base import align_depths
        from .graph.groups import check_group_pairing
        from .pipeline import prepare_inputs

        cfg = config.replace(balance="add") if config.balance != "add" else config
        models, graphs, x, _ = prepare_inputs([src, dst], data, cfg)
        groups = [depth_groups(g) for g in graphs]
        counts = [[len(gr.units) for gr in g] for g in groups]
        if len(counts[0]) != len(counts[1]):
            raise HetfuseError(f"the networks have different depth groups ({len(counts[0])} vs {len(counts[1])})")
        if any(a > b for a, b in zip(*counts, strict=False)):
            raise HetfuseError(f"the CLA mapping transfers a shallower network into a deeper one; units per group: "
                               f"SRC {counts[0]}, DST {counts[1]}")
        check_group_pairing(groups)
        depth = align_depths(models, graphs, groups, x, aligner=cfg.method("depth_align"),
                             similarity=cfg.method("similarity"), direction="add", target=1)
        alignment = [ga.alignment for ga in depth.models[0].groups]
        report["alignment"] = depth.models[0].to_dict()
        pairs = _aligned_pairs(gs, gd, alignment)
    out = copy.deepcopy(dst)
    src_mods, out_mods = dict(src.named_modules()), dict(out.named_modules())
    for a, b in pairs:
        ms, md = src_mods[a], out_mods[b]
        with torch.no_grad():
            md.weight.copy_(copy_layer(md.weight, ms.weight))
            if getattr(md, "bias", None) is not None and getattr(ms, "bias", None) is not None:
                md.bias.copy_(copy_layer(md.bias, ms.bias))
    report["pairs"] = [list(p) for p in pairs]
    out.eval()
    if then == "avg":
        out = average_weights([out, dst])
    elif then == "ot":
        if data is None:
            raise HetfuseError("fusing with OT (then='ot') needs data")
        from .pipeline import fuse

        res = fuse([out, dst], data, config=config.replace(target=1))
        out = res.model
        report["fusion"] = res.report
    return TransferResult(out, pairs, report)


__all__ = ["MAPPINGS", "THEN", "TransferResult", "average_weights", "copy_layer", "deepen", "main_layers",
           "transfer"]
