"""The neuron-matcher stage.

A matcher decides, for every network i and every neuron space s, how network i's neurons enter the fused
network's neurons: a :class:`SpaceMap` of two ``n_i(s) x r(s)`` matrices, r(s) the fused width.

* ``out`` — the producing side (weight rows, biases, BatchNorm parameters and statistics): how much each of
  network i's neurons contributes to each fused neuron (non-negative). Per fused neuron, network i's column
  is normalised to sum 1, and the networks are mixed with shares proportional to weight × column mass, so
  a fused neuron is a weighted average of the neurons matched to it.
* ``inn`` — the consuming side (the next layers' input columns, block-aware for a conv map flattened into
  a Linear): what the next layer must read from the fused neurons to see network i's neurons.

Fusion is then the same for every matcher (:mod:`hetfuse.combine`): every network's parameters are moved
through its maps and mixed; the output layer (the classes) is averaged with the model weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..graph.activations import SpaceStats, space_statistics
from ..graph.correspond import ParamSlot
from ..graph.spec import Gather, NetworkGraph, transform_axis
from ..registry import Method


class SpaceMap:
    """Network i's map of one neuron space: ``out`` and ``inn``, two ``n_i x r`` matrices (see the module
    docstring). A one-hot map — a permutation, a selection: every neuron of network i goes to one fused neuron,
    every fused neuron takes at most one — is held as indices (``cols[j]`` = the fused neuron network i's neuron j
    goes to; ``out = inn``) and applied as a gather, so wide layers never form the dense ``n x r`` matrices;
    ``out`` / ``inn`` then build them on demand (not kept)."""

    __slots__ = ("_out", "_inn", "cols", "width")

    def __init__(self, out: torch.Tensor | None = None, inn: torch.Tensor | None = None, *,
                 cols: torch.Tensor | None = None, width: int | None = None):
        if cols is None and (out is None or inn is None):
            raise ValueError("SpaceMap needs out and inn matrices, or cols")
        self._out, self._inn = out, inn
        self.cols = None if cols is None else torch.as_tensor(cols, dtype=torch.long).cpu()
        if self.cols is not None:
            n = self.cols.numel()
            width = n if width is None else int(width)
            if n and (int(self.cols.min()) < 0 or int(self.cols.max()) >= width or
                      int(torch.unique(self.cols).numel()) != n):
                raise ValueError(f"cols must send {n} neurons to distinct fused neurons in [0, {width})")
        self.width = width

    @classmethod
    def from_cols(cls, cols, width: int | None = None) -> SpaceMap:
        """The one-hot map sending neuron j to fused neuron ``cols[j]`` (of ``width``, default ``len(cols)``)."""
        return cls(cols=torch.as_tensor(np.asarray(cols), dtype=torch.long), width=width)

    @classmethod
    def identity(cls, n: int, device=None) -> SpaceMap:
        return cls(cols=torch.arange(n), width=n)

    @property
    def one_hot(self) -> bool:
        return self.cols is not None

    @property
    def shape(self) -> tuple[int, int]:
        if self.cols is not None:
            return (self.cols.numel(), self.width)
        return tuple(self._out.shape)

    def gather(self) -> Gather:
        """The map as a :class:`~hetfuse.graph.spec.Gather` (one-hot maps only)."""
        source = torch.full((self.width,), -1, dtype=torch.long)
        source[self.cols] = torch.arange(self.cols.numel())
        return Gather(source, self.cols.numel())

    def pull(self, v: torch.Tensor) -> torch.Tensor:
        """``outᵀ v``: a per-neuron quantity of network i at the fused neurons (0 where none of its neurons is)."""
        if self.cols is None:
            return self._out.to(device=v.device, dtype=v.dtype).T @ v
        out = torch.zeros(self.width, dtype=v.dtype, device=v.device)
        out[self.cols.to(v.device)] = v
        return out

    def _dense(self) -> torch.Tensor:
        return self.gather().dense()

    @property
    def out(self) -> torch.Tensor:
        return self._dense() if self.cols is not None else self._out

    @property
    def inn(self) -> torch.Tensor:
        return self._dense() if self.cols is not None else self._inn

    def __repr__(self) -> str:
        kind = "one-hot" if self.cols is not None else "dense"
        return f"SpaceMap({kind}, {self.shape[0]} -> {self.shape[1]})"


@dataclass
class MatchResult:
    """``widths[s]``: the fused width of space s; ``maps[i][s]``: network i's :class:`SpaceMap` for space s;
    ``info``: JSON-able details (``solvers[i][s]``: how each map was found). ``assemble``: for a matcher whose
    result is another kind of network than the target's (partial zipping: a multi-head network), a callable
    ``assemble(prepared, fused, repair_method) -> nn.Module`` that builds it from the combined network; None
    otherwise. ``linear``: the ``out`` maps are general linear maps (CCA), applied as they are — no column
    normalisation, every network's share of every fused neuron is its weight — and ``inn`` is what undoes them
    (``inn = pinv(out)ᵀ``); False for the non-negative maps of every other matcher."""

    widths: list[int]
    maps: list[list[SpaceMap]]
    info: dict = field(default_factory=dict)
    assemble: object = None
    linear: bool = False


@dataclass
class MatchContext:
    """What a matcher may use: the (balanced, structurally corresponding) networks, their descriptions, the
    target's index, the parameter slots, the alignment samples and the statistics of the activations."""

    models: list[nn.Module]
    graphs: list[NetworkGraph]
    target: int
    slots: list[ParamSlot]
    x: torch.Tensor
    progress: bool = False
    seed: int = 0
    positions: int | None = None  # per sample, at most this many positions in the statistics (None: all)
    _states: list[dict] | None = field(default=None, repr=False)
    _stats: dict = field(default_factory=dict, repr=False)

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_spaces(self) -> int:
        return len(self.graphs[0].spaces)

    def states(self) -> list[dict[str, torch.Tensor]]:
        """Every network's state as float64 tensors (integer buffers as they are)."""
        if self._states is None:
            self._states = [{k: v.detach().to(torch.float64) if v.is_floating_point() else v
                             for k, v in m.state_dict().items()} for m in self.models]
        return self._states

    def statistics(self, pairs: Literal["target", "all", "none"] = "target", *, post: bool = False) -> SpaceStats:
        """Moments of every space's activations on the samples (pre-activations, or with ``post`` the values after
        the ReLU); second moments between every network and the target (``target``) or between all pairs
        (``all``)."""
        key = (pairs, post)
        if key not in self._stats:
            k = self.n_models
            if pairs == "all":
                wanted = [(i, j) for i in range(k) for j in range(i, k)]
            elif pairs == "target":
                wanted = [(i, self.target) for i in range(k) if i != self.target]
            else:
                wanted = []
            self._stats[key] = space_statistics(self.models, self.graphs, self.x, pairs=wanted, post=post,
                                                 positions=self.positions)
        return self._stats[key]

    def producing_rows(self, i: int, s: int, inn: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Each neuron of network i's space s as one row: the rows of the tensors that produce it (weights, bias,
        BatchNorm entries) concatenated, their input columns first moved through ``inn`` (space -> consuming-side
        map). Only tensors whose inputs come from earlier spaces (or the network's input) take part: a residual
        stream is also produced by layers that read later spaces, not aligned yet when the stream is."""
        state = self.states()[i]
        graph = self.graphs[i]
        inputs: dict[str, list[tuple[int, object]]] = {}
        for s2, sp in enumerate(graph.spaces):
            for other in sp.in_members():
                inputs.setdefault(other.name, []).append((s2, other))
        rows = []
        for m in graph.spaces[s].out_members():
            tied = inputs.get(m.name, [])
            if any(s2 >= s for s2, _ in tied):
                continue
            t = state[m.name]
            for s2, other in tied:
                if inn and s2 in inn:
                    t = transform_axis(t, other, inn[s2])
            rows.append(m.rows(t, graph.spaces[s].size))
        return torch.cat(rows, dim=1)


def parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on a thread per core (for solvers that release the GIL), in order."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class NeuronMatcher(Method):
    """Base class of the neuron-matcher family. ``joint``: the matcher matches all networks together (its
    fused widths may differ from the target's); else each network is matched onto the target.
    ``recovers_permutations``: False for a matcher that does not look at the neurons (vanilla averaging); the
    conformance suite then fuses identical copies instead of permuted ones."""

    family = "match"
    joint: ClassVar[bool] = False
    recovers_permutations: ClassVar[bool] = True  # a network and a permuted copy of it fuse back into the network

    def match(self, ctx: MatchContext) -> MatchResult:
        raise NotImplementedError
