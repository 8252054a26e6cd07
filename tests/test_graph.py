import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetfuse.errors import UnsupportedModelError
from hetfuse.graph import (NetworkGraph, check_permutation_invariance, describe, layer_activations,
                           permute_state, permuted_copy)
from hetfuse.models import MLP


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=1, max_size=5), bias=st.lists(st.booleans(), min_size=6, max_size=6),
       seed=st.integers(0, 10_000))
def test_random_permutation_of_every_space_leaves_mlp_outputs_unchanged(widths, bias, seed):
    torch.manual_seed(seed)
    model = MLP(7, widths, 3, bias=bias[: len(widths) + 1])
    g = describe(model)
    assert g.widths == widths and g.chain and g.input_dim == 7 and g.output_dim == 3
    x = torch.randn(32, 7)
    check_permutation_invariance(model, g, x, seed=seed)
    clone, perms = permuted_copy(model, g, seed=seed)
    # the permutation really moved weights whenever some space has more than one neuron
    if any(len(p) > 1 and not torch.equal(p, torch.arange(len(p))) for p in perms):
        assert any(not torch.equal(a, b)
                   for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=False))


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 6)
        self.fc2 = nn.Linear(6, 5, bias=False)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.drop(torch.relu(self.fc2(x)).view(x.shape[0], -1))
        return self.head(x)


def test_hand_written_module_and_sequential_with_inplace_relu():
    for model in (HandWritten(), nn.Sequential(nn.Flatten(), nn.Linear(10, 8), nn.ReLU(inplace=True),
                                               nn.Linear(8, 4))):
        g = describe(model)
        assert g.input_dim == 10 and g.output_dim == 4
        check_permutation_invariance(model, g, torch.randn(16, 2, 5))


def test_self_check_detects_an_incomplete_description():
    torch.manual_seed(0)
    model = MLP(5, [6, 4], 2)
    g = describe(model)
    broken = NetworkGraph(spaces=[type(s)(s.name, s.size, s.kind, s.producers, s.act_module,
                                          [m for m in s.members if m.role == "out"]) for s in g.spaces],
                          input_dim=g.input_dim, output_dim=g.output_dim, chain=g.chain,
                          layer_modules=g.layer_modules)
    with pytest.raises(AssertionError):
        check_permutation_invariance(model, broken, torch.randn(20, 5), seed=1)


def test_permute_state_moves_rows_and_columns():
    model = MLP(3, [4], 2, bias=True)
    g = describe(model)
    perm = torch.tensor([2, 0, 3, 1])
    st_ = permute_state(model.state_dict(), g.spaces[0], perm)
    assert torch.equal(st_["layers.1.weight"], model.layers[1].weight[perm])
    assert torch.equal(st_["layers.1.bias"], model.layers[1].bias[perm])
    assert torch.equal(st_["layers.3.weight"], model.layers[3].weight[:, perm])


class WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.sm, self.b = nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.sm(self.a(x)))


class WithCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cat([h, h], dim=1))


class WithControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


@pytest.mark.parametrize("model, words", [(WithSoftmax(), ["sm", "Softmax"]), (WithCat(), ["cat"]),
                                          (WithControlFlow(), ["trace"])])
def test_unsupported_ops_are_named(model, words):
    with pytest.raises(UnsupportedModelError) as info:
        describe(model)
    for w in words:
        assert w in str(info.value)


def test_activations_are_pre_activations_even_with_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    g = describe(model)
    x = torch.randn(50, 4)
    (acts,) = layer_activations(model, g, x)
    assert acts.dtype == torch.float64 and acts.shape == (50, 16)
    assert (acts < 0).any()
    assert torch.allclose(acts, (x @ model[0].weight.T + model[0].bias).double(), atol=1e-5)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _ZeroPadBlock(nn.Module):
    """The option-A shortcut of a popular CIFAR ResNet file: subsample by a step, pad channels with zeros."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, 2, 1)
        self.shortcut = _Lambda(lambda x: torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


class _ZeroPadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer2 = nn.Sequential(_ZeroPadBlock())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.layer2(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _SplitsChannels(nn.Module):
    """ShuffleNetV2-style: a Python int made from a traced size."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        c = int(h.size(1) * 0.5)
        return self.b(h[:, :c])


def test_refusals_name_the_module_path_and_the_cause():
    with pytest.raises(UnsupportedModelError) as info:
        describe(_ZeroPadNet())
    msg = str(info.value)
    assert "layer2.0.shortcut (_Lambda)" in msg and "a step over rows" in msg and "\n" not in msg
    with pytest.raises(UnsupportedModelError) as info:
        describe(_SplitsChannels())
    msg = str(info.value)
    assert "Python number" in msg and "int(x.size(1) * ratio)" in msg and "control flow" not in msg
    assert "test_graph.py" in msg  # where in the user's code


def test_grouped_convolutions_are_refused_precisely_and_depthwise_ones_described():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.g(self.c(x)), 1), 1))

    with pytest.raises(UnsupportedModelError, match=r"g \(Conv2d\): grouped convolution 'g' \(groups=4, 8 -> 8"):
        describe(Grouped())
    model = Grouped()
    model.g = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    g = describe(model)
    assert [s.name for s in g.spaces] == ["c"]
    names = {m.name for m in g.spaces[0].members}
    assert {"g.weight", "g.bias", "c.weight", "fc.weight"} <= names
    assert [m.kind for m in g.modules] == ["conv", "depthwise", "linear"]
