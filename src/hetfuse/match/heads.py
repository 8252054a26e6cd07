"""Attention heads matched as units: a permutation of whole heads shared by an attention's query/key and value
spaces, then within each pair of matched heads a permutation of each space (see
:class:`hetfuse.graph.spec.Attention`). Used by every permutation matcher (activation matching, weight matching,
exact optimal transport between equal widths), so that the aligned network computes the same function."""

from __future__ import annotations

import numpy as np
import torch

from ..graph.spec import Attention
from .assignment import solve_assignment


def head_structured(scores: list, heads: int, *, maximize: bool = True) -> list[np.ndarray]:
    """The best head-structured permutation of one attention's spaces.

    ``scores``: per space (query/key, value), an ``n x n`` matrix (a torch tensor on any device, or a NumPy array)
    of model i's neurons (rows) against the target's (columns), ``n = heads x d``. Head a of model i is assigned to
    head b of the target by a linear assignment over heads whose score is the sum over the spaces of the best
    within-head assignment of the (a, b) blocks; each space then gets those within-head assignments. Returns per
    space ``cols`` (model i's neuron j goes to target neuron ``cols[j]``), as
    :func:`~hetfuse.match.assignment.solve_assignment`."""
    scores = [torch.as_tensor(c) for c in scores]
    g = torch.zeros(heads, heads, dtype=torch.float64)
    within: dict[tuple[int, int, int], np.ndarray] = {}
    for k, c in enumerate(scores):
        d = c.shape[0] // heads
        for a in range(heads):
            for b in range(heads):
                block = c[a * d:(a + 1) * d, b * d:(b + 1) * d]
                cols, _ = solve_assignment(block, maximize=maximize)
                within[k, a, b] = cols
                g[a, b] += float(block[torch.arange(d, device=block.device),
                                       torch.as_tensor(cols, device=block.device)].sum())
    head_cols, _ = solve_assignment(g, maximize=maximize)
    out = []
    for k, c in enumerate(scores):
        d = c.shape[0] // heads
        cols = np.empty(c.shape[0], dtype=np.int64)
        for a in range(heads):
            b = int(head_cols[a])
            cols[a * d:(a + 1) * d] = b * d + within[k, a, b]
        out.append(cols)
    return out


def restrict_to_heads(cols: list[np.ndarray], scores: list[np.ndarray], attention: list[Attention], *,
                      maximize: bool = True) -> list[np.ndarray]:
    """``cols`` (one assignment per space) with every attention's spaces replaced by their best head-structured
    permutation under ``scores``."""
    cols = list(cols)
    for att in attention:
        cols[att.qk], cols[att.v] = head_structured([scores[att.qk], scores[att.v]], att.heads, maximize=maximize)
    return cols


def keeps_heads(out: torch.Tensor, heads: int, *, exact: bool = True) -> bool:
    """Whether a space map (``n_i x r``, producing side) moves whole heads onto whole heads (each head of model i
    into one head of the fused network, a different one for each) — with ``exact`` also by a permutation."""
    n, r = out.shape
    if n % heads or r % heads:
        return False
    nz = out != 0
    if exact and not (n == r and bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all())):
        return False
    blocks = nz.reshape(heads, n // heads, heads, r // heads).any(3).any(1)
    return bool((blocks.sum(1) == 1).all()) and bool((blocks.sum(0) == 1).all())


def attention_notes(graphs, result, target: int) -> list[str]:
    """A note for every attention whose maps do not keep heads whole (soft plans, zip merges, other widths): the
    fused attention then mixes neurons of different heads and is an approximation of the aligned models'."""
    mixed: dict[str, list[int]] = {}
    soft: dict[str, list[int]] = {}
    for att in graphs[target].attention:
        name = graphs[target].spaces[att.qk].name
        for i in range(len(graphs)):
            if i == target:
                continue
            if not all(keeps_heads(result.maps[i][s].out, att.heads, exact=False) for s in (att.qk, att.v)):
                mixed.setdefault(name, []).append(i)
            elif not all(keeps_heads(result.maps[i][s].out, att.heads) for s in (att.qk, att.v)):
                soft.setdefault(name, []).append(i)
    notes = []
    if mixed:
        notes.append(f"attention at {', '.join(repr(n) for n in mixed)}: the maps of model(s) "
                     f"{sorted({i for v in mixed.values() for i in v})} do not move whole heads onto whole heads "
                     "(merged or soft maps), so the fused attention mixes neurons of different heads and approximates "
                     "the aligned models; the permutation matchers and ot-acts / ot-weights keep heads whole")
    if soft:
        notes.append(f"attention at {', '.join(repr(n) for n in soft)}: heads of model(s) "
                     f"{sorted({i for v in soft.values() for i in v})} are matched as whole units, but the neurons "
                     "within them are transported, not permuted (other head sizes or a soft solver): the fused "
                     "attention approximates the aligned models")
    return notes
