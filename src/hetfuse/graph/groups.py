"""Depth structure of a described network: the units that depth alignment places, grouped.

Read off the traced graph, for any architecture the description accepts:

* a **residual block** is the part of the graph between a residual addition's *block input* (the node
  that dominates both operands of the addition: every path from the model's input to the addition
  passes through it) and its *block output* (the addition followed by any elementwise activation); a block
  whose branch holds an op that opens a layer (attention, per the op table) and the blocks after it up to the
  next such block form one block (a transformer layer: attention and feed-forward sub-blocks);
* a **layer unit** is a hidden layer (its own neuron space, one Linear or Conv2d producer, maybe a
  BatchNorm) outside every residual block; its output node is its activation (the ReLU after it);
* **groups**: consecutive layer units that feed each other directly (only activations between them;
  a pooling, flatten or residual stage starts a new group) form one group of kind ``conv`` or
  ``linear``; the blocks of one residual stream (one stage) form a group of kind ``block``.

Groups of two networks of the same family correspond by order; depth alignment maps the units of a
shallower group into the deeper one, and balancing inserts identity layers or zero blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.fx as fx

from ..errors import HetfuseError
from .ops import channelwise, is_add, is_elementwise, is_layer_norm, is_nonnegative, starts_layer
from .spec import INPUT, NetworkGraph


@dataclass
class Unit:
    """One unit that depth alignment places.

    ``kind``: ``layer`` or ``block``. ``space``: index of the neuron space the unit produces (a block:
    its residual stream). ``node``: fx node whose output represents the unit (a layer: its
    pre-activation, after its BatchNorm; a block: the stream at its addition). ``out_node``: the node
    after which identity layers / zero blocks go (the unit's activation, or the block's output).
    ``in_node``: the node feeding the unit (a layer: its producer's input; a block: its block input).
    ``weight``: module whose weight represents the unit (a block: the last layer of its branch).
    ``relu``: the unit's output passes through a ReLU (so it is non-negative).
    """

    name: str
    kind: Literal["layer", "block"]
    space: int
    node: str
    out_node: str
    in_node: str
    weight: str | None
    width: int
    relu: bool
    modules: list[str] = field(default_factory=list)  # parametric modules of the unit, in graph order


@dataclass
class Group:
    name: str
    kind: Literal["conv", "linear", "block"]
    units: list[Unit] = field(default_factory=list)


def activation_chain(node: fx.Node, modules: dict) -> tuple[fx.Node, bool]:
    """Follow ``node`` through single-use elementwise activations; returns (last node, passed a ReLU)."""
    relu = False
    while len(node.users) == 1:
        (user,) = node.users
        if not is_elementwise(user, modules) or user.args[0] is not node:
            break
        relu = relu or is_nonnegative(user, modules)
        node = user
    return node, relu


def _dominators(nodes: list[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    dom: dict[fx.Node, set[fx.Node]] = {}
    # tensor attributes, shapes (x.shape[0]: an exported graph reads the batch size off the model's input) and what
    # is computed from them alone: they carry no data from the input
    const: set[fx.Node] = set()
    for n in nodes:  # topological order: every input is seen before its users
        shape = (n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape") or \
            (n.op == "call_method" and n.target in ("size", "dim"))
        if n.op == "get_attr" or shape or (n.all_input_nodes and all(p in const for p in n.all_input_nodes)):
            const.add(n)
        preds = [p for p in n.all_input_nodes if p in dom and p not in const]
        if not preds:
            dom[n] = {n}
        else:
            common = set.intersection(*(dom[p] for p in preds))
            dom[n] = common | {n}
    return dom


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for p in n.all_input_nodes:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


@dataclass
class Block:
    add: fx.Node
    block_in: fx.Node
    block_out: fx.Node
    region: list[fx.Node]  # nodes of the block in graph order (block input excluded, block output included)
    relu: bool
    parts: list[Block] = field(default_factory=list)  # a transformer layer: its residual sub-blocks
    post_norm: bool = False  # its output is LayerNorm(x + f(x)): a zero branch is not the identity

    @property
    def identity_shortcut(self) -> bool:
        """Whether every addition of the block reads its own block input directly (no projection shortcut)."""
        if self.parts:
            return all(p.identity_shortcut for p in self.parts)
        return any(a is self.block_in for a in self.add.args[:2])


def residual_blocks(graph: NetworkGraph) -> list[Block]:
    """Every residual addition of the network as a block, in graph order."""
    gm = graph.gm
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    stream_nodes = {name for s in graph.spaces if s.stream for name in s.act_nodes}
    dom = None
    found = []
    for n in nodes:
        if not (is_add(n) and n.name in stream_nodes):
            continue
        if dom is None:
            dom = _dominators(nodes)
        strict = dom[n] - {n}
        block_in = max(strict, key=lambda d: pos[d])
        block_out, relu = activation_chain(n, modules)
        found.append((n, block_in, block_out, relu))
    # post-norm blocks (x -> LN(x + f(x)), BERT): where a LayerNorm after a block's output is the input of a later
    # block, every block's output extends through the LayerNorm that alone reads it
    inputs = {b_in for _, b_in, _, _ in found}
    post_norm = any(_norm_after(out, modules) in inputs for _, _, out, _ in found)
    blocks = []
    for n, block_in, block_out, relu in found:
        if post_norm and (norm := _norm_after(block_out, modules)) is not None:
            block_out = norm
        region = sorted((_ancestors(block_out) | {block_out}) & _descendants(block_in), key=lambda m: pos[m])
        blocks.append(Block(n, block_in, block_out, region, relu, post_norm=post_norm))
    return _layers(blocks, modules)


def _norm_after(node: fx.Node, modules: dict) -> fx.Node | None:
    """The LayerNorm that is the only reader of ``node``, if any."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if is_layer_norm(user, modules) and user.args[0] is node else None


def _layers(blocks: list[Block], modules: dict) -> list[Block]:
    """Residual sub-blocks joined into layers where the op table says an op opens one (attention): each block
    whose branch holds such an op, with the blocks after it up to the next one on the same stream (a
    transformer layer's attention and feed-forward sub-blocks), is one block; other blocks stay as they are."""
    opens = [any(starts_layer(n, modules) for n in b.region) for b in blocks]
    if not any(opens):
        return blocks
    out: list[Block] = []
    run: list[Block] = []

    def flush():
        if len(run) == 1:
            out.append(run[0])
        elif run:
            first, last = run[0], run[-1]
            out.append(Block(last.add, first.block_in, last.block_out, [n for b in run for n in b.region], last.relu,
                             list(run), last.post_norm))
        run.clear()

    for b, o in zip(blocks, opens, strict=True):
        if o or not run or run[-1].block_out is not b.block_in:
            flush()
        run.append(b)
    flush()
    return out


def depth_groups(graph: NetworkGraph) -> list[Group]:
    """The network's groups of depth units (see the module docstring), in forward order."""
    gm = graph.gm
    if gm is None:
        raise HetfuseError("this network description has no traced graph")
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    blocks = residual_blocks(graph)
    in_block: dict[str, int] = {}
    for k, b in enumerate(blocks):
        for n in b.region:
            in_block.setdefault(n.name, k)
    by_module = {m.name: m for m in graph.modules}

    # layer units: hidden spaces outside every block, with a single Linear/Conv2d producer
    layer_units: list[Unit] = []
    for idx, space in enumerate(graph.spaces):
        if space.stream or len(space.producers) != 1:
            continue
        prod = by_module[space.producers[0]]
        if prod.node in in_block:
            continue
        act = nodes[space.act_nodes[0]]
        out, relu = activation_chain(act, modules)
        src = nodes[prod.node].args[0]
        mods = [prod.name] + [m.name for m in graph.modules if channelwise(m.kind) and m.out_space == idx]
        layer_units.append(Unit(space.name, "layer", idx, act.name, out.name, src.name, prod.name, space.size,
                                relu, mods))
    layer_units.sort(key=lambda u: order[by_module[u.weight].node])

    entries: list[tuple[int, Group]] = []
    current: Group | None = None
    prev: Unit | None = None
    counts = {"conv": 0, "linear": 0, "block": 0}
    for u in layer_units:
        kind = "conv" if graph.spaces[u.space].kind == "conv" else "linear"
        joined = (current is not None and current.kind == kind and prev is not None
                  and u.in_node == prev.out_node)
        if not joined:
            current = Group(f"{kind}{counts[kind]}", kind)
            counts[kind] += 1
            entries.append((order[by_module[u.weight].node], current))
        current.units.append(u)
        prev = u

    # block units: the additions of each residual stream, in order
    streams: dict[int, Group] = {}
    space_of_node = {name: i for i, s in enumerate(graph.spaces) if s.stream for name in s.act_nodes}
    for b in blocks:
        s = space_of_node[b.add.name]
        if s not in streams:
            streams[s] = Group(f"stage{counts['block']}", "block")
            counts["block"] += 1
            entries.append((order[b.add.name], streams[s]))
        mods = [by_module[n.target].name for n in b.region
                if n.op == "call_module" and n.target in by_module]
        weight = _branch_layer(b, graph, by_module, nodes)
        streams[s].units.append(Unit(f"{streams[s].name}.block{len(streams[s].units)}", "block", s, b.add.name,
                                     b.block_out.name, b.block_in.name, weight, graph.spaces[s].size, b.relu,
                                     mods))
    entries.sort(key=lambda e: e[0])
    return [g for _, g in entries]


def _branch_layer(block: Block, graph: NetworkGraph, by_module: dict, nodes: dict) -> str | None:
    """The last Linear/Conv2d of a block's residual branch (the producer of the stream that does not read
    the block input directly)."""
    cands = [by_module[n.target] for n in block.region if n.op == "call_module" and n.target in by_module
             and not channelwise(by_module[n.target].kind)]
    stream = [m for m in cands if m.out_space >= 0 and graph.spaces[m.out_space].stream]
    direct = {m.name for m in stream if m.in_space != INPUT and nodes[m.node].args[0] is block.block_in}
    branch = [m for m in stream if m.name not in direct] or stream
    return branch[-1].name if branch else None


_KIND_WORDS = {"conv": "a group of convolutions", "linear": "a fully connected group", "block": "a residual stage"}


def _describe_group(g: Group | None) -> str:
    if g is None:
        return "nothing (its groups end there)"
    units = ", ".join(u.name for u in g.units[:3]) + (" ..." if len(g.units) > 3 else "")
    return f"{g.name}, {_KIND_WORDS.get(g.kind, g.kind)} of {len(g.units)} unit(s) ({units})"


def check_group_pairing(groups: list[list[Group]]) -> None:
    """Depth alignment pairs groups one to one: every network needs the same sequence of group kinds. Where the
    sequences differ, the error names the first group of a model that has no partner in model 0, and why."""
    kinds = [[g.kind for g in gs] for gs in groups]
    if all(k == kinds[0] for k in kinds):
        return
    i = next(i for i, k in enumerate(kinds) if k != kinds[0])
    ref, other = groups[0], groups[i]
    pos = next((p for p in range(max(len(ref), len(other)))
                if p >= len(ref) or p >= len(other) or ref[p].kind != other[p].kind), 0)
    mine = other[pos] if pos < len(other) else None
    theirs = ref[pos] if pos < len(ref) else None
    lost, partner_model = (mine, 0) if mine is not None else (theirs, i)
    desc = "; ".join(f"model {k}: {', '.join(f'{g.name} ({len(g.units)})' for g in gs) or 'none'}"
                     for k, gs in enumerate(groups))
    raise HetfuseError(
        f"the models' depth structures do not pair up group by group: group {pos + 1} (1-based) of model "
        f"{i if mine is not None else 0} is {_describe_group(lost)}, but model {partner_model} has "
        f"{_describe_group(theirs if mine is not None else mine)} there (pooling groups, residual stages and "
        f"fully connected parts must correspond in order). All groups: {desc}")
