import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.errors import DataError, HetfuseError
from hetfuse.graph import describe, layer_activations, permuted_copy
from hetfuse.models import MLP


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(2, 10), min_size=1, max_size=4), bias=st.booleans(), seed=st.integers(0, 1000),
       match=st.sampled_from(["ot-acts", "ot-weights"]), repair=st.booleans())
def test_fusing_a_model_with_a_permuted_copy_gives_back_the_model(widths, bias, seed, match, repair):
    torch.manual_seed(seed)
    model = MLP(6, widths, 3, bias=bias).eval()
    twin, _ = permuted_copy(model, describe(model), seed=seed + 1)
    x = torch.randn(400, 6)
    res = fuse([twin, model], x, weights=[0.5, 0.5], match=match, repair=repair, samples=100, seed=seed)
    assert close(res.model(x), model(x))
    assert all(s in ("lap", "identity") for per in res.report["solvers"] for s in per)


def test_three_permuted_copies():
    torch.manual_seed(0)
    model = MLP(6, [12, 8], 3).eval()
    g = describe(model)
    copies = [permuted_copy(model, g, seed=s)[0] for s in (1, 2)]
    x = torch.randn(400, 6)
    res = fuse([copies[0], model, copies[1]], x, weights=[0.2, 0.3, 0.5], target=1)
    assert close(res.model(x), model(x))


@pytest.mark.parametrize("balance", ["add", "merge"])
def test_weights_one_zero_give_back_the_first_parent_of_equal_widths_across_depths(balance):
    torch.manual_seed(0)
    shallow = MLP(6, [10, 8], 3, bias=True).eval()
    deep = MLP(6, [10, 10, 8], 3, bias=True).eval()  # CLA [0, 2]: the identity layer meets a 10-wide layer
    x = torch.randn(400, 6)
    # (1, 0): the shallow parent (the target) exactly, through added identity layers or merged deep layers
    res = fuse([shallow, deep], x, weights=[1.0, 0.0], balance=balance, repair=False)
    assert close(res.model(x), shallow(x))
    if balance == "add":
        # (0, 1): the deep parent, aligned into the target's widths (equal widths: permutations, exact)
        res = fuse([shallow, deep], x, weights=[0.0, 1.0], balance=balance, repair=False)
        assert res.report["mappings"][0]["alignment"] == [0, 2]
        assert close(res.model(x), deep(x))
        assert describe(res.model).depth == 3


def test_weight_belongs_to_the_model_it_is_given_with_whatever_the_order():
    torch.manual_seed(1)
    deep = MLP(6, [10, 10, 8], 3).eval()
    shallow = MLP(6, [10, 8], 3).eval()
    x = torch.randn(400, 6)
    for models, w, ref in (([deep, shallow], [1.0, 0.0], deep), ([deep, shallow], [0.0, 1.0], shallow),
                           ([shallow, deep], [0.0, 1.0], deep), ([shallow, deep], [1.0, 0.0], shallow)):
        res = fuse(models, x, weights=w, repair=False)
        assert close(res.model(x), ref(x)), (w, ref is deep)


@pytest.mark.parametrize("match", ["ot-acts", "ot-weights"])
@pytest.mark.parametrize("k", [2, 3])
def test_narrower_model_into_a_wider_target_is_exact(match, k):
    torch.manual_seed(2)
    narrow = MLP(5, [4, 3], 2, bias=True).eval()
    wide = MLP(5, [4 * k, 3 * k], 2, bias=True).eval()
    x = torch.randn(400, 5)
    res = fuse([narrow, wide], x, weights=[1.0, 0.0], target=1, match=match, repair=False)
    assert describe(res.model).widths == [4 * k, 3 * k]
    assert res.report["solvers"][0] == ["emd", "emd"]
    assert close(res.model(x), narrow(x))


def test_narrower_model_of_different_depth_into_a_wider_deeper_target():
    torch.manual_seed(3)
    narrow = MLP(5, [4, 3], 2).eval()
    wide = MLP(5, [8, 8, 6], 2).eval()
    x = torch.randn(400, 5)
    res = fuse([narrow, wide], x, weights=[1.0, 0.0], target=1, repair=False)
    assert close(res.model(x), narrow(x))


def test_repair_matches_the_interpolated_statistics_layer_by_layer():
    torch.manual_seed(4)
    a, b = MLP(6, [16, 12], 3).eval(), MLP(6, [16, 12], 3).eval()
    x = torch.randn(400, 6)
    prep = prepare_fusion([a, b], x, FusionConfig(samples=400))
    stats = prep.parent_stats()
    fused = prep.combine([0.3, 0.7], repair=True)
    plain = prep.combine([0.3, 0.7], repair=False)
    for layer, acts in enumerate(layer_activations(fused, describe(fused), prep.samples)):
        mean = 0.3 * stats[0][layer][0] + 0.7 * stats[1][layer][0]
        std = 0.3 * stats[0][layer][1] + 0.7 * stats[1][layer][1]
        assert torch.allclose(acts.mean(0), mean, atol=1e-4)
        assert torch.allclose(acts.std(0, unbiased=False), std, atol=1e-4)
    # averaging two different networks shrinks the variance; repair brings it back
    plain_std = layer_activations(plain, describe(plain), prep.samples)[0].std(0, unbiased=False).mean()
    assert plain_std < (0.3 * stats[0][0][1] + 0.7 * stats[1][0][1]).mean()
    # bias-free parents: repair adds biases, and the saved architecture says so
    assert fused.arch()["bias"] is True and a.arch()["bias"] is True


def test_k_models_of_three_depths():
    torch.manual_seed(5)
    models = [MLP(6, [10], 3), MLP(6, [12, 8], 3), MLP(6, [10, 8, 6], 3)]
    x = torch.randn(400, 6)
    for balance, depth in (("add", 3), ("merge", 1)):
        res = fuse(models, x, balance=balance)
        assert describe(res.model).depth == depth
        assert res.model(x).shape == (400, 3)
        assert res.report["fused_widths"][0] == 10  # the target (shallowest model) gives the widths


def test_fused_model_accepts_sequential_and_mixed_bias():
    torch.manual_seed(6)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Flatten(), nn.Linear(6, 8, bias=False), nn.ReLU(inplace=True), nn.Linear(8, 8),
                      nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(400, 6)
    res = fuse([a, b], x, weights=[1.0, 0.0], repair=False)
    assert close(res.model(x), a(x))


def test_sinkhorn_and_vanilla_run():
    torch.manual_seed(7)
    a, b = MLP(6, [8, 8], 3), MLP(6, [8, 8], 3)
    x = torch.randn(100, 6)
    res = fuse([a, b], x, solver="sinkhorn", reg=0.05, samples=100)
    assert res.report["solvers"][1] == ["sinkhorn", "sinkhorn"]
    res = fuse([a, b], x, match="none", repair=False, samples=100)
    assert close(res.model.layers[1].weight, 0.5 * (a.layers[1].weight + b.layers[1].weight))


def test_report_contents():
    torch.manual_seed(8)
    a, b = MLP(6, [8, 4], 3), MLP(6, [8, 6, 4], 3)
    res = fuse([a, b], torch.randn(100, 6), samples=50)
    rep = res.report
    assert rep["target"] == 0 and rep["fused_widths"] == [8, 8, 4]
    (mp,) = [m for m in rep["mappings"] if m["changed"]]
    (group,) = mp["groups"]
    assert mp["alignment"] == [0, 2] and len(group["matrix"]) == 3 and len(group["matrix"][0]) == 2
    assert group["matrix_kind"] == "cost" and mp["role"] == "shallow" and mp["reference"] == [1]
    assert {"depth_s", "match_s", "total_s"} <= set(rep["timings"])
    assert rep["methods"] == {"similarity": "neurons-cka", "depth_align": "cla", "balance": "add", "match": "ot-acts",
                              "repair": "auto"}
    assert rep["weights"] == [0.5, 0.5]


def test_bad_input():
    torch.manual_seed(9)
    a, b = MLP(6, [8], 3), MLP(6, [8], 3)
    x = torch.randn(400, 6)
    with pytest.raises(HetfuseError, match="input sizes"):
        fuse([a, MLP(5, [8], 3)], x)
    with pytest.raises(HetfuseError, match="output sizes"):
        fuse([a, MLP(6, [8], 4)], x)
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(HetfuseError, match="NaN"):
        fuse([a, bad], x)
    with pytest.raises(DataError, match="fewer samples"):
        fuse([a, b], x, samples=500)
    with pytest.raises(DataError, match="features"):
        fuse([a, b], torch.randn(400, 7))
    for w in ([0.5, 0.6], [-0.5, 1.5], [1.0]):
        with pytest.raises(HetfuseError, match="weight"):
            fuse([a, b], x, weights=w)
    with pytest.raises(HetfuseError, match="balance"):
        fuse([a, b], x, balance="stack")
    with pytest.raises(HetfuseError, match="target"):
        fuse([a, b], x, target=2)
    with pytest.raises(HetfuseError, match="LayerNorm is present in model 1 only"):
        fuse([a, nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))], x)


def test_data_as_iterable_of_batches():
    torch.manual_seed(10)
    a, b = MLP(6, [8], 3), MLP(6, [8], 3)
    x = torch.randn(120, 6)
    batches = [(x[i:i + 32], torch.zeros(32)) for i in range(0, 120, 32)]
    res = fuse([a, b], batches, samples=100)
    assert res.model(x).shape == (120, 3)
