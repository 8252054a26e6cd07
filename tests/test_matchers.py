"""The matchers of the heterogeneous-merging paper and its baselines: permutations recovered exactly, zipping
identical models, elastic zipping of a model and its function-preserving widened copy, the greedy zip's budget,
and depth and width heterogeneity together."""

import pytest
import torch
from torch import nn

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe, permuted_copy
from hetfuse.match import greedy_zip
from hetfuse.models import MLP, build_model
from models_zoo_for_tests import UserResNet, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(kind):
    if kind == "mlp":
        torch.manual_seed(0)
        model, x = MLP(12, [16, 12, 8], 4).eval(), torch.randn(64, 12)
    else:
        x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        model = make("resnet-projection", 0, x)
    twin, perms = permuted_copy(model, describe(model, example=x[:2]), seed=7)
    return model, twin, perms, x


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("match", ["perm-acts", "perm-weights"])
def test_permutation_matchers_recover_a_planted_permutation_exactly(match, kind):
    model, twin, perms, x = _planted(kind)
    prep = prepare_fusion([twin, model], x, FusionConfig(target=1, match=match, samples=16, repair="none"))
    for s, perm in enumerate(perms):
        # twin's neuron j is the model's neuron perm[j]: the map must send it there
        expected = torch.zeros(len(perm), len(perm), dtype=torch.float64)
        expected[torch.arange(len(perm)), perm] = 1.0
        assert torch.equal(prep.match.maps[0][s].out, expected), (match, s)


def test_zip_of_two_identical_models_with_alpha_and_beta_one_gives_back_the_model():
    torch.manual_seed(0)
    a = MLP(12, [10, 8], 4).eval()
    x = torch.randn(80, 12)
    res = fuse([a, a], x, match="zip", alpha=1.0, beta=1.0, samples=64, repair="none")
    torch.testing.assert_close(res.model(x), a(x))
    assert all(m["within_model_merges"] == [0, 0] for m in res.report["match_info"]["merges"])


def _widened(narrow: MLP) -> MLP:
    """Every hidden neuron duplicated; consuming weights halved: the same function, twice the widths."""
    lins = narrow.linears()
    wide = MLP(narrow.input_dim, [2 * h for h in narrow.hidden], narrow.output_dim, bias=True)
    with torch.no_grad():
        for k, (src, dst) in enumerate(zip(lins, wide.linears(), strict=False)):
            w = src.weight
            if k > 0:  # consumes a duplicated layer: both copies of each column, halved
                w = torch.cat([w, w], dim=1) / 2
            if k < len(lins) - 1:  # produces a duplicated layer
                dst.weight.copy_(torch.cat([w, w], dim=0))
                dst.bias.copy_(torch.cat([src.bias, src.bias]))
            else:
                dst.weight.copy_(w)
                dst.bias.copy_(src.bias)
    return wide.eval()


def test_elastic_zip_of_a_model_and_its_widened_copy_computes_the_narrow_model():
    torch.manual_seed(0)
    narrow = MLP(12, [6, 5], 4).eval()
    wide = _widened(narrow)
    x = torch.randn(100, 12)
    torch.testing.assert_close(wide(x), narrow(x))
    res = fuse([narrow, wide], x, match="elastic-zip", width="min", alpha=1.0, beta=1.0, samples=80, repair="none")
    assert describe(res.model).widths == [6, 5]
    torch.testing.assert_close(res.model(x), narrow(x), rtol=1e-4, atol=1e-4)
    # the default width is the widest model's
    res = fuse([narrow, wide], x, match="elastic-zip", alpha=1.0, beta=1.0, samples=80, repair="none")
    assert describe(res.model).widths == [12, 10]


def test_greedy_zip_respects_the_budgets_and_the_count():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 10, generator=g)
    corr = torch.corrcoef(feats.T).double()
    origin = torch.tensor([0] * 5 + [1] * 5)
    for beta in (0.0, 0.5, 1.0):
        labels, info = greedy_zip(corr, origin, 5, alpha=0.5, beta=beta)
        assert sorted(torch.unique(labels).tolist()) == list(range(5))
        budget = int(5 * beta * 0.5 + 1e-4)  # β × merges × the model's share of the features
        assert info["budget"] == [budget, budget] and info["forced"] == 0
        assert all(w <= budget for w in info["within"])
    # features that are exact copies of each other across the models are zipped together first
    corr = torch.corrcoef(torch.cat([feats[:, :5], feats[:, :5]], dim=1).T).double()
    labels, _ = greedy_zip(corr, origin, 5, alpha=1.0, beta=1.0)
    assert torch.equal(labels[:5], labels[5:])


def test_zip_refuses_different_widths_and_elastic_zip_checks_its_width_list():
    torch.manual_seed(0)
    a, b = MLP(6, [4, 3], 2), MLP(6, [8, 6], 2)
    x = torch.randn(40, 6)
    with pytest.raises(HetfuseError, match="elastic-zip"):
        fuse([a, b], x, match="zip", samples=32)
    with pytest.raises(HetfuseError, match="2 neuron spaces"):
        fuse([a, b], x, match="elastic-zip", width=[5], samples=32)
    res = fuse([a, b], x, match="elastic-zip", width=[5, 4], samples=32)
    assert describe(res.model).widths == [5, 4]
    with pytest.raises(HetfuseError, match="alpha"):
        FusionConfig(match="zip", alpha=0.0)


def test_depth_and_width_heterogeneity_together():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    shallow = build_model("resnet20:w=0.25", input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
    deep = build_model("resnet26:w=0.5", input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
    res = fuse([shallow, deep], x, depth_align="lma", match="elastic-zip", samples=12)
    assert res.report["methods"]["similarity"] == "cka"
    assert describe(res.model).widths == describe(deep).widths
    assert res.model(x).shape == (16, 10) and bool(torch.isfinite(res.model(x)).all())
    # a user's ResNet of another depth and width as well
    a, b = UserResNet((1, 2), width=8), UserResNet((2, 3), width=12)
    res = fuse([a, b], x, depth_align="sma", match="elastic-zip", width="min", samples=12)
    assert res.model(x).shape == (16, 10)
    assert isinstance(res.model, nn.Module)


def test_partial_zip_gives_a_multi_head_network_whose_heads_are_the_models(tmp_path):
    from hetfuse import load_model, save_model
    from hetfuse.multihead import MultiHead
    from hetfuse.train import accuracy

    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = make("resnet-projection", 0, x)
    twin = permuted_copy(model, describe(model, example=x[:2]), seed=4)[0]
    res = fuse([model, twin], x, match="zip", zip_until=2, samples=16, repair="none")
    assert isinstance(res.model, MultiHead) and len(res.model.heads) == 2
    out = res.model(x)
    assert out.shape == (20, 2, 10)
    with torch.no_grad():  # the trunk zipped exact copies: every head computes the model
        torch.testing.assert_close(out[:, 0], model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[:, 1], model(x), rtol=1e-4, atol=1e-4)
    path = save_model(res.model, tmp_path / "multi.safetensors")
    torch.testing.assert_close(load_model(path, base=type(model)())(x), out)
    y = torch.randint(0, 10, (20,))
    assert accuracy(res.model, x, y) == accuracy(model, x, y)  # heads' softmax averaged
    with pytest.raises(HetfuseError, match="depth units"):
        fuse([model, twin], x, match="zip", zip_until=50, samples=16)
