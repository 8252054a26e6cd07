import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfuse.align import all_alignments
from hetfuse.balance import rebalance, relu_sign_estimate
from hetfuse.graph import describe
from hetfuse.models import MLP


def add_identity_layers(model, a, m):
    return rebalance(model, [a], [m], method="add")


def merge_layers(deep, a, x, sign="sum"):
    return rebalance(deep, [a], [len(describe(deep).spaces)], method="merge", x=x, merge_sign=sign)


@st.composite
def shallow_and_alignment(draw):
    n = draw(st.integers(1, 4))
    m = draw(st.integers(n, 6))
    widths = draw(st.lists(st.integers(1, 8), min_size=n, max_size=n))
    maps = all_alignments(m, n, fix_first=True, fix_last=False)
    a = draw(st.sampled_from(maps))
    return widths, a, m, draw(st.booleans()), draw(st.integers(0, 10_000))


@settings(max_examples=60, deadline=None)
@given(case=shallow_and_alignment())
def test_adding_layers_leaves_the_function_unchanged(case):
    widths, a, m, bias, seed = case
    torch.manual_seed(seed)
    model = MLP(5, widths, 3, bias=bias)
    deeper = add_identity_layers(model, a, m)
    assert describe(deeper).depth == m
    x = torch.randn(64, 5) * 3  # inputs with negative values
    assert (x < 0).any()
    torch.testing.assert_close(deeper(x), model(x), rtol=0, atol=1e-6)
    # the shallow layers land where the alignment says: deep layer a[j] has shallow layer j's width
    assert [describe(deeper).widths[i] for i in a] == widths


def test_identity_layer_before_the_first_hidden_layer_is_not_exact_and_warns():
    torch.manual_seed(0)
    model = MLP(5, [6, 4], 3)
    with pytest.warns(UserWarning, match="negative"):
        deeper = add_identity_layers(model, [1, 2], 3)
    x = torch.randn(64, 5)
    assert not torch.allclose(deeper(x), model(x), atol=1e-4)
    assert torch.allclose(deeper(x.abs()), model(x.abs()), atol=1e-6)


def _constant_sign_deep(seed, widths, bias):
    """A deep MLP whose hidden pre-activations have a constant sign per neuron on non-negative inputs."""
    g = torch.Generator().manual_seed(seed)
    model = MLP(4, widths, 3, bias=bias)
    with torch.no_grad():
        for _i, lin in enumerate(model.linears()[:-1]):
            sign = torch.where(torch.rand(lin.out_features, 1, generator=g) < 0.7, 1.0, -1.0)
            lin.weight.copy_(sign * torch.rand(lin.weight.shape, generator=g))  # rows all >= 0 or all <= 0
            if lin.bias is not None:
                lin.bias.copy_(sign[:, 0] * torch.rand(lin.out_features, generator=g))
        return model


@settings(max_examples=50, deadline=None)
@given(m=st.integers(2, 5), seed=st.integers(0, 10_000), bias=st.booleans(), data=st.data())
def test_merging_is_exact_when_the_sign_pattern_is_constant(m, seed, bias, data):
    widths = data.draw(st.lists(st.integers(1, 6), min_size=m, max_size=m))
    n = data.draw(st.integers(1, m - 1))
    a = data.draw(st.sampled_from(all_alignments(m, n, fix_first=False, fix_last=False)))
    deep = _constant_sign_deep(seed, widths, bias)
    x = torch.rand(80, 4)  # non-negative inputs keep every pre-activation's sign fixed
    for sign in ("sum", "majority"):
        merged = merge_layers(deep, a, x, sign=sign)
        assert describe(merged).widths == [widths[i] for i in a]
        torch.testing.assert_close(merged(x), deep(x), rtol=1e-5, atol=1e-5)


def test_merging_is_not_exact_in_general():
    torch.manual_seed(0)
    deep = MLP(6, [32, 32, 32], 4)
    x = torch.randn(200, 6)
    merged = merge_layers(deep, [0, 2], x)
    assert not torch.allclose(merged(x), deep(x), atol=1e-3)


def test_sign_estimates():
    z = torch.tensor([[5.0, 1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -3.0, 2.0]], dtype=torch.float64)
    assert relu_sign_estimate(z, "sum").tolist() == [1.0, 0.0, 0.0]
    assert relu_sign_estimate(z, "majority").tolist() == [0.0, 1.0, 0.0]
