"""Model zoo: VGG and ResNet models, their arch strings, tracing and arch round trips."""

import json

import pytest
import torch
import torch.fx as fx
from torch import nn

from hetfuse.models import ZOO, BasicBlock, ResNet, VGG, build_model, list_archs, model_from_arch, parse_arch
from hetfuse.models.resnet import RESNET_FAMILIES
from hetfuse.models.vgg import MERGING_VGG_CONFIGS, VGG_CONFIGS

ZOO_SPECS = ([f"vgg{d}:w=0.125" for d in (11, 13, 16, 19)] + [f"vgg{d}:w=0.125,bn" for d in (11, 13, 16, 19)]
             + ["resnet18:w=0.0625", "resnet34:w=0.0625", "resnet20:w=0.125", "resnet26:w=0.125",
                "resnet32:w=0.125", "resnet50:w=0.125", "resnet20:w=0.125,nobn,bias"])


def _build(spec):
    return build_model(spec, input_dim=3 * 32 * 32, output_dim=10, input_shape=(3, 32, 32))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_forward_trace_and_roundtrip(spec, x):
    torch.manual_seed(0)
    model = _build(spec).eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()

    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)

    arch = model.arch()
    assert arch == parse_arch(spec, input_dim=3072, output_dim=10)  # the dict the string parses to
    arch = json.loads(json.dumps(arch))  # checkpoint metadata is JSON
    rebuilt = model_from_arch(arch)
    assert type(rebuilt) is type(model)
    assert rebuilt.arch() == model.arch()
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(sd2)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    rebuilt.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), y)


def test_arch_strings_parse_to_what_they_say():
    p = lambda s, **kw: parse_arch(s, input_dim=3072, output_dim=10, **kw)  # noqa: E731
    assert p("vgg11:w=0.25,bn") == {"type": "vgg", "depth": 11, "width": 0.25, "bn": True, "bias": True,
                                    "num_classes": 10, "in_channels": 3}
    assert p("vgg13:w=2") == {"type": "vgg", "depth": 13, "width": 2.0, "bn": False, "bias": True,
                              "num_classes": 10, "in_channels": 3}
    assert p("vgg16:bn,nobias")["bias"] is False and p("vgg19")["width"] == 1.0
    assert p("resnet18:w=0.25") == {"type": "resnet", "blocks": [2, 2, 2, 2], "widths": [16, 32, 64, 128],
                                    "bn": True, "bias": False, "num_classes": 10, "in_channels": 3}
    assert p("resnet34:w=0.25")["blocks"] == [3, 4, 6, 3]
    assert p("resnet34:w=0.25")["widths"] == [16, 32, 64, 128]
    assert p("resnet20:w=4") == {"type": "resnet", "blocks": [3, 3, 3], "widths": [64, 128, 256],
                                 "bn": True, "bias": False, "num_classes": 10, "in_channels": 3}
    assert p("resnet20:w=1,nobn") == {"type": "resnet", "blocks": [3, 3, 3], "widths": [16, 32, 64],
                                      "bn": False, "bias": False, "num_classes": 10, "in_channels": 3}
    assert p("resnet26")["blocks"] == [4, 4, 4] and p("resnet32")["blocks"] == [5, 5, 5]
    assert p("resnet50")["blocks"] == [8, 8, 8]
    # channels: max(1, round(c * w)); the class count and input channels come from the data set
    assert p("resnet20:w=0.01")["widths"] == [1, 1, 1]
    assert p(" VGG11 : W=0.5 , BN ")["bn"] is True
    a = parse_arch("resnet20", input_dim=784, output_dim=7, input_shape=(1, 28, 28))
    assert a["in_channels"] == 1 and a["num_classes"] == 7
    # MLP unchanged (bias from the keyword; input_shape ignored)
    assert p("mlp:400,200,100", bias=True) == {"type": "mlp", "input_dim": 3072, "hidden": [400, 200, 100],
                                               "output_dim": 10, "bias": True}
    assert p("mlp:8", input_shape=(3, 32, 32))["bias"] is False


@pytest.mark.parametrize("spec,match", [
    ("alexnet", "known: .*vgg11.*resnet18"),
    ("vgg12:w=1", "unknown architecture"),
    ("resnet21", "unknown architecture"),
    ("vgg11:w=0.5,dropout", "valid options: w=<float>, bn, nobn, bias, nobias"),
    ("resnet18:width=2", "valid options"),
    ("vgg11:w=abc", "bad width"),
    ("vgg11:w=0", "positive"),
    ("vgg11:w=-1", "positive"),
    ("vgg11:w=nan", "positive"),
    ("vgg11:w=1,w=2", "twice"),
    ("resnet20:bn,nobn", "twice"),
    ("mlp:", "bad MLP widths"),
])
def test_parse_arch_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_arch(spec, input_dim=3072, output_dim=10)


def test_other_errors():
    with pytest.raises(ValueError, match="32..63"):
        parse_arch("vgg11", input_dim=784, output_dim=10, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="input_shape"):
        parse_arch("resnet20", input_dim=784, output_dim=10, input_shape=(784,))
    with pytest.raises(ValueError, match="unknown architecture type"):
        model_from_arch({"type": "densenet"})
    with pytest.raises(ValueError, match="depth"):
        VGG(depth=12)
    with pytest.raises(ValueError, match="one width per stage"):
        ResNet([2, 2], [16])


def test_zoo_listing():
    assert set(ZOO) == {"mlp", *(f"vgg{d}" for d in VGG_CONFIGS), *(f"mvgg{d}" for d in MERGING_VGG_CONFIGS),
                        *RESNET_FAMILIES, "vit", "bert"}
    for spec in list_archs():
        assert spec.partition(":")[0] in ZOO
        parse_arch(spec, input_dim=3072, output_dim=10)


def test_vgg_layout():
    m = VGG(11, width=0.5, bn=True, bias=False)
    convs = [m_ for m_ in m.features if isinstance(m_, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256]
    assert sum(isinstance(m_, nn.MaxPool2d) for m_ in m.features) == 5
    # every conv is followed by its BatchNorm2d, then ReLU
    feats = list(m.features)
    for i, layer in enumerate(feats):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(feats[i + 1], nn.BatchNorm2d) and feats[i + 1].num_features == layer.out_channels
            assert isinstance(feats[i + 2], nn.ReLU)
            assert layer.bias is None
    assert isinstance(m.classifier[0], nn.Flatten)
    lin = m.classifier[1]
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (256, 10) and lin.bias is None
    assert len(m.classifier) == 2
    plain = VGG(19, width=0.125)
    assert not any(isinstance(m_, nn.BatchNorm2d) for m_ in plain.modules())
    assert sum(isinstance(m_, nn.Conv2d) for m_ in plain.features) == 16
    assert all(c.bias is not None for c in plain.features if isinstance(c, nn.Conv2d))
    assert [sum(isinstance(m_, nn.Conv2d) for m_ in VGG(d, width=0.125).features) for d in (11, 13, 16, 19)] == \
        [8, 10, 13, 16]
    assert VGG(11, width=2).channels()[0] == 128


def _check_resnet(m: ResNet, bn: bool):
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == sum(m.blocks)
    norm = nn.BatchNorm2d if bn else nn.Identity
    assert isinstance(m.bn1, norm) and isinstance(m.conv1, nn.Conv2d) and m.conv1.stride == (1, 1)
    n_proj = 0
    for name in m.stage_names:
        for block in getattr(m, name):
            assert isinstance(block.bn1, norm) and isinstance(block.bn2, norm)
            if bn:
                assert block.bn1.num_features == block.conv1.out_channels
            changes = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
            if changes:
                n_proj += 1
                proj = list(block.shortcut)
                assert len(proj) == (2 if bn else 1)
                conv = proj[0]
                assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
                assert conv.stride == block.conv1.stride and conv.out_channels == block.conv1.out_channels
                if bn:
                    assert isinstance(proj[1], nn.BatchNorm2d)
            else:
                assert isinstance(block.shortcut, nn.Sequential) and len(block.shortcut) == 0
    if not bn:
        assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    return n_proj


def test_resnet_layout():
    m = model_from_arch(parse_arch("resnet18:w=0.0625", input_dim=3072, output_dim=10))
    assert _check_resnet(m, bn=True) == 3  # first block of stages 2, 3, 4
    strides = [getattr(m, n)[0].conv1.stride for n in m.stage_names]
    assert strides == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d) and m.fc.in_features == 32 and m.fc.bias is None
    assert _check_resnet(model_from_arch(parse_arch("resnet32:w=0.25", input_dim=3072, output_dim=10)), bn=True) == 2
    nobn = model_from_arch(parse_arch("resnet20:w=0.25,nobn,bias", input_dim=3072, output_dim=10))
    assert _check_resnet(nobn, bn=False) == 2
    assert all(c.bias is not None for c in nobn.modules() if isinstance(c, nn.Conv2d))
    assert _check_resnet(ResNet([2, 1], [4, 4]), bn=True) == 1  # stride 2 at the same width: projection


def test_resnet_trace_has_residual_adds():
    m = ResNet([1, 1], [4, 8])
    gm = fx.symbolic_trace(m)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in getattr(n.target, "__name__", "")]
    assert len(adds) == 2
    assert all(n.op in ("placeholder", "call_module", "call_function", "output") for n in gm.graph.nodes)


@pytest.mark.parametrize("spec", ["vgg11:w=0.125,bn", "resnet20:w=0.125,nobn,bias"])
def test_checkpoint_roundtrip(spec, tmp_path, x):
    from hetfuse.io import load_checkpoint, save_checkpoint

    model = _build(spec).eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.arch() == model.arch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
