"""Convolutional and residual networks with BatchNorm: description, self-check, fusion identities."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetfuse import fuse
from hetfuse.errors import UnsupportedModelError
from hetfuse.graph import check_permutation_invariance, describe, layer_activations, permuted_copy
from hetfuse.models import build_model

ZOO_SPECS = ["vgg11:w=0.125", "vgg11:w=0.125,bn", "vgg13:w=0.125,bn", "vgg16:w=0.0625,bn", "vgg19:w=0.0625",
             "resnet18:w=0.125", "resnet34:w=0.0625", "resnet20:w=0.5", "resnet26:w=0.25", "resnet32:w=0.25",
             "resnet50:w=0.25", "resnet20:w=0.5,nobn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_norms(model, seed=0):
    """Random BatchNorm statistics and affine parameters, so a wrong permutation of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def zoo(spec, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(build_model(spec, input_dim=3, output_dim=10, input_shape=(3, 32, 32)), seed)


@pytest.fixture(scope="module")
def x():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_zoo_models_pass_the_permutation_self_check(spec, x):
    model = zoo(spec)
    g = describe(model)
    assert g.conv and g.input_dim == 3 and g.output_dim == 10
    check_permutation_invariance(model, g, x)
    if spec.startswith("resnet"):
        assert any(s.stream for s in g.spaces) and not g.chain
    else:
        assert g.chain


class Block(nn.Module):
    """torchvision-style BasicBlock, written only here."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class HandResNet(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = nn.Sequential(Block(w, w, 1), Block(w, w, 1))
        self.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1))
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def hand_vgg(w=8):
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * 8 * 8, 32), nn.ReLU(), nn.Dropout(),
                         nn.Linear(32, 10))


def test_hand_written_models(x):
    torch.manual_seed(0)
    res = randomize_norms(HandResNet())
    g = describe(res)
    streams = [s for s in g.spaces if s.stream]
    assert [s.size for s in streams] == [8, 16] and len(g.spaces) == 6
    # the stage-2 stream ties both blocks' last conv/BN and the shortcut projection
    names = {m.name for m in streams[1].members}
    assert {"layer2.0.conv2.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
            "layer2.1.conv2.weight", "fc.weight"} <= names
    check_permutation_invariance(res, g, x)
    vgg = randomize_norms(hand_vgg())
    # a 8x8 map flattened into a Linear: each channel ties 64 columns, measured or read off the fan-in
    for g in (describe(vgg, example=x), describe(vgg)):
        assert [m.block for m in g.spaces[1].in_members()] == [64]
        check_permutation_invariance(vgg, g, x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.c(x)), 1))


class BadStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.a(x) + self.b(x)[:, :4]), 1))


def test_unsupported_conv_structures_are_named():
    with pytest.raises(UnsupportedModelError, match="grouped convolution 'c'"):
        describe(Grouped())
    with pytest.raises(UnsupportedModelError, match="getitem|indexing|unsupported"):
        describe(BadStream())


def test_stream_activations_are_read_where_the_stream_is_formed(x):
    res = randomize_norms(HandResNet())
    g = describe(res)
    stem = g.spaces[0]
    assert stem.act_nodes == ["bn1", "add", "add_1"]
    acts = layer_activations(res, g, x)
    assert acts[0].shape == (3 * 8 * 32 * 32, 8)


@pytest.mark.parametrize("make", [lambda: zoo("vgg11:w=0.125,bn"), lambda: zoo("resnet20:w=0.5"),
                                  lambda: randomize_norms(HandResNet()), lambda: randomize_norms(hand_vgg())],
                         ids=["vgg11-bn", "resnet20", "hand-resnet", "hand-vgg"])
def test_fusing_a_cnn_with_a_permuted_copy_gives_it_back(make, x):
    model = make()
    twin, _ = permuted_copy(model, describe(model, example=x), seed=3)
    data = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = fuse([twin, model], data, weights=[0.5, 0.5], samples=16, repair=False)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("narrow, wide", [("vgg11:w=0.125,bn", "vgg11:w=0.25,bn"), ("resnet20:w=0.5", "resnet20:w=1")])
def test_narrow_cnn_into_a_wider_target_with_weights_one_zero_is_exact(narrow, wide, x):
    a, b = zoo(narrow, 1), zoo(wide, 2)
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = fuse([a, b], data, weights=[1.0, 0.0], target=1, samples=8, repair=False)
    assert describe(res.model).widths == describe(b).widths
    torch.testing.assert_close(res.model(x), a(x), rtol=1e-4, atol=1e-4)


def test_batchnorm_reset_repair_uses_the_samples(x):
    a, b = zoo("vgg11:w=0.125,bn", 1), zoo("vgg11:w=0.125,bn", 2)
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    res = fuse([a, b], data, samples=32, repair=True)
    first_conv, first_bn = res.model.features[0], res.model.features[1]
    with torch.no_grad():
        z = first_conv(data)  # the samples are drawn at random, but all 32 are used
    torch.testing.assert_close(first_bn.running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)


def test_conv_fusion_of_different_depths_balances_with_zero_blocks(x):
    shallow, deep = zoo("resnet20:w=0.5", 1), zoo("resnet26:w=0.5", 2)
    data = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = fuse([shallow, deep], data, weights=[1.0, 0.0], samples=8, repair=False)
    from hetfuse.graph import depth_groups

    assert [len(g.units) for g in depth_groups(describe(res.model))] == [4, 4, 4]
    assert res.report["mappings"][0]["groups"][0]["kind"] == "block"
    torch.testing.assert_close(res.model(x), shallow(x), rtol=0, atol=0)


class MismatchedStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.a(x) + self.b(x)), 1))


def test_residual_stream_with_inconsistent_channel_counts_is_named():
    with pytest.raises(UnsupportedModelError, match="inconsistent channel counts.*'a' has 4.*'b' 6"):
        describe(MismatchedStream())


def test_models_left_in_training_mode_are_fused_in_eval_mode(x):
    a, b = zoo("resnet20:w=0.5", 1), zoo("resnet20:w=0.5", 2)
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = fuse([a, b], data, samples=16, repair=False).model
    a.train(), b.train()
    res = fuse([a, b], data, samples=16, repair=False)
    assert a.training and b.training  # the caller's models are not touched
    assert not res.model.training
    torch.testing.assert_close(res.model(x), ref(x))
    # their running statistics were not updated by the fusion's forward passes either
    torch.testing.assert_close(a.layer1[0].bn1.running_mean, zoo("resnet20:w=0.5", 1).layer1[0].bn1.running_mean)


def test_wrong_data_shape_for_a_cnn_is_a_clear_error():
    from hetfuse.errors import DataError

    with pytest.raises(DataError, match="channels"):
        fuse([zoo("resnet20:w=0.5"), zoo("resnet20:w=0.5", 1)], torch.randn(16, 1, 28, 28), samples=8)


def test_repair_of_a_batchnorm_free_resnet_corrects_the_block_layers(x):
    from hetfuse import FusionConfig, prepare_fusion

    a, b = zoo("resnet20:w=0.5,nobn", 1), zoo("resnet20:w=0.5,nobn", 2)
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    prep = prepare_fusion([a, b], data, FusionConfig(samples=32))
    fused = prep.combine([0.4, 0.6], repair=True)
    g = describe(fused)
    stats = prep.parent_stats()
    acts = layer_activations(fused, g, prep.samples)
    inner = [layer for layer, s in enumerate(g.spaces) if not s.stream]
    assert inner
    for layer in inner:
        mean = 0.4 * stats[0][layer][0] + 0.6 * stats[1][layer][0]
        torch.testing.assert_close(acts[layer].mean(0), mean, rtol=1e-3, atol=1e-4)


def test_repaired_bias_free_cnns_save_and_load(tmp_path, x):
    """REPAIR adds biases to bias-free layers; the checkpoint records them so the model reloads."""
    from hetfuse.io import load_checkpoint, save_checkpoint

    for spec in ("vgg11:w=0.125,nobias", "resnet20:w=0.5,nobn"):
        a, b = zoo(spec, 1), zoo(spec, 2)
        res = fuse([a, b], torch.randn(32, 3, 32, 32), samples=32, repair=True)
        path = save_checkpoint(res.model, tmp_path / f"{spec.split(':')[0]}.safetensors")
        loaded, _ = load_checkpoint(path)
        torch.testing.assert_close(loaded(x), res.model(x))
