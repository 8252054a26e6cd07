"""Weight matching (``perm-weights``): the cached, incremental implementation takes the same steps as the plain
algorithm — every space solved in every sweep from costs rebuilt with dense permutation matrices — and so ends at the
same permutations, with the objective it reports equal to Σ ⟨W_t, P W_i⟩ recomputed from them."""

import numpy as np
import pytest
import torch

from hetfuse import FusionConfig, prepare_fusion
from hetfuse.graph.correspond import slot_axes
from hetfuse.graph.spec import transform_axis
from hetfuse.match import PermWeights
from hetfuse.match.assignment import solve_assignment
from hetfuse.match.heads import head_structured
from hetfuse.models import MLP
from models_zoo_for_tests import inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _perm_matrix(p):
    m = torch.zeros(len(p), len(p), dtype=torch.float64)
    m[torch.arange(len(p)), torch.as_tensor(np.asarray(p))] = 1.0
    return m


def _tied(ctx, i, t):
    states = ctx.states()
    out = []
    for slot in ctx.slots:
        if slot.keys[i] is None or slot.keys[t] is None:
            continue
        a, b = states[i][slot.keys[i]], states[t][slot.keys[t]]
        axes = slot_axes(ctx.graphs[i], slot, i)
        if a.is_floating_point() and axes:
            out.append((a, b, axes))
    return out


def _reference(ctx, i, t, *, max_iter=100, seed=0):
    """The plain coordinate descent: each tied axis once, every cost rebuilt from scratch at every step."""
    widths = [sp.size for sp in ctx.graphs[t].spaces]
    tied = _tied(ctx, i, t)
    perms = [np.arange(n) for n in widths]
    partner = {}
    for att in ctx.graphs[t].attention:
        partner[att.qk] = partner[att.v] = att
    gen = np.random.default_rng(seed)

    def cost_of(s):
        n = widths[s]
        cost = torch.zeros(n, n, dtype=torch.float64)
        for a, b, axes in tied:
            for idx, (s2, ax) in enumerate(axes):
                if s2 != s:
                    continue
                aa = a
                for jdx, (s3, ax3) in enumerate(axes):
                    if jdx != idx:
                        aa = transform_axis(aa, ax3, _perm_matrix(perms[s3]))
                cost += ax.rows(aa, n) @ ax.rows(b, n).T
        return cost.numpy()

    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        changed = False
        for s in gen.permutation(len(widths)):
            s = int(s)
            att = partner.get(s)
            if att is not None and s != att.qk:
                continue
            group = [s] if att is None else [att.qk, att.v]
            costs = [cost_of(k) for k in group]
            found = [solve_assignment(costs[0], maximize=True)[0]] if att is None else head_structured(costs,
                                                                                                       att.heads)
            old = sum(c[np.arange(len(perms[k])), perms[k]].sum() for c, k in zip(costs, group, strict=True))
            new = sum(c[np.arange(len(f)), f].sum() for c, f in zip(costs, found, strict=True))
            if new > old + 1e-12 * max(1.0, abs(old)):
                for k, f in zip(group, found, strict=True):
                    perms[k] = f
                changed = True
        if not changed:
            break
    return perms, sweeps


def _objective(ctx, i, t, perms):
    total = 0.0
    for a, b, axes in _tied(ctx, i, t):
        for s, ax in axes:
            a = transform_axis(a, ax, _perm_matrix(perms[s]))
        total += float((a * b).sum())
    return total


def _run(models, x, monkeypatch, **params):
    seen = {}
    match = PermWeights.match

    def spy(self, ctx):
        seen["ctx"] = ctx
        return match(self, ctx)

    monkeypatch.setattr(PermWeights, "match", spy)
    prep = prepare_fusion(models, x, FusionConfig(target=0, match="perm-weights", samples=8, repair="none", **params))
    return seen["ctx"], prep.match


def _check(models, x, monkeypatch, **params):
    ctx, result = _run(models, x, monkeypatch, **params)
    perms, sweeps = _reference(ctx, 1, 0, **params)
    got = [m.out.argmax(1).numpy() for m in result.maps[1]]
    for s, (p, q) in enumerate(zip(got, perms, strict=True)):
        assert np.array_equal(p, q), f"space {s} differs from the plain algorithm"
    assert result.info["sweeps"] == [sweeps]
    assert 1 <= result.info["solves"][0] <= sweeps * len(perms)
    assert result.info["objective"][0] == pytest.approx(_objective(ctx, 1, 0, perms), rel=1e-12, abs=1e-12)
    return result


@pytest.fixture(params=[1, 2], ids=["sequential", "two-threads"])
def workers(request, monkeypatch):
    """The descent run step after step, and with independent steps on two threads: the same steps either way. With
    two threads every assignment is slowed down a little, so that steps overlap (a step that ran beside one it
    conflicts with would read a permutation too early or too late and change the result)."""
    import time

    import hetfuse.match.weights as weights

    monkeypatch.setattr(weights, "_workers", lambda: request.param)
    if request.param > 1:
        solve = weights.solve_assignment

        def slow(*args, **kwargs):
            time.sleep(0.002)
            return solve(*args, **kwargs)

        monkeypatch.setattr(weights, "solve_assignment", slow)
    return request.param


@pytest.mark.parametrize("kind", ["mlp-nobias", "resnet-projection", "vgg-bn", "vit-hand", "vit-fused-qkv",
                                  "torch-encoder-preln"])
def test_the_same_permutations_as_the_plain_algorithm(kind, monkeypatch, workers):
    x = inputs(kind, 8, 0)
    _check([make(kind, 0, x), make(kind, 1, x)], x, monkeypatch)


def test_the_same_permutations_on_wide_layers_with_many_sweeps(monkeypatch, workers):
    """Wide enough that the descent runs many sweeps whose steps change a few neurons (the incremental updates)."""
    torch.manual_seed(0)
    a = MLP(20, [96] * 4, 5, bias=True)
    torch.manual_seed(1)
    b = MLP(20, [96] * 4, 5, bias=True)
    result = _check([a, b], torch.randn(8, 20), monkeypatch)
    assert result.info["sweeps"][0] >= 4
    assert result.info["solves"][0] < result.info["sweeps"][0] * 4  # spaces whose cost did not change are skipped
