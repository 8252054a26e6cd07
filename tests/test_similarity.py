"""Layer representations, cost matrices and the neuron Wasserstein distance."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse.errors import HetfuseError
from hetfuse.similarity import (
    REPRESENTATIONS,
    LayerRep,
    layer_cost_matrix,
    linear_cka,
    neuron_wasserstein,
    rbf_cka,
)

T = 16


def _layers(widths, seed, fan_in=5, t=T):
    rng = np.random.default_rng(seed)
    return [
        LayerRep(
            width=w,
            acts=torch.tensor(rng.standard_normal((t, w))),
            weight=torch.tensor(rng.standard_normal((w, fan_in)), dtype=torch.float32),
        )
        for w in widths
    ]


@pytest.mark.parametrize("rep", REPRESENTATIONS)
def test_shapes_and_dtype(rep):
    deep, shallow = _layers([5, 4, 3, 2], 0), _layers([3, 2, 1], 1)
    c = layer_cost_matrix(deep, shallow, rep)
    assert c.shape == (4, 3)
    assert c.dtype == torch.float64
    assert bool(torch.isfinite(c).all()) and bool((c >= 0).all())


def test_neurons_figure2():
    deep = [LayerRep(w) for w in (5, 4, 3, 1)]
    shallow = [LayerRep(w) for w in (3, 2, 1)]
    c = layer_cost_matrix(deep, shallow, "neurons")
    expected = np.array([[4, 9, 16], [1, 4, 9], [0, 1, 4], [4, 1, 0]], dtype=float)
    np.testing.assert_array_equal(c, expected)


def test_activation_costs_match_functions():
    deep, shallow = _layers([4, 3], 2), _layers([2, 5], 3)
    c = layer_cost_matrix(deep, shallow, "cka")
    c_rbf = layer_cost_matrix(deep, shallow, "cka-rbf")
    c_w = layer_cost_matrix(deep, shallow, "wasserstein")
    for i, d in enumerate(deep):
        for j, s in enumerate(shallow):
            assert c[i, j] == pytest.approx(1 - linear_cka(d.acts, s.acts))
            assert c_rbf[i, j] == pytest.approx(1 - rbf_cka(d.acts, s.acts))
            assert c_w[i, j] == pytest.approx(neuron_wasserstein(d.acts, s.acts))


def test_identical_layers_have_zero_cost():
    layers = _layers([3, 4], 4)
    for rep in REPRESENTATIONS:
        c = layer_cost_matrix(layers, layers, rep)
        np.testing.assert_allclose(np.diag(c), 0.0, atol=1e-6)
        assert c[0, 1] > 1e-6  # different layers are distinguishable


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 8), p=st.integers(1, 6))
def test_wasserstein_zero_for_identical_and_permuted(seed, t, p):
    x = np.random.default_rng(seed).standard_normal((t, p))
    perm = np.random.default_rng(seed + 1).permutation(p)
    assert neuron_wasserstein(x, x) == pytest.approx(0.0, abs=1e-6)
    assert neuron_wasserstein(x, x[:, perm]) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 8), p=st.integers(1, 6), q=st.integers(1, 6))
def test_wasserstein_symmetric_nonnegative(seed, t, p, q):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((t, p)), rng.standard_normal((t, q))
    d = neuron_wasserstein(x, y)
    assert d >= 0
    assert d == pytest.approx(neuron_wasserstein(y, x), rel=1e-9, abs=1e-12)


def test_wasserstein_hand_checked():
    # single points: distance between the two columns
    assert neuron_wasserstein([[0.0], [0.0]], [[3.0], [4.0]]) == pytest.approx(5.0)
    # two points at 0 and 2 (in R^1) vs one point at 1: each moves 1
    assert neuron_wasserstein([[0.0, 2.0]], [[1.0]]) == pytest.approx(1.0)
    # shift of every neuron by c in R^t gives distance ||c||
    x = np.random.default_rng(0).standard_normal((3, 4))
    c = np.array([[1.0], [2.0], [2.0]])
    assert neuron_wasserstein(x, x + c) == pytest.approx(3.0, rel=1e-6)


def test_wasserstein_errors():
    with pytest.raises(HetfuseError):
        neuron_wasserstein(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(HetfuseError):
        neuron_wasserstein(np.array([[np.nan]]), np.zeros((1, 1)))
    with pytest.raises(HetfuseError):
        neuron_wasserstein(np.zeros(3), np.zeros((3, 1)))


def test_weights_cost_invariant_to_row_and_column_permutations():
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((6, 4)), rng.standard_normal((3, 7))
    base = float(layer_cost_matrix([LayerRep(6, weight=w1)], [LayerRep(3, weight=w2)], "weights")[0, 0])
    assert 0 < base <= 1
    p1, p2 = rng.permutation(6), rng.permutation(3)
    c = layer_cost_matrix(
        [LayerRep(6, weight=torch.tensor(w1[p1]))], [LayerRep(3, weight=w2[p2][:, ::-1].copy())], "weights"
    )[0, 0]
    assert float(c) == pytest.approx(base, abs=1e-12)
    # scale invariant (cosine), and same spectrum -> zero
    c2 = layer_cost_matrix([LayerRep(6, weight=3 * w1)], [LayerRep(6, weight=w1[p1])], "weights")[0, 0]
    assert float(c2) == pytest.approx(0.0, abs=1e-12)


def test_weights_conv_kernels_flattened():
    k = torch.randn(4, 3, 3, 3)
    c = layer_cost_matrix([LayerRep(4, weight=k)], [LayerRep(4, weight=k.reshape(4, -1))], "weights")
    assert c[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_errors():
    plain = [LayerRep(3)]
    with pytest.raises(HetfuseError, match="neurons"):
        layer_cost_matrix(plain, plain, "bogus")
    for rep in ("cka", "cka-rbf", "wasserstein"):
        with pytest.raises(HetfuseError, match="acts"):
            layer_cost_matrix(plain, plain, rep)
    with pytest.raises(HetfuseError, match="weight"):
        layer_cost_matrix(plain, plain, "weights")
    with pytest.raises(HetfuseError, match="samples"):
        layer_cost_matrix(_layers([3], 0, t=10), _layers([3], 1, t=11), "cka")
    with pytest.raises(HetfuseError, match="width"):
        layer_cost_matrix([LayerRep(3, acts=torch.zeros(5, 4))], [LayerRep(4, acts=torch.zeros(5, 4))], "cka")
    with pytest.raises(HetfuseError):
        LayerRep(0)
    with pytest.raises(HetfuseError):
        layer_cost_matrix([object()], plain, "neurons")


def test_empty_lists():
    assert layer_cost_matrix([], [LayerRep(2)], "neurons").shape == (0, 1)
