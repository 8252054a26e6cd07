"""Reading a network's intermediate values: activations of neuron spaces and units, and streaming statistics.

Everything runs in eval mode without gradients, batch by batch, on the models' device; values are read
at fx nodes of the description (a neuron space's ``act_nodes``; for a residual stream every point where it
is formed). A conv channel contributes one observation per sample and spatial position. Values are copied
the moment they are produced, so an in-place ReLU that follows cannot overwrite them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .spec import NetworkGraph
from .trace import trace


STATS_BATCH_BYTES = 256 << 20  # the recorded values of one batch of all models, at most (where shapes are known)


def rows(t: torch.Tensor) -> torch.Tensor:
    """A node's value as observations x neurons: (batch, C, H, W) -> (batch * H * W, C)."""
    if t.dim() > 2:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t


def _layouts(model: nn.Module) -> dict[str, str]:
    """The nodes of ``model`` whose neurons are not on axis 1 (transformer tokens, heads), from its
    description."""
    from .trace import describe

    try:
        return describe(model).node_layouts
    except Exception:  # a model the description refuses has no such nodes for the recorder to know of
        return {}


class Recorder:
    """Runs a traced model and returns copies of the values of chosen nodes (and nothing else). Node names are
    those of :func:`~hetfuse.graph.trace.trace` (deterministic, so a description of a copy of the model names
    the same nodes). Values whose neurons are not on axis 1 (``layouts``: node -> "tokens" for N x tokens x
    features, "headed" for N x heads x tokens x d; by default read off the model's description) come back as
    N x features x tokens, like a conv map's N x C x H x W."""

    def __init__(self, model: nn.Module, node_names: Sequence[str], layouts=None):
        gm = trace(model)
        if layouts is None:
            layouts = _layouts(model)
        elif not isinstance(layouts, dict):  # node names in the tokens layout
            layouts = dict.fromkeys(layouts, "tokens")
        graph = copy.deepcopy(gm.graph)
        by_name = {n.name: n for n in graph.nodes}
        missing = [n for n in node_names if n not in by_name]
        if missing:
            raise ValueError(f"no node(s) {missing} in the traced model")
        clones = []
        for name in node_names:
            node = by_name[name]
            with graph.inserting_after(node):
                clone = graph.call_method("clone", (node,))
            if layouts.get(name) == "tokens":  # N x tokens x features -> N x features x tokens, as rows() reads
                with graph.inserting_after(clone):
                    clone = graph.call_method("transpose", (clone, 1, 2))
            elif layouts.get(name) == "headed":  # N x heads x tokens x d -> N x (heads·d) x tokens
                with graph.inserting_after(clone):
                    moved = graph.call_method("permute", (clone, 0, 1, 3, 2))
                with graph.inserting_after(moved):
                    clone = graph.call_method("flatten", (moved, 1, 2))
            clones.append(clone)
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = (tuple(clones),)
        # the rest of the network after the last value read is not run (values were cloned as produced, so
        # nothing computed later, in place or not, can matter)
        order = list(graph.nodes)
        last = max(order.index(c) for c in clones) if clones else -1
        for n in reversed(order[last + 1:]):
            if n.op not in ("output", "placeholder"):
                graph.erase_node(n)
        self.module = fx.GraphModule(gm, graph)
        self.names = list(node_names)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.module(x), strict=False))


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def run_batches(model: nn.Module, node_names: Sequence[str], x: torch.Tensor,
                fn: Callable[[int, dict[str, torch.Tensor]], None], *, batch_size: int = 500,
                layouts: dict[str, str] | None = None) -> None:
    """Call ``fn(start, {node: value})`` for every batch of ``x`` (eval mode, no gradients; the model's
    training flag is restored afterwards)."""
    rec = Recorder(model, node_names, layouts)
    was = model.training
    model.eval()
    rec.module.eval()
    try:
        with torch.no_grad():
            dev = _device(model)
            for start in range(0, x.shape[0], batch_size):
                fn(start, rec(x[start:start + batch_size].to(dev)))
    finally:
        model.train(was)


def layer_activations(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, *, batch_size: int = 1000,
                      layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Pre-activations of each hidden layer: one ``t x n_l`` float64 tensor per neuron space (on the model's
    device).

    Read at the space's ``act_nodes`` (the Linear/Conv output, or the BatchNorm after it; for a residual
    stream every point where it is formed, stacked along the rows). ``layers`` restricts the result to
    those spaces (the others come back empty).
    """
    wanted = {i for i in range(len(graph.spaces)) if layers is None or i in layers}
    nodes = sorted({n for i in wanted for n in graph.spaces[i].act_nodes})
    store: list[list[torch.Tensor]] = [[] for _ in graph.spaces]

    def take(_start, vals):
        for i in wanted:
            store[i].append(torch.cat([rows(vals[n]).to(torch.float64) for n in graph.spaces[i].act_nodes]))

    if nodes:
        run_batches(model, nodes, x, take, batch_size=batch_size, layouts=graph.node_layouts)
    dev = _device(model)
    return [torch.cat(parts) if parts else torch.empty(0, graph.spaces[i].size, dtype=torch.float64, device=dev)
            for i, parts in enumerate(store)]


def node_features(model: nn.Module, graph: NetworkGraph, node_names: Sequence[str], x: torch.Tensor, *,
                  max_rows: int = 4096, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per node, a ``rows x channels`` float64 matrix of its values, the (sample, position) rows subsampled
    deterministically (evenly spaced) to at most ``max_rows``. Nodes of the same spatial size get the same
    rows, so their matrices can be compared sample by sample (CKA)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in node_names}
    total = x.shape[0]

    def take(start, vals):
        for name, v in vals.items():
            per = int(torch.tensor(v.shape[2:]).prod()) if v.dim() > 2 else 1
            r = rows(v)
            n_rows = total * per
            idx = torch.linspace(0, n_rows - 1, min(max_rows, n_rows), dtype=torch.float64).round().long()
            lo = start * per
            local = idx[(idx >= lo) & (idx < lo + r.shape[0])] - lo
            store[name].append(r[local.to(r.device)].to(torch.float64))

    names = list(dict.fromkeys(node_names))
    if names:
        run_batches(model, names, x, take, batch_size=batch_size, layouts=graph.node_layouts)
    return {n: torch.cat(p) for n, p in store.items()}


def node_moments(model: nn.Module, graph: NetworkGraph, node_names: Sequence[str], x: torch.Tensor, *,
                 batch_size: int = 500, counts: bool = False) -> dict[str, tuple]:
    """Per node, the per-channel (mean, biased variance) of its values over every sample and position (with
    ``counts``: (mean, biased variance, number of observations))."""
    acc: dict[str, list] = {}

    def take(_start, vals):
        for name, v in vals.items():
            r = rows(v).to(torch.float64)
            s = acc.setdefault(name, [0, 0.0, 0.0])
            s[0] += r.shape[0]
            s[1] = s[1] + r.sum(0)
            s[2] = s[2] + (r * r).sum(0)

    names = list(dict.fromkeys(node_names))
    if names:
        batch_size = _batch_for([graph], [[names]], batch_size, STATS_BATCH_BYTES)
        run_batches(model, names, x, take, batch_size=batch_size, layouts=graph.node_layouts)
    out = {}
    for name, (n, s1, s2) in acc.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        out[name] = (mean, var, n) if counts else (mean, var)
    return out


@dataclass
class SpaceStats:
    """First and second moments of every neuron space's activations, per model and between models.

    ``count[s]``: observations of space s; ``sums[i][s]``: the sum of model i's activations; ``squares[i][s]``
    their sum of squares; ``grams[(i, j)][s]``: Σ a_i a_jᵀ (n_i x n_j) for the requested pairs (i <= j); all
    float64. ``eps``: the machine epsilon of the precision each batch was summed in (float32 for float32 models:
    of values shifted by the first batch's mean, so the centred moments keep that precision).
    """

    count: list[int]
    sums: list[list[torch.Tensor]]
    squares: list[list[torch.Tensor]]
    grams: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    eps: float = torch.finfo(torch.float64).eps  # machine epsilon of the precision the moments were summed in

    def mean(self, i: int, s: int) -> torch.Tensor:
        return self.sums[i][s] / self.count[s]

    def std(self, i: int, s: int) -> torch.Tensor:
        m = self.mean(i, s)
        return (self.squares[i][s] / self.count[s] - m * m).clamp_min(0.0).sqrt()

    def gram(self, i: int, j: int, s: int) -> torch.Tensor:
        if (i, j) in self.grams:
            return self.grams[(i, j)][s]
        if (j, i) in self.grams:
            return self.grams[(j, i)][s].T
        raise KeyError(f"statistics between models {i} and {j} were not collected")

    def sq_distances(self, i: int, j: int, s: int) -> torch.Tensor:
        """Squared Euclidean distances between model i's and model j's neurons (vectors of activations over
        the same observations), from the moments: |a|² + |b|² − 2 a·b."""
        d = self.squares[i][s][:, None] + self.squares[j][s][None, :] - 2.0 * self.gram(i, j, s)
        return d.clamp_min(0.0)

    def covariance(self, i: int, j: int, s: int) -> torch.Tensor:
        n = self.count[s]
        cov = self.gram(i, j, s) / n
        return cov.addr_(self.mean(i, s).to(cov.device), self.mean(j, s).to(cov.device), alpha=-1.0)

    def correlation(self, i: int, j: int, s: int, eps: float = 1e-12) -> torch.Tensor:
        cov = self.covariance(i, j, s)  # a new tensor: divided in place by σᵢσⱼᵀ + eps, row by row
        si, sj = self.std(i, s).to(cov.device), self.std(j, s).to(cov.device)
        for start in range(0, cov.shape[0], 1024):
            rows = cov[start:start + 1024]
            rows.div_(torch.outer(si[start:start + 1024], sj).add_(eps))
        return cov


def read_nodes(graph: NetworkGraph, post: bool = False) -> list[list[str]]:
    """Per neuron space, the nodes its activations are read at: the pre-activations (``act_nodes``), or with
    ``post`` the values after the activation that follows each of them (the ReLU output; the same node where no
    activation follows)."""
    if not post:
        return [list(s.act_nodes) for s in graph.spaces]
    from .groups import activation_chain

    nodes = {n.name: n for n in graph.gm.graph.nodes}
    modules = dict(graph.gm.named_modules())
    return [[activation_chain(nodes[name], modules)[0].name for name in s.act_nodes] for s in graph.spaces]


def _batch_for(graphs: Sequence[NetworkGraph], reads: list[list[list[str]]], batch_size: int, budget: int) -> int:
    """A batch size whose recorded values (float32, every model) fit ``budget`` bytes, from the shapes recorded
    when the networks were described on two samples (transformers read thousands of rows per sample); at most
    ``batch_size``; ``batch_size`` where shapes are unknown."""
    per_sample = 0
    for g, per_space in zip(graphs, reads, strict=False):
        if g.gm is None:
            return batch_size
        meta = {n.name: n.meta.get("tensor_meta") for n in g.gm.graph.nodes}
        for name in {n for names in per_space for n in names}:
            m = meta.get(name)
            if m is None or not hasattr(m, "shape") or not m.shape:
                return batch_size
            per_sample += 4 * int(torch.tensor(m.shape).prod()) // max(1, int(m.shape[0]))
    return max(1, min(batch_size, budget // max(1, per_sample)))


def spread_positions(t: torch.Tensor, positions: int | None) -> torch.Tensor:
    """A node's value (N x C x positions...) with at most ``positions`` positions per sample, evenly spread over the
    flattened positions (the same ones for every tensor of that shape, so every model's rows stay the same
    observations); unchanged where it has no more, or ``positions`` is None."""
    if positions is None or t.dim() <= 2:
        return t
    flat = t.flatten(2)
    p = flat.shape[2]
    if p <= positions:
        return t
    idx = torch.linspace(0, p - 1, positions, dtype=torch.float64).round().long().to(t.device)
    return flat.index_select(2, idx)


def space_statistics(models: Sequence[nn.Module], graphs: Sequence[NetworkGraph], x: torch.Tensor, *,
                     pairs: Sequence[tuple[int, int]] = (), batch_size: int = 1000, post: bool = False,
                     positions: int | None = None) -> SpaceStats:
    """Moments of every space of every model on the same inputs (models of corresponding structure: space s
    of every model is read at corresponding nodes, so rows are the same observations). ``post``: read after the
    activations (see :func:`read_nodes`). ``positions``: per sample and read point, at most this many positions
    (pixels, tokens; :func:`spread_positions`); None: all."""
    k = len(models)
    n_spaces = len(graphs[0].spaces)
    pairs = sorted({(min(i, j), max(i, j)) for i, j in pairs})
    count = [0] * n_spaces
    sums: list[list] = [[0.0] * n_spaces for _ in range(k)]
    squares: list[list] = [[0.0] * n_spaces for _ in range(k)]
    grams: dict[tuple[int, int], list] = {p: [0.0] * n_spaces for p in pairs}
    shifts: list[list] = [[None] * n_spaces for _ in range(k)]
    work = torch.float32
    recorders, reads = [], []
    for m, g in zip(models, graphs, strict=False):
        reads.append(read_nodes(g, post))
        recorders.append(Recorder(m, list(dict.fromkeys(n for per in reads[-1] for n in per)), g.node_layouts))
    was = [m.training for m in models]
    for m, r in zip(models, recorders, strict=False):
        m.eval()
        r.module.eval()
    batch_size = _batch_for(graphs, reads, batch_size, STATS_BATCH_BYTES)
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                vals = [r(x[start:start + batch_size].to(_device(m)))
                        for m, r in zip(models, recorders, strict=False)]
                for s in range(n_spaces):  # one space at a time: its rows only while it is summed
                    feats = []
                    for i, (v, per_space) in enumerate(zip(vals, reads, strict=False)):
                        f = torch.cat([rows(spread_positions(v[n], positions)) for n in per_space[s]])
                        work = torch.promote_types(work, f.dtype)
                        if shifts[i][s] is None:  # the first batch's mean: moments of shifted values keep
                            shifts[i][s] = f.mean(0)  # their precision in float32 (no E[x²] - E[x]² cancellation)
                        feats.append(f.to(work) - shifts[i][s].to(work))
                    count[s] += feats[0].shape[0]
                    for i in range(k):  # per batch in the working precision, accumulated in float64
                        f = feats[i]
                        sums[i][s] = sums[i][s] + f.sum(0).to(torch.float64)
                        squares[i][s] = squares[i][s] + (f * f).sum(0).to(torch.float64)
                    for (i, j) in pairs:
                        g = feats[i].T @ feats[j].to(feats[i].device)
                        grams[(i, j)][s] = grams[(i, j)][s] + g.to(torch.float64)
                    del feats
                del vals
    finally:
        for m, w in zip(models, was, strict=False):
            m.train(w)
    for s in range(n_spaces):  # undo the shifts, exactly, in float64
        n = count[s]
        c = [None if shifts[i][s] is None else shifts[i][s].to(torch.float64) for i in range(k)]
        raw = [sums[i][s] for i in range(k)]
        for (i, j) in pairs:
            if c[i] is None:
                continue
            g = grams[(i, j)][s]  # Σ (a - cᵢ)(b - cⱼ)ᵀ -> Σ a bᵀ, in place (rank-one updates)
            ci, cj = c[i].to(g.device), c[j].to(g.device)
            g.addr_(ci, raw[j].to(g.device) + n * cj)
            g.addr_(raw[i].to(g.device), cj)
        for i in range(k):
            if c[i] is None:
                continue
            ci = c[i].to(raw[i].device)
            squares[i][s] = squares[i][s] + 2.0 * ci * raw[i] + n * ci * ci
            sums[i][s] = raw[i] + n * ci
    return SpaceStats(count, sums, squares, grams, torch.finfo(work).eps)
