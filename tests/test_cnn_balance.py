"""Depth balancing of CNNs: identity convolutions, zero residual blocks, group-wise CLA, fusion."""

import pytest
import torch
from torch import nn

from hetfuse import fuse
from hetfuse.align.cnn import cnn_cross_layer_alignment, conv_groups
from hetfuse.balance.cnn import add_identity_convs, add_zero_blocks, identity_batchnorm, residual_stages
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe
from hetfuse.io.checkpoint import load_checkpoint, save_checkpoint
from hetfuse.models import VGG, ResNet, model_from_arch
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


def same(a, b, x):
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert torch.equal(ya, yb), (ya - yb).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_identity_batchnorm_is_exactly_the_identity(dtype, eps):
    bn = identity_batchnorm(nn.BatchNorm2d(5, eps=eps).to(dtype)).eval()
    z = torch.randn(3, 5, 4, 4, dtype=dtype) * 100
    assert torch.equal(bn(z), z)
    assert (bn.running_var.to(torch.float64) + 0).dtype == torch.float64


@pytest.mark.parametrize("spec", ["vgg11:w=0.125", "vgg11:w=0.125,bn", "vgg11:w=0.125,bn,nobias"])
def test_vgg11_with_identity_convs_is_vgg13_and_the_same_function(spec, x):
    a = zoo(spec)
    b = add_identity_convs(a, [0, 1])  # one more conv in each of the first two pooling groups
    assert isinstance(b, VGG) and b.arch()["depth"] == 13 and "config" not in b.arch()
    assert b.channels() == zoo(spec.replace("vgg11", "vgg13")).channels()
    assert set(b.state_dict()) == set(zoo(spec.replace("vgg11", "vgg13")).state_dict())
    same(a, b, x)
    c = add_identity_convs(a, [3, 3, 7])  # a non-standard layer list
    assert c.arch()["config"][4:9] == [256, 256, 256, 256, "M"] and len(c.channels()) == 11
    describe(c)
    same(a, c, x)


def test_identity_conv_needs_a_relu_and_valid_indices():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 32 * 32, 2))
    with pytest.raises(HetfuseError, match="not followed by a ReLU"):
        add_identity_convs(seq, [0])
    with pytest.raises(HetfuseError, match="conv layers 0..1"):
        add_identity_convs(seq, [2])


def test_hand_written_vgg_with_identity_convs(x):
    v = randomize_norms(hand_vgg())
    b = add_identity_convs(v, [0, 1, 1])
    assert sum(isinstance(m, nn.Conv2d) for m in b) == 5
    bns = [m for m in b if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 5
    assert b[3].bias is not None and b[10].bias is None  # bias follows the conv it comes after
    same(v, b, x)


@pytest.mark.parametrize("spec", ["resnet20:w=0.5", "resnet20:w=0.5,nobn", "resnet20:w=0.5,bias"])
def test_resnet20_with_zero_blocks_is_resnet26_shaped_and_the_same_function(spec, x):
    a = zoo(spec)
    b = add_zero_blocks(a, 0, [1])
    b = add_zero_blocks(b, 1, 1)
    b = add_zero_blocks(b, "layer3", [2])
    assert isinstance(b, ResNet) and b.arch()["blocks"] == [4, 4, 4]
    assert set(b.state_dict()) == set(zoo(spec.replace("resnet20", "resnet26")).state_dict())
    same(a, b, x)
    c = add_zero_blocks(a, 0, [0, 4])  # stage 0 starts with an identity block: position 0 is fine
    assert c.arch()["blocks"] == [5, 3, 3]
    same(a, c, x)
    with pytest.raises(HetfuseError, match="downsampling block"):
        add_zero_blocks(a, 1, [0])


def test_hand_written_resnet_with_zero_blocks(x):
    h = randomize_norms(HandResNet())
    assert residual_stages(h) == [("layer1", ["layer1.0", "layer1.1"]), ("layer2", ["layer2.0", "layer2.1"])]
    b = add_zero_blocks(add_zero_blocks(h, "layer1", [0, 3]), 1, [1, 3])
    assert [len(b.layer1), len(b.layer2)] == [4, 4]
    same(h, b, x)


def _check_map(res, deep_counts):
    assert all(a < b for a, b in zip(res.alignment, res.alignment[1:]))
    offset = 0
    for g, m in zip(res.groups, deep_counts):
        assert g["deep"] == m and len(g["alignment"]) == g["shallow"]
        assert all(offset <= offset + v < offset + m for v in g["alignment"])
        if g["kind"] != "fc" and g["alignment"]:
            assert g["alignment"][0] == 0  # a group's first unit stays matched
        offset += m


@pytest.mark.parametrize("representation", ["neurons", "cka", "wasserstein", "weights"])
def test_grouped_cla_on_vgg_and_resnet(representation, x):
    res = cnn_cross_layer_alignment(zoo("vgg13:w=0.125,bn"), zoo("vgg11:w=0.125,bn", 1), x,
                                    representation=representation)
    assert [g["kind"] for g in res.groups] == ["conv"] * 5 + ["fc"]
    assert [g["shallow"] for g in res.groups] == [1, 1, 2, 2, 2, 0]
    _check_map(res, [2, 2, 2, 2, 2, 0])
    assert res.alignment[:2] == [0, 2] and res.alignment[2:] == [4, 5, 6, 7, 8, 9]
    res = cnn_cross_layer_alignment(zoo("resnet26:w=0.5"), zoo("resnet20:w=0.5", 1), x,
                                    representation=representation)
    assert [g["name"] for g in res.groups] == ["layer1", "layer2", "layer3", "fc"]
    _check_map(res, [4, 4, 4, 0])
    assert len(res.alignment) == 9


def test_grouped_cla_units_and_pairing():
    groups = conv_groups(randomize_norms(HandResNet()))
    assert [(g.name, [u.name for u in g.units]) for g in groups] == [
        ("layer1", ["layer1.0", "layer1.1"]), ("layer2", ["layer2.0", "layer2.1"]), ("fc", [])]
    assert [u.weight for u in groups[1].units] == ["layer2.0.conv2", "layer2.1.conv2"]
    assert [len(g.units) for g in conv_groups(hand_vgg())] == [1, 1, 1]
    with pytest.raises(HetfuseError, match="residual stages"):
        cnn_cross_layer_alignment(zoo("resnet18:w=0.125"), zoo("resnet20:w=0.5"))
    with pytest.raises(HetfuseError, match="pooling groups|residual"):
        cnn_cross_layer_alignment(zoo("vgg13:w=0.125"), zoo("resnet20:w=0.5"))


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
    assert {"model", "reference", "deep", "shallow", "alignment", "cost", "groups"} <= set(m)
    assert m["deep"] == 1 and m["shallow"] == 0
    assert all(a < b for a, b in zip(m["alignment"], m["alignment"][1:]))
    torch.testing.assert_close(res.model(x), shallow(x), rtol=0, atol=0)
    res = fuse([shallow, deep], data, weights=[0.0, 1.0], samples=8, repair=False, representation=representation)
    torch.testing.assert_close(res.model(x), deep(x), rtol=1e-5, atol=1e-5)


def test_merge_is_refused_for_cnns(data):
    with pytest.raises(HetfuseError, match="merge for convolutional layers is not supported"):
        fuse([zoo("resnet20:w=0.5"), zoo("resnet26:w=0.5")], data, samples=8, balance="merge")


def test_balanced_models_roundtrip_through_checkpoints(tmp_path, x):
    for model in (add_identity_convs(zoo("vgg11:w=0.125,bn"), [3, 5]),
                  add_zero_blocks(zoo("resnet20:w=0.5"), 2, [1, 2])):
        path = save_checkpoint(model, tmp_path / f"{type(model).__name__}.safetensors")
        rebuilt = model_from_arch(model.arch())
        assert list(rebuilt.state_dict()) == list(model.state_dict())
        loaded = load_checkpoint(path)
        loaded = loaded[0] if isinstance(loaded, tuple) else loaded
        same(model, loaded, x)
