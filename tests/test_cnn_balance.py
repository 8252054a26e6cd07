"""Depth balancing of CNNs as graph rewrites: identity convolutions, identity BatchNorms with their input's
statistics, zero residual blocks, grouped depth alignment, fusion across depths."""

import pytest
import torch
from torch import nn

from hetfuse import fuse
from hetfuse.balance import calibrate_identity_norms, identity_norm, rebalance
from hetfuse.errors import HetfuseError
from hetfuse.graph import depth_groups, describe
from hetfuse.io import load_model, save_model
from hetfuse.repair import reset_batchnorm
from test_cnn import HandResNet, hand_vgg, randomize_norms, zoo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    # inputs with negative values: identity layers must not sit on the raw input
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (x < 0).any()
    return x


@pytest.fixture(scope="module")
def data():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def same(a, b, x, atol=0.0):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    torch.testing.assert_close(ya, yb, rtol=1e-6 if atol else 0, atol=atol)


def counts(model):
    return [len(g.units) for g in depth_groups(describe(model))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_identity_batchnorm_with_input_statistics_is_the_identity_and_survives_a_reset(dtype, eps):
    z = (torch.randn(1200, 5, 4, 4, dtype=dtype) * 3 + 2).relu()
    bn = identity_norm(nn.BatchNorm2d(5, eps=eps).to(dtype), 5).eval()
    torch.testing.assert_close(bn(z), z)
    net = nn.Sequential(bn)
    calibrate_identity_norms(net, [bn], z)
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn(z), z)
    # the BN reset recomputes the statistics of the same input: still the identity
    reset_batchnorm(net, z)
    torch.testing.assert_close(bn(z), z)


@pytest.mark.parametrize("spec", ["vgg11:w=0.125", "vgg11:w=0.125,bn", "vgg11:w=0.125,bn,nobias"])
def test_vgg11_with_identity_convs_is_vgg13_shaped_and_the_same_function(spec, x, data):
    a = zoo(spec)
    # one more conv in each of the first two pooling groups, as VGG13 has
    b = rebalance(a, [[0], [0], [0, 1], [0, 1], [0, 1]], [2, 2, 2, 2, 2], x=data)
    target = zoo(spec.replace("vgg11", "vgg13"))
    assert counts(b) == counts(target) == [2, 2, 2, 2, 2]
    assert describe(b).widths == describe(target).widths
    same(a, b, x, atol=1e-5)
    c = rebalance(a, [[0], [0], [0, 1], [0, 3], [0, 1]], [1, 1, 2, 4, 2], x=data)  # a non-standard layer list
    assert counts(c) == [1, 1, 2, 4, 2]
    same(a, c, x, atol=1e-5)


def test_identity_layer_needs_a_relu_and_valid_alignments(data):
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 32 * 32, 2))
    with pytest.raises(HetfuseError, match="not followed by a ReLU"):
        rebalance(seq, [[0, 2]], [3], x=data)
    with pytest.raises(HetfuseError, match="first unit"):
        fuse([seq, nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 2))],
             data, samples=8, depth_align="fixed", mapping=[1, 2])


def test_hand_written_vgg_with_identity_convs(x, data):
    v = randomize_norms(hand_vgg())
    b = rebalance(v, [[0], [1], [0]], [2, 3, 1], x=data)
    assert counts(b) == [2, 3, 1]
    modules = list(b.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == 5 and sum(isinstance(m, nn.BatchNorm2d)
                                                                        for m in modules) == 5
    # a bias follows the conv the identity copies: the first group's conv has one, the second's none
    names = {n: m for n, m in b.named_modules()}
    inserted = [m for n, m in names.items() if n.startswith("hetfuse") and isinstance(m, nn.Conv2d)]
    assert sorted(m.bias is not None for m in inserted) == [False, False, True]
    same(v, b, x, atol=1e-5)


@pytest.mark.parametrize("spec", ["resnet20:w=0.5", "resnet20:w=0.5,nobn", "resnet20:w=0.5,bias"])
def test_resnet20_with_zero_blocks_is_resnet26_shaped_and_the_same_function(spec, x, data):
    a = zoo(spec)
    b = rebalance(a, [[0, 2, 3], [0, 1, 2], [0, 1, 3]], [4, 4, 4], x=data)
    target = zoo(spec.replace("resnet20", "resnet26"))
    assert counts(b) == counts(target) == [4, 4, 4]
    assert describe(b).widths == describe(target).widths
    same(a, b, x)
    c = rebalance(a, [[0, 1, 2], [0, 2, 4], [0, 1, 2]], [3, 5, 3], x=data)
    assert counts(c) == [3, 5, 3]
    same(a, c, x)
    with pytest.raises(HetfuseError, match="first unit"):
        fuse([zoo(spec), zoo(spec.replace("resnet20", "resnet26"))], data, samples=8, depth_align="fixed",
             mapping=[0, 1, 2, 5, 6, 7, 8, 9, 10])


def test_hand_written_resnet_with_zero_blocks(x, data):
    h = randomize_norms(HandResNet())
    groups = depth_groups(describe(h))
    assert [(g.kind, [u.weight for u in g.units]) for g in groups] == [
        ("block", ["layer1.0.conv2", "layer1.1.conv2"]), ("block", ["layer2.0.conv2", "layer2.1.conv2"])]
    b = rebalance(h, [[0, 2], [0, 3]], [4, 4], x=data)
    assert counts(b) == [4, 4]
    same(h, b, x)


def test_a_stage_without_an_identity_block_borrows_one_from_another_stage(x, data):
    class OneBlockStage(HandResNet):
        def __init__(self):
            super().__init__()
            self.layer2 = nn.Sequential(self.layer2[0])  # only the downsampling block

    h = randomize_norms(OneBlockStage())
    b = rebalance(h, [[0, 1], [0]], [2, 3], x=data)
    assert counts(b) == [2, 3]
    same(h, b, x)


@pytest.mark.parametrize("similarity", ["neurons", "cka", "wasserstein", "weights"])
def test_grouped_depth_alignment_on_vgg_and_resnet(similarity, data):
    res = fuse([zoo("vgg11:w=0.125,bn", 1), zoo("vgg13:w=0.125,bn")], data, samples=8, representation=similarity,
               repair=False)
    m = res.report["mappings"][0]
    assert m["role"] == "shallow" and m["changed"] and [g["kind"] for g in m["groups"]] == ["conv"] * 5
    assert [g["shallow"] for g in m["groups"]] == [1, 1, 2, 2, 2] and [g["deep"] for g in m["groups"]] == [2] * 5
    assert m["alignment"][:2] == [0, 2] and m["alignment"][2:] == [4, 5, 6, 7, 8, 9]
    assert all(g["alignment"][0] == 0 for g in m["groups"])  # a conv group's first unit stays matched
    res = fuse([zoo("resnet20:w=0.5", 1), zoo("resnet26:w=0.5")], data, samples=8, representation=similarity,
               repair=False)
    m = res.report["mappings"][0]
    assert [g["kind"] for g in m["groups"]] == ["block"] * 3 and len(m["alignment"]) == 9
    assert all(a < b for a, b in zip(m["alignment"], m["alignment"][1:], strict=False))
    assert counts(res.model) == [4, 4, 4]


def test_depth_structures_that_do_not_pair_are_refused(data):
    with pytest.raises(HetfuseError, match="do not pair up"):
        fuse([zoo("resnet18:w=0.125"), zoo("resnet20:w=0.5")], data, samples=8)
    with pytest.raises(HetfuseError, match="do not pair up"):
        fuse([zoo("vgg13:w=0.125"), zoo("resnet20:w=0.5")], data, samples=8)


@pytest.mark.parametrize("shallow_spec, deep_spec", [("resnet20:w=0.5", "resnet26:w=0.5"),
                                                     ("vgg11:w=0.125,bn", "vgg13:w=0.125,bn")])
@pytest.mark.parametrize("representation", ["neurons", "cka"])
def test_fusing_different_depths_with_one_hot_weights_gives_back_a_parent(shallow_spec, deep_spec, representation,
                                                                         x, data):
    shallow, deep = zoo(shallow_spec, 1), zoo(deep_spec, 2)
    res = fuse([shallow, deep], data, weights=[1.0, 0.0], samples=8, repair=False, representation=representation)
    rep = res.report
    assert rep["target"] == 0 and rep["fused_widths"] == describe(deep).widths
    m = rep["mappings"][0]
    assert {"model", "role", "reference", "alignment", "groups", "changed"} <= set(m)
    assert m["reference"] == [1] and m["role"] == "shallow"
    torch.testing.assert_close(res.model(x), shallow(x), rtol=1e-5, atol=1e-5)
    res = fuse([shallow, deep], data, weights=[0.0, 1.0], samples=8, repair=False, representation=representation)
    torch.testing.assert_close(res.model(x), deep(x), rtol=1e-5, atol=1e-5)


def test_wb_one_gives_the_depth_aligned_parent_after_the_bn_reset(x, data):
    """The identity BatchNorms of the depth-aligned parent carry their input's statistics, so the BN reset of the
    fused network leaves them identities: at weight 1 the fused network is the parent."""
    a, b = zoo("vgg13:w=0.25,bn", 1), zoo("vgg11:w=0.125,bn", 2)
    reset_batchnorm(a, data)
    reset_batchnorm(b, data)  # parents whose statistics describe the data, as trained ones do
    res = fuse([a, b], data, weights=[0.0, 1.0], samples=16, representation="cka", repair="bn-reset")
    # the reset normalises with biased batch variances where the running ones are unbiased: noise of ~1e-4
    torch.testing.assert_close(res.model(x), b(x), rtol=1e-3, atol=1e-3)
    # without the statistics in the identity BatchNorms the reset would move the outputs by far more
    plain = fuse([a, b], data, weights=[0.0, 1.0], samples=16, representation="cka", repair="none").model
    for n, m in plain.named_modules():
        if n.startswith("hetfuse") and isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_(), m.running_var.fill_(1 - m.eps), m.weight.data.fill_(1), m.bias.data.zero_()
    reset_batchnorm(plain, data)
    assert (plain(x) - b(x)).abs().max() > 0.05


def test_merge_is_refused_for_cnns(data):
    with pytest.raises(HetfuseError, match="merge of residual blocks is not supported"):
        fuse([zoo("resnet20:w=0.5"), zoo("resnet26:w=0.5")], data, samples=8, balance="merge")
    with pytest.raises(HetfuseError, match="merge of convolutional layers is not supported"):
        fuse([zoo("vgg11:w=0.125"), zoo("vgg13:w=0.125")], data, samples=8, balance="merge")


def test_balanced_models_roundtrip_through_checkpoints(tmp_path, x, data):
    for model in (rebalance(zoo("vgg11:w=0.125,bn"), [[0], [0], [0, 1], [0, 2], [0, 1]], [1, 1, 2, 3, 2], x=data),
                  rebalance(zoo("resnet20:w=0.5"), [[0, 1, 2], [0, 1, 2], [0, 3, 4]], [3, 3, 5], x=data)):
        path = save_model(model, tmp_path / f"{len(list(model.modules()))}.safetensors")
        loaded = load_model(path)
        assert list(loaded.state_dict()) == list(model.state_dict())
        same(model, loaded, x)


def test_groups_that_do_not_pair_are_named_with_the_reason():
    from hetfuse.models import build_model

    vgg = build_model("vgg11:w=0.125,bn", input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
    res = build_model("resnet20:w=0.25", input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
    with pytest.raises(HetfuseError) as info:
        fuse([vgg, res], torch.randn(16, 3, 32, 32), samples=16)
    msg = str(info.value)
    assert "group 1 (1-based) of model 1 is stage0, a residual stage of 3 unit(s)" in msg
    assert "model 0 has conv0, a group of convolutions" in msg
