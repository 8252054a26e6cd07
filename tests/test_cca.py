"""CCA Merge (match="cca"): a planted rotation of a hidden space is undone exactly, a permuted copy's CCA map is the
permutation, singular covariances (dead neurons) still give a permuted copy back, different widths and three models
work, attention heads and depthwise channels are permuted."""

import pytest
import torch
from torch import nn

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe, permuted_copy
from hetfuse.match.cca import cca_maps
from hetfuse.match.heads import keeps_heads
from hetfuse.models import MLP
from models_zoo_for_tests import inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_hidden(dtype=torch.float64, seed=0):
    """Input -> 6 neurons -> (no nonlinearity) -> 8 neurons -> ReLU -> 3 outputs: space 0 is linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype).eval()


def _rotated(model, rot, perm=None):
    """The same function: space 0 rotated by ``rot`` (rows of the producer and its bias by R, the consumer's columns
    by Rᵀ), space 1 optionally permuted (new neuron j = old neuron perm[j])."""
    twin = _linear_hidden(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    rot = rot.to(twin[0].weight.dtype)
    with torch.no_grad():
        twin[0].weight.copy_(rot @ model[0].weight)
        twin[0].bias.copy_(rot @ model[0].bias)
        twin[1].weight.copy_(model[1].weight @ rot.T)
        if perm is not None:
            twin[1].weight.copy_(twin[1].weight[perm])
            twin[1].bias.copy_(model[1].bias[perm])
            twin[3].weight.copy_(model[3].weight[:, perm])
    return twin


def _rotation(n, seed):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cca_undoes_a_planted_rotation_of_a_linear_hidden_space(dtype, tol):
    a = _linear_hidden(dtype)
    rot = _rotation(6, 1)
    b = _rotated(a, rot)
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    x_test = torch.randn(50, 10, generator=torch.Generator().manual_seed(3)).to(dtype) * 3
    with torch.no_grad():
        torch.testing.assert_close(b(x_test), a(x_test), rtol=tol, atol=tol)  # the same function
        assert (b[0].weight - a[0].weight).abs().max() > 0.1  # in another basis
    prep = prepare_fusion([a, b], x, FusionConfig(match="cca", repair="none", samples=200, target=0))
    assert prep.match.linear
    assert prep.report["solvers"][1][0] == "cca"
    sm = prep.match.maps[1][0]  # b's neuron j = Σ_k R[j, k] a_k, so fused neuron k = Σ_j R[j, k] b_j = a_k
    torch.testing.assert_close(sm.out, rot, rtol=0, atol=100 * tol)
    torch.testing.assert_close(sm.inn, rot, rtol=0, atol=100 * tol)
    for w in ([0.5, 0.5], [1.0, 0.0], [0.0, 1.0]):
        fused = prep.combine(w)
        with torch.no_grad():
            torch.testing.assert_close(fused(x_test), a(x_test), rtol=tol, atol=tol)
            # in the target's basis: the first layer is a's whatever the weights
            torch.testing.assert_close(fused[0].weight, a[0].weight, rtol=tol, atol=tol)
    # the other way round (b the target): a's map is Rᵀ
    prep = prepare_fusion([a, b], x, FusionConfig(match="cca", repair="none", samples=200, target=1))
    torch.testing.assert_close(prep.match.maps[0][0].out, rot.T, rtol=0, atol=100 * tol)
    res = fuse([a, b], x, match="cca", repair="none", samples=200, target=1)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x_test), a(x_test), rtol=tol, atol=tol)
        torch.testing.assert_close(res.model[0].weight, b[0].weight, rtol=tol, atol=tol)


def test_the_cca_map_of_a_permuted_copy_is_the_permutation_and_inn_undoes_out():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g,
                                                                                 dtype=torch.float64)
    perm = torch.randperm(8, generator=g)
    b, a = feats, feats[:, perm]  # a_j = b_perm[j]
    cov = torch.cov(torch.cat([a, b], 1).T)
    for reg in (1e-6, 1e-4, 1e-1):  # the ridge commutes with the permutation: exact for any reg
        out, inn, rho = cca_maps(cov[:8, :8], cov[8:, 8:], cov[:8, 8:], reg)
        expected = torch.zeros(8, 8, dtype=torch.float64)
        expected[torch.arange(8), perm] = 1.0
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(inn, expected, rtol=0, atol=1e-9)
        assert bool((rho <= 1 + 1e-12).all()) and (reg > 1e-6 or float(rho.min()) > 0.99)  # ρ = λ/(λ + ridge)
    # different widths: a narrower network's neurons are seen again exactly by the next layer (inn outᵀ = I)
    narrow = feats[:, :5] @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        2000, 5, generator=g, dtype=torch.float64)
    cov = torch.cov(torch.cat([narrow, feats], 1).T)
    out, inn, _ = cca_maps(cov[:5, :5], cov[5:, 5:], cov[:5, 5:], 1e-4)
    assert out.shape == inn.shape == (5, 8)
    torch.testing.assert_close(inn @ out.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-9)
    # square: inn is pinv(out)ᵀ
    cov = torch.cov(torch.cat([narrow @ torch.randn(5, 8, generator=g, dtype=torch.float64) + 0.1 * feats, feats],
                              1).T)
    out, inn, _ = cca_maps(cov[:8, :8], cov[8:, 8:], cov[:8, 8:], 1e-4)
    torch.testing.assert_close(inn, torch.linalg.pinv(out).T, rtol=1e-6, atol=1e-8)


def test_a_permuted_copy_comes_back_where_the_covariances_are_singular():
    """Dead neurons (read after the ReLU) and a first layer wider than the input: singular covariances, on whose
    null directions CCA leaves the map open; the permuted copy is still given back exactly."""
    torch.manual_seed(0)
    model = MLP(3, [16, 12], 4).eval()
    with torch.no_grad():
        model.linears()[0].bias[:5] = -50.0  # dead on every input used here
    x = torch.randn(64, 3)
    x_test = torch.randn(32, 3, generator=torch.Generator().manual_seed(5))
    twin = permuted_copy(model, describe(model, example=x[:2]), seed=2)[0]
    for features in ("pre", "post"):
        res = fuse([twin, model], x, match="cca", features=features, repair="none", samples=48)
        with torch.no_grad():
            torch.testing.assert_close(res.model(x_test), model(x_test), rtol=1e-5, atol=1e-5)
        assert res.report["solvers"][1] == ["cca (snapped to a permutation)"] * 2


def test_cca_fuses_networks_of_different_widths():
    torch.manual_seed(0)
    a, b = MLP(20, [16, 10], 4).eval(), MLP(20, [24, 14], 4).eval()  # a's covariances are of full rank
    x = torch.randn(200, 20)
    for target, fused_widths in ((0, [16, 10]), (1, [24, 14])):
        prep = prepare_fusion([a, b], x, FusionConfig(match="cca", samples=150, target=target))
        assert prep.match.widths == fused_widths
        other = 1 - target
        for s, sp in enumerate(describe([a, b][other]).spaces):
            sm = prep.match.maps[other][s]
            assert sm.out.shape == sm.inn.shape == (sp.size, fused_widths[s])
            assert prep.report["solvers"][other][s] == "cca"
            if sp.size < fused_widths[s]:  # the narrower network's neurons are read back exactly
                torch.testing.assert_close(sm.inn @ sm.out.T, torch.eye(sp.size, dtype=torch.float64),
                                           rtol=0, atol=1e-8)
        model = prep.combine()
        assert describe(model).widths == fused_widths
        with torch.no_grad():
            y = model(x[:20])
        assert y.shape == (20, 4) and bool(torch.isfinite(y).all())


def test_cca_with_three_models_maps_each_onto_the_target():
    a = _linear_hidden()
    b = _rotated(a, _rotation(6, 1), perm=torch.randperm(8, generator=torch.Generator().manual_seed(0)))
    c = _rotated(a, _rotation(6, 2))
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = fuse([a, b, c], x, match="cca", repair="none", samples=200, target=0, weights=[0.2, 0.3, 0.5])
    assert res.report["solvers"] == [["identity"] * 2, ["cca", "cca (snapped to a permutation)"],
                                     ["cca", "cca (snapped to a permutation)"]]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x[:50] * 3), a(x[:50] * 3), rtol=1e-9, atol=1e-9)
    # three different networks: it runs, every map has the declared shape
    torch.manual_seed(0)
    nets = [MLP(12, [10, 8], 4).eval() for _ in range(3)]
    x = torch.randn(120, 12)
    prep = prepare_fusion(nets, x, FusionConfig(match="cca", samples=100))
    assert len(prep.match.maps) == 3
    for i in range(3):
        for sm, n in zip(prep.match.maps[i], [10, 8], strict=True):
            assert sm.out.shape == sm.inn.shape == (n, n)
    with torch.no_grad():
        assert bool(torch.isfinite(prep.combine()(x)).all())


@pytest.mark.parametrize("kind", ["vit-hand", "mobilenet-depthwise"])
def test_attention_heads_and_depthwise_channels_are_permuted(kind):
    data = inputs(kind, 32, 1)
    a, b = make(kind, 0, data), make(kind, 1, data)
    prep = prepare_fusion([a, b], data, FusionConfig(match="cca", samples=24, repair="none"))
    graph = prep.balanced_graphs[0]
    heads = {s: att.heads for att in graph.attention for s in (att.qk, att.v)}
    depthwise = {m.in_space for m in graph.modules if m.kind == "depthwise"}
    assert heads or depthwise
    for s, (sm, solver) in enumerate(zip(prep.match.maps[1], prep.report["solvers"][1], strict=True)):
        if s in heads:
            assert solver == "permutation (heads as units)" and keeps_heads(sm.out, heads[s])
        elif s in depthwise:
            assert solver == "permutation (depthwise convolution)"
        else:
            assert solver == "cca"
            continue
        assert torch.equal(sm.out, sm.inn) and bool((sm.out.sum(0) == 1).all()) and bool((sm.out.sum(1) == 1).all())


def test_cca_refuses_a_non_positive_ridge():
    with pytest.raises(HetfuseError, match="reg"):
        FusionConfig(match="cca", reg=0.0)
