"""How a network is described: neuron spaces and the parameter axes tied to them.

A *neuron space* is a set of hidden units that can be permuted (or transported) together without
changing the network's function: the rows of the weight that produces the units, their bias
entries (and, for BatchNorm, its affine parameters and running statistics) and the columns of every
weight that consumes them. Every alignment, balancing and fusion step in hetfuse works on this
description, never on positional state-dict copying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Role = Literal["out", "in"]


@dataclass(frozen=True)
class ParamAxis:
    """One axis of one parameter (or buffer) tied to a neuron space.

    ``role="out"``: the axis indexes the space's neurons directly (weight rows of the producer,
    bias, BatchNorm entries). ``role="in"``: the axis consumes the space (columns of the next
    weight); with ``block > 1`` each neuron owns ``block`` consecutive entries (a conv channel
    flattened into a linear layer's input). ``offset``: the axis holds the space's entries at
    ``[offset, offset + size·block)`` only (packed q/k/v projections); ``None``: the whole axis.
    """

    name: str
    axis: int
    role: Role
    block: int = 1
    offset: int | None = None  # a packed tensor (q, k and v rows in one weight): where the space's entries start

    def segment(self, tensor: torch.Tensor, size: int) -> torch.Tensor:
        """The entries of ``tensor`` along this axis that belong to a space of ``size`` neurons."""
        if self.offset is None:
            return tensor
        return tensor.narrow(self.axis, self.offset, size * (self.block if self.role == "in" else 1))

    def rows(self, tensor: torch.Tensor, size: int) -> torch.Tensor:
        """The space's entries of ``tensor`` as ``size`` rows (a neuron's block of entries and every other axis
        flattened into its row)."""
        return self.segment(tensor, size).movedim(self.axis, 0).reshape(size, -1)


@dataclass
class NeuronSpace:
    """A hidden layer (or a residual stream): ``size`` neurons and the parameter axes tied to them."""

    name: str
    size: int
    kind: Literal["linear", "conv"]
    producers: list[str]
    act_module: str
    members: list[ParamAxis] = field(default_factory=list)
    act_nodes: list[str] = field(default_factory=list)  # fx nodes whose outputs are the space's (pre-)activations
    norms: list[str] = field(default_factory=list)      # BatchNorm modules normalising this space
    stream: bool = False                                # a residual stream (several producers joined by additions)

    def out_members(self) -> list[ParamAxis]:
        return [m for m in self.members if m.role == "out"]

    def in_members(self) -> list[ParamAxis]:
        return [m for m in self.members if m.role == "in"]


@dataclass(frozen=True)
class Attention:
    """Multi-head attention between neuron spaces: ``qk`` (the query and key rows, one space: a query and its key
    must move together) and ``v`` (the value rows and the output projection's input columns), ``heads`` heads of
    ``size // heads`` consecutive neurons each. The function is unchanged by a permutation of whole heads (the same
    one in both spaces) composed with, inside each head, any permutation of ``qk`` and any permutation of ``v``;
    other permutations of these spaces change it."""

    qk: int
    v: int
    heads: int


INPUT = -1   # ModuleInfo.in_space of a layer that reads the model's input
OUTPUT = -2  # ModuleInfo.out_space of the output layer


@dataclass
class ModuleInfo:
    """A parametric module (Linear, Conv2d, BatchNorm, ...) or a tensor attribute (kind ``param``: a position
    embedding, a class token; ``name`` is its owner module) as the description sees it.

    ``in_space`` / ``out_space`` index the hidden neuron spaces (:data:`INPUT` for the model's input,
    :data:`OUTPUT` for the class outputs); a BatchNorm has the space it normalises on both sides.
    ``node`` is the fx node that calls it; ``params`` the local names of its tensors in state-dict order.
    """

    name: str
    kind: str  # the op table's layer kind ("linear", "conv", "norm", ...) or "param" (a tensor attribute)
    node: str
    in_space: int
    out_space: int
    params: list[str]
    out_parts: list[int] | None = None  # a packed projection (fused q, k, v): the spaces of its output's parts

    def key(self, param: str) -> str:
        """The state-dict key of one of its tensors (the root module's attributes have no prefix)."""
        return f"{self.name}.{param}" if self.name else param


@dataclass
class NetworkGraph:
    """The description of a network: its hidden neuron spaces in forward order.

    ``chain`` is True when the network is a plain sequence of layers (each space has one producer
    and feeds only the next layer). ``modules`` lists the parametric modules in the order of the traced
    graph: two networks of the same structure (any widths) have corresponding lists, which is how
    parameters are paired across models (:mod:`hetfuse.graph.correspond`). ``gm`` is the traced
    ``torch.fx.GraphModule`` whose node names the description uses.
    """

    spaces: list[NeuronSpace]
    input_dim: int
    output_dim: int
    chain: bool
    layer_modules: list[str]
    conv: bool = False
    modules: list[ModuleInfo] = field(default_factory=list)
    gm: object = field(default=None, repr=False, compare=False)
    attention: list[Attention] = field(default_factory=list)
    feature_last: frozenset[str] = frozenset()  # fx nodes whose neurons are on the last axis (N x tokens x D)
    headed: frozenset[str] = frozenset()  # fx nodes read as N x heads x tokens x head-features (a packed q/k/v part)
    input_layout: str | None = None  # "tokens": the first layer reads N x tokens x features inputs

    @property
    def node_layouts(self) -> dict[str, str]:
        """How to read the neurons of nodes that are not N x C (x H x W): "tokens" or "headed"."""
        return {**{n: "tokens" for n in self.feature_last}, **{n: "headed" for n in self.headed}}

    def heads_of(self, space: int) -> Attention | None:
        """The attention whose ``qk`` or ``v`` space is ``space`` (its permutations are restricted), or None."""
        return next((a for a in self.attention if space in (a.qk, a.v)), None)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.spaces)

    @property
    def widths(self) -> list[int]:
        return [s.size for s in self.spaces]

    @property
    def image_input(self) -> bool:
        """Whether the network reads N x C x H x W images (its first layer's handler in the op table says so)."""
        from .ops import layer_op

        first = next((m for m in self.modules if m.kind != "param"), None)
        return first is not None and layer_op(first.kind).image_input

    @property
    def token_input(self) -> bool:
        """Whether the network reads N x tokens integer ids (it starts with an embedding)."""
        from .ops import layer_op

        first = next((m for m in self.modules if m.kind != "param"), None)
        return first is not None and layer_op(first.kind).token_input


@dataclass(frozen=True)
class Gather:
    """A one-hot neuron-space map held as indices: fused neuron k is source neuron ``source[k]`` (−1: none, zeros).
    Its dense ``n_src x n_dst`` matrix has a 1 at (``source[k]``, k); :func:`transform_axis` applies it as a
    gather without forming that matrix."""

    source: torch.Tensor  # long, (n_dst,)
    n_src: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_src, int(self.source.numel()))

    def dense(self, dtype=torch.float64, device=None) -> torch.Tensor:
        m = torch.zeros(self.shape, dtype=dtype, device=device if device is not None else self.source.device)
        k = torch.nonzero(self.source >= 0).flatten()
        m[self.source[k].to(m.device), k.to(m.device)] = 1.0
        return m


def transform_axis(tensor: torch.Tensor, axis: ParamAxis, matrix: torch.Tensor | Gather) -> torch.Tensor:
    """Apply a neuron-space map to one tied axis.

    ``matrix`` is ``n_src x n_dst`` (a tensor, or a :class:`Gather`). An ``out`` axis of size ``n_src`` becomes
    ``n_dst`` with ``new[j] = sum_i matrix[i, j] * old[i]``; an ``in`` axis (size ``n_src * block``) the same, per
    block entry. Both cases are the same contraction; only the block layout differs. The result keeps the
    tensor's dtype.
    """
    n_src, n_dst = matrix.shape
    if axis.offset is not None:  # a packed tensor: transform the space's segment, keep the rest
        blk = axis.block if axis.role == "in" else 1
        whole = ParamAxis(axis.name, axis.axis, axis.role, axis.block)
        length = tensor.shape[axis.axis]
        if axis.offset + n_src * blk > length:
            raise ValueError(f"{axis.name}: axis {axis.axis} has size {length}, too small for {n_src}x{blk} entries "
                             f"at {axis.offset}")
        parts = [tensor.narrow(axis.axis, 0, axis.offset),
                 transform_axis(tensor.narrow(axis.axis, axis.offset, n_src * blk), whole, matrix),
                 tensor.narrow(axis.axis, axis.offset + n_src * blk, length - axis.offset - n_src * blk)]
        return torch.cat(parts, dim=axis.axis)
    blk = axis.block if axis.role == "in" else 1
    if isinstance(matrix, Gather) and blk == 1:  # one gather along the axis itself
        if tensor.shape[axis.axis] != n_src:
            raise ValueError(f"{axis.name}: axis {axis.axis} has size {tensor.shape[axis.axis]}, expected {n_src}")
        src = matrix.source.to(tensor.device)
        out = tensor.index_select(axis.axis, src.clamp_min(0))
        if bool((src < 0).any()):
            shape = [1] * out.dim()
            shape[axis.axis] = -1
            out = out * (src >= 0).to(out.dtype).view(shape)
        return out
    t = tensor.movedim(axis.axis, 0)
    rest = t.shape[1:]
    if t.shape[0] != n_src * blk:
        raise ValueError(f"{axis.name}: axis {axis.axis} has size {t.shape[0]}, expected {n_src}x{blk}")
    t = t.reshape(n_src, blk, -1)
    if isinstance(matrix, Gather):
        src = matrix.source.to(t.device)
        out = t.index_select(0, src.clamp_min(0))
        if bool((src < 0).any()):
            out = out * (src >= 0).to(t.dtype).view(-1, 1, 1)
        return out.reshape(n_dst * blk, *rest).movedim(0, axis.axis).contiguous()
    m = matrix.to(dtype=t.dtype, device=t.device)
    sel = _single_source(m)
    if sel is not None:  # every target takes one source (a permutation, a copy, a selection): a gather
        rows, scale = sel
        out = t.index_select(0, rows)
        if not bool((scale == 1).all()):
            out = out * scale.view(-1, 1, 1)
    elif (tgt := _single_target(m)) is not None:  # every source goes to one target (a clustering): a scatter-add
        cols, scale = tgt
        out = torch.zeros((n_dst,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        out.index_add_(0, cols, t * scale.view(-1, 1, 1))
    else:
        out = torch.einsum("sbr,sd->dbr", t, m)
    return out.reshape(n_dst * blk, *rest).movedim(0, axis.axis).contiguous()


def _single_target(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(target index, value) per row when every row of ``m`` has at most one non-zero entry, else None."""
    nz = m != 0
    if not bool((nz.sum(1) <= 1).all()):
        return None
    cols = nz.to(torch.int8).argmax(1)
    return cols, m[torch.arange(m.shape[0], device=m.device), cols]


def _single_source(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(source index, value) per column when every column of ``m`` has at most one non-zero entry (an empty column
    gets value 0), else None."""
    nz = m != 0
    if not bool((nz.sum(0) <= 1).all()):
        return None
    rows = nz.to(torch.int8).argmax(0)
    return rows, m[rows, torch.arange(m.shape[1], device=m.device)]


def permute_state(state: dict[str, torch.Tensor], space: NeuronSpace, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return a copy of ``state`` with the neurons of ``space`` reordered: new neuron j = old neuron perm[j]."""
    n = space.size
    p = torch.zeros(n, n, dtype=torch.float64)
    p[perm, torch.arange(n)] = 1.0
    new = dict(state)
    for m in space.members:
        t = new[m.name]
        if t.is_floating_point():
            new[m.name] = transform_axis(t, m, p)
        else:  # integer buffers are never tied to a neuron axis
            raise ValueError(f"{m.name} is not a floating-point tensor")
    return new


def head_permutation(order: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
    """The permutation of a space of ``len(order)`` heads that puts old head ``order[h]`` at head ``h``, its
    neurons reordered by ``within[h]`` (new neuron j = old neuron perm[j], as :func:`permute_state`)."""
    d = len(within[0])
    return torch.cat([order[h] * d + within[h] for h in range(len(order))])


def permuted_copy(model: nn.Module, graph: NetworkGraph, *, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """A copy of ``model`` with every neuron space permuted at random (attention spaces: whole heads, the same
    order in the query/key and the value space, and within each head); returns it and the permutations."""
    import copy

    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head_order = {a: torch.randperm(a.heads, generator=g) for a in graph.attention}
    perms = []
    for i, space in enumerate(graph.spaces):
        att = graph.heads_of(i)
        if att is None:
            perm = torch.randperm(space.size, generator=g)
        else:
            perm = head_permutation(head_order[att], [torch.randperm(space.size // att.heads, generator=g)
                                                      for _ in range(att.heads)])
        state = permute_state(state, space, perm)
        perms.append(perm)
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone, perms


def check_permutation_invariance(model: nn.Module, graph: NetworkGraph, x: torch.Tensor, *,
                                 seed: int = 0, atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """Permute every neuron space at random and check the outputs do not change (eval mode).

    Returns the largest absolute output difference; raises ``AssertionError`` when it exceeds the
    tolerance, which means the description misses a parameter axis tied to some space.
    """
    was_training = model.training
    model.eval()
    clone, _ = permuted_copy(model, graph, seed=seed)
    clone.eval()
    with torch.no_grad():
        y0 = model(x)
        y1 = clone(x)
    model.train(was_training)
    diff = (y0 - y1).abs().max().item()
    scale = y0.abs().max().item()
    if not diff <= atol + rtol * scale:
        raise AssertionError(f"permuting neuron spaces changed the outputs by {diff:.3g} (scale {scale:.3g})")
    return diff
