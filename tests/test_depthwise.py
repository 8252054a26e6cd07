"""Depthwise convolutions (MobileNetV2 inverted residuals, ConvNeXt-style blocks) across widths: the depthwise
layer is resized with the space it acts in (in = out = groups channels), and the fused model saves and loads."""

import pytest
import torch

from hetfuse import fuse, load_model, save_model
from hetfuse.graph import describe
from hetfuse.graph.ops import OPS, layer_op
from hetfuse.graph.rewrite import module_from_spec, module_spec
from models_zoo_for_tests import ConvNeXtLike, MobileNetV2Like

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [lambda w: MobileNetV2Like((1, 2), width=w), lambda w: ConvNeXtLike(2, w)])
@pytest.mark.parametrize("match", ["ot-acts", "elastic-zip"])
def test_depthwise_networks_of_different_widths_fuse_into_the_wider(build, match, tmp_path):
    torch.manual_seed(0)
    a, b = build(8).eval(), build(12).eval()
    data = torch.randn(48, 3, 32, 32)
    res = fuse([a, b], data, samples=32, match=match, **({"target": 1} if match == "ot-acts" else {}))
    g = describe(res.model, example=data[:2])
    assert g.widths == describe(b, example=data[:2]).widths
    dws = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert dws and all(m.groups == m.in_channels == m.out_channels for m in dws)
    path = tmp_path / "fused.safetensors"
    save_model(res.model, path)
    again = load_model(path, base=build(12) if match == "ot-acts" else build(8))  # the target's class, as built
    with torch.no_grad():
        torch.testing.assert_close(again(data[:4]), res.model(data[:4]))


def test_every_recordable_module_of_the_op_table_round_trips_through_a_spec():
    for handler in OPS:
        for name, (cls, _) in handler.spec_types.items():
            if name.startswith("Conv"):
                mod = cls(4, 4, 3, groups=4)
            elif name in ("Linear",):
                mod = cls(3, 2)
            elif name.startswith(("BatchNorm", "LayerNorm", "RMSNorm")):
                mod = cls(5)
            elif name == "Embedding":
                mod = cls(7, 5)
            elif name.startswith(("MaxPool", "AvgPool")):
                mod = cls(2)
            elif name.startswith("Adaptive"):
                mod = cls(1)
            else:
                mod = cls()
            assert type(module_from_spec(module_spec(mod))) is cls


def test_a_depthwise_layer_resizes_all_three_channel_counts():
    op = layer_op(torch.nn.Conv2d(6, 6, 3, groups=6))
    spec = module_spec(torch.nn.Conv2d(6, 6, 3, groups=6))
    assert op.resize(spec["args"], 6, 9, 9)
    assert (spec["args"]["in_channels"], spec["args"]["out_channels"], spec["args"]["groups"]) == (9, 9, 9)
    assert isinstance(module_from_spec(spec), torch.nn.Conv2d)
