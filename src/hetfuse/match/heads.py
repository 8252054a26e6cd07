"""Attention heads matched as units: a permutation of whole heads shared by an attention's query/key and value
spaces, then within each pair of matched heads a permutation of each space (see
:class:`hetfuse.graph.spec.Attention`). Used by every permutation matcher (activation matching, weight matching,
exact optimal transport between equal widths), so that the aligned network computes the same function."""

from __future__ import annotations

import numpy as np
import torch

from ..graph.spec import Attention
from .assignment import solve_assignment


def head_structured(scores: list[np.ndarray], heads: int, *, maximize: bool = True) -> list[np.ndarray]:
    """The best head-structured permutation of one attention's spaces.

    ``scores``: per space (query/key, value), an ``n x n`` matrix of model i's neurons (rows) against the target's
    (columns), ``n = heads x d``. Head a of model i is assigned to head b of the target by a linear assignment over
    heads whose score is the sum over the spaces of the best within-head assignment of the (a, b) blocks; each
    space then gets those within-head assignments. Returns per space ``cols`` (model i's neuron j goes to target
    neuron ``cols[j]``), as :func:`~hetfuse.match.assignment.solve_assignment`."""
    g = np.zeros((heads, heads))
    within: dict[tuple[int, int, int], np.ndarray] = {}
    for k, c in enumerate(scores):
        d = c.shape[0] // heads
        for a in range(heads):
            for b in range(heads):
                block = c[a * d:(a + 1) * d, b * d:(b + 1) * d]
                cols, _ = solve_assignment(block, maximize=maximize)
                within[k, a, b] = cols
                g[a, b] += block[np.arange(d), cols].sum()
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


def keeps_heads(out: torch.Tensor, heads: int) -> bool:
    """Whether a space map (``n_i x r``, producing side) moves whole heads onto whole heads by a permutation."""
    n, r = out.shape
    if n != r or n % heads:
        return False
    nz = out != 0
    if not (bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all())):
        return False
    d = n // heads
    blocks = nz.reshape(heads, d, heads, d).any(3).any(1)
    return bool((blocks.sum(1) == 1).all())


def attention_notes(graphs, result, target: int) -> list[str]:
    """A note for every attention whose maps do not keep heads whole (soft plans, zip merges, other widths): the
    fused attention then mixes neurons of different heads and is an approximation of the aligned models'."""
    notes = []
    for att in graphs[target].attention:
        bad = [i for i in range(len(graphs)) if i != target and not all(
            keeps_heads(result.maps[i][s].out, att.heads) for s in (att.qk, att.v))]
        if bad:
            notes.append(f"attention at '{graphs[target].spaces[att.qk].name}' ({att.heads} heads): the maps of "
                         f"model(s) {bad} do not move whole heads onto whole heads (merged or soft maps, or other "
                         "widths), so the fused attention mixes neurons of different heads and approximates the "
                         "aligned models; the permutation matchers (perm-acts, perm-weights, exact ot-acts / "
                         "ot-weights) keep heads whole")
    return notes
