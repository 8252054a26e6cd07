"""One-hot maps held as indices (the scale issue's §1): the gather equals the dense contraction it replaces, the
permutation matchers never form dense maps, and fusion never writes into the input networks (whose parameters
the pipeline's working copies share)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse import fuse, prepare_fusion
from hetfuse.combine import apply_maps
from hetfuse.graph.spec import Gather, ParamAxis, transform_axis
from hetfuse.match.base import MatchResult, SpaceMap
from models_zoo_for_tests import inputs, make


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), extra=st.integers(0, 4), block=st.integers(1, 3), role=st.sampled_from(["out", "in"]),
       axis=st.integers(0, 1), packed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_a_gather_equals_the_dense_map(n, extra, block, role, axis, packed, seed):
    g = torch.Generator().manual_seed(seed)
    r = n + extra
    cols = torch.randperm(r, generator=g)[:n]  # neuron j -> fused neuron cols[j], some fused neurons left empty
    sm = SpaceMap.from_cols(cols, r)
    blk = block if role == "in" else 1
    pad = 2 if packed else 0
    shape = [0, 3]
    shape[axis] = n * blk + 2 * pad
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    ax = ParamAxis("w", axis, role, block, pad if packed else None)
    got = transform_axis(t, ax, sm.gather())
    want = transform_axis(t, ax, sm.out)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sm.gather().dense().equal(sm.out) and sm.inn.equal(sm.out)
    v = torch.randn(n, dtype=torch.float64, generator=g)
    torch.testing.assert_close(sm.pull(v), sm.out.T @ v)


def test_space_map_checks_its_indices():
    with pytest.raises(ValueError):
        SpaceMap.from_cols([0, 0, 1])  # two neurons into one fused neuron: not one-hot
    with pytest.raises(ValueError):
        SpaceMap.from_cols([0, 3], width=3)
    assert SpaceMap.identity(4).gather().source.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["mlp", "resnet-projection", "vit-zoo"])
@pytest.mark.parametrize("budget", [1.0, 1.5])
def test_permutation_maps_are_indices_and_apply_like_dense_ones(kind, budget):
    data = inputs(kind, 64, 0)
    a, b = make(kind, 0, data), make(kind, 1, data)
    prep = prepare_fusion([a, b], data, _config(match="perm-acts", budget=budget))
    maps = prep.match.maps
    assert all(sm.one_hot for row in maps for sm in row)
    dense = MatchResult(prep.match.widths, [[SpaceMap(sm.out, sm.inn) for sm in row] for row in maps])
    states = [m.state_dict() for m in prep.balanced]
    ref = apply_maps(states, prep.balanced_graphs, prep.aligned.slots, dense, prep.target_index)
    for got_i, ref_i in zip(prep.aligned.tensors, ref.tensors, strict=True):
        for got, want in zip(got_i, ref_i, strict=True):
            torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-6, atol=1e-7)


def _config(**kw):
    from hetfuse import FusionConfig

    return FusionConfig(samples=64, repair_samples=64, **kw)


@pytest.mark.parametrize("kind,match,repair", [("mlp", "perm-acts", "repair"), ("resnet-projection", "perm-acts",
                                                                                    "auto"),
                                               ("mlp-bn1d", "zip", "lsq"), ("vit-zoo", "perm-acts", "auto")])
def test_fusion_never_writes_into_the_input_networks(kind, match, repair):
    data = inputs(kind, 64, 0)
    models = [make(kind, 0, data), make(kind, 1, data)]
    models[1].train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    fused = fuse(models, data, match=match, repair=repair, samples=64)
    fused.model.eval()
    with torch.no_grad():  # a fused network running (and repaired, BN-reset) does not reach the inputs either
        fused.model(data[:8])
    for m, ref in zip(models, before, strict=True):
        for k, v in m.state_dict().items():
            assert v.equal(ref[k]), f"{kind}: input tensor {k} changed"
    assert models[1].training and not models[0].training
    shared = {id(p) for m in models for p in m.parameters()}
    assert not any(id(p) in shared for p in fused.model.parameters())


def test_a_gather_with_empty_fused_neurons_gives_zeros():
    t = torch.arange(6.0).reshape(3, 2)
    g = Gather(torch.tensor([2, -1, 0]), 3)
    out = transform_axis(t, ParamAxis("w", 0, "out"), g)
    assert out.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]
