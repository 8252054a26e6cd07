"""deepen (the depth-aligned shallow model) and heterogeneous model transfer (hetfuse.transfer), and the four
commands of fusion as an initialisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from hetfuse.errors import HetfuseError
from hetfuse.graph import describe, depth_groups
from hetfuse.models import MLP, build_model
from hetfuse.transfer import average_weights, copy_layer, deepen, main_layers, transfer
from conftest import train_digits_pair
from models_zoo_for_tests import ResidualMLP, UserResNet, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=48, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _flat(n=400, seed=0):
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def _trained_bn(model, x):
    """Random BatchNorm affine parameters and running statistics of ``x`` (as a trained network's)."""
    randomize_norms(model)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                m.reset_running_stats()
        model(x)
    return model.eval()


def _pair(kind):
    """(shallow, deep, inputs) of one family."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(12, [10, 8], 4, bias=True), MLP(12, [10, 9, 7, 8], 4, bias=True), _flat()
    if kind == "fc-residual":
        return ResidualMLP(blocks=1), ResidualMLP(blocks=3), _flat()
    x = _images(400)
    if kind == "vgg":
        a = build_model("vgg11:w=0.125,bn", input_dim=3, output_dim=10, input_shape=(3, 32, 32))
        b = build_model("vgg13:w=0.125,bn", input_dim=3, output_dim=10, input_shape=(3, 32, 32))
    else:
        a, b = UserResNet(blocks=(1, 2)), UserResNet(blocks=(2, 3))
    return _trained_bn(a, x[:100]), _trained_bn(b, x[:100]), x


def _units(model):
    return [len(g.units) for g in depth_groups(describe(model))]


@pytest.mark.parametrize("kind", ["mlp", "fc-residual", "vgg", "resnet"])
def test_deepen_keeps_the_function_and_takes_the_reference_depth(kind):
    shallow, deep, x = _pair(kind)
    out, alignment = deepen(shallow, deep, x, samples=100 if kind in ("vgg", "resnet") else 400)
    assert _units(out) == _units(deep)
    assert len(alignment["alignment"]) == sum(_units(shallow))
    with torch.no_grad():
        assert torch.allclose(out(x[:32]), shallow.eval()(x[:32]), atol=1e-4)


@given(shallow=st.lists(st.integers(3, 9), min_size=1, max_size=3), extra=st.integers(0, 3), seed=st.integers(0, 50))
@settings(max_examples=15, deadline=None)
def test_deepen_is_exact_for_any_mlp_pair(shallow, extra, seed):
    torch.manual_seed(seed)
    deep_widths = sorted(shallow + [int(w) for w in torch.randint(3, 9, (extra,))], reverse=True)
    a, b = MLP(12, shallow, 4, bias=True), MLP(12, deep_widths, 4, bias=True)
    x = _flat(seed=seed)
    out, _ = deepen(a, b, x, similarity="neurons")
    assert describe(out).depth == len(deep_widths)
    with torch.no_grad():
        assert torch.allclose(out(x), a(x), atol=1e-5)


def test_deepen_refuses_a_deeper_model():
    a, b, x = _pair("mlp")
    with pytest.raises(HetfuseError, match="adds layers"):
        deepen(b, a, x)
    with pytest.raises(HetfuseError, match="balance 'add'"):
        deepen(a, b, x, balance="merge")


# ---------------------------------------------------------------------------------------------- HMT

@given(co=st.integers(1, 6), ci=st.integers(1, 6), do=st.integers(1, 9), di=st.integers(1, 9),
       ks=st.sampled_from([1, 3]), seed=st.integers(0, 100))
@settings(max_examples=40, deadline=None)
def test_copy_layer_takes_channels_cyclically(co, ci, do, di, ks, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(co, ci, ks, ks, generator=g)
    dst = torch.randn(do, di, ks, ks, generator=g)
    out = copy_layer(dst, src)
    assert out.shape == dst.shape
    for o in range(do):
        for i in range(di):
            assert torch.equal(out[o, i], src[o % co, i % ci])
    bias = copy_layer(torch.zeros(do), torch.arange(co, dtype=torch.float32))
    assert bias.tolist() == [float(o % co) for o in range(do)]


def test_copy_layer_resizes_kernels_and_keeps_equal_shapes():
    w = torch.randn(4, 3, 3, 3)
    assert torch.equal(copy_layer(torch.zeros_like(w), w), w)
    big = copy_layer(torch.zeros(4, 3, 5, 5), w)
    assert big.shape == (4, 3, 5, 5) and torch.allclose(big[:, :, ::2, ::2], w)  # corners aligned, bilinear
    assert torch.allclose(copy_layer(torch.zeros(4, 3, 1, 1), torch.ones(4, 3, 3, 3)), torch.ones(4, 3, 1, 1))


def test_main_layers_skip_shortcuts_and_the_output_layer():
    m = UserResNet(blocks=(1, 2))
    names = [n for n, _ in main_layers(describe(m))]
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                     "layer2.1.conv1", "layer2.1.conv2"]
    assert [w for _, w in main_layers(describe(m))][0] is None  # the stem is outside every unit


def test_chain_transfer_copies_in_order_and_leaves_the_rest_of_dst():
    src, dst, x = _pair("resnet")
    res = transfer(src, dst, mapping="chain")
    n_src, n_dst = len(main_layers(describe(src))), len(main_layers(describe(dst)))
    assert len(res.pairs) == min(n_src, n_dst)
    assert res.pairs == [(a[0], b[0])
                         for a, b in zip(main_layers(describe(src)), main_layers(describe(dst)), strict=False)]
    got, before, sm = dict(res.model.named_parameters()), dict(dst.named_parameters()), dict(src.named_modules())
    copied = {b for _, b in res.pairs}
    for a, b in res.pairs:
        assert torch.equal(got[b + ".weight"], copy_layer(before[b + ".weight"], sm[a].weight))
    for name, p in before.items():
        if name.rsplit(".", 1)[0] not in copied:  # BatchNorm, shortcut projections, the classifier
            assert torch.equal(got[name], p), name


def test_cla_transfer_follows_the_alignment():
    src, dst, x = _pair("resnet")
    res = transfer(src, dst, x, mapping="cla", samples=100)
    groups = res.report["alignment"]["groups"]
    # stage 0: src block 0 -> dst block a0; stage 1: src blocks 0, 1 -> dst blocks a1[0], a1[1]
    a0, a1 = groups[0]["alignment"], groups[1]["alignment"]
    want = [("conv1", "conv1")]
    want += [(f"layer1.0.conv{k}", f"layer1.{a0[0]}.conv{k}") for k in (1, 2)]
    want += [(f"layer2.{j}.conv{k}", f"layer2.{a1[j]}.conv{k}") for j in (0, 1) for k in (1, 2)]
    assert sorted(res.pairs) == sorted(want)
    with pytest.raises(HetfuseError, match="shallower network into a deeper"):
        transfer(dst, src, x, mapping="cla", samples=100)


@pytest.mark.parametrize("then", [None, "avg", "ot"])
def test_transferring_a_model_into_itself_gives_it_back(then):
    _, model, x = _pair("mlp")
    res = transfer(model, model, x, mapping="chain", then=then, repair="none")
    with torch.no_grad():
        assert torch.allclose(res.model(x[:50]), model(x[:50]), atol=1e-4)


def test_naive_average_is_the_parameter_mean():
    a, b = MLP(12, [10, 8], 4, bias=True), MLP(12, [10, 8], 4, bias=True)
    avg = average_weights([a, b])
    for k, v in avg.state_dict().items():
        assert torch.allclose(v, (a.state_dict()[k] + b.state_dict()[k]) / 2)
    with pytest.raises(HetfuseError, match="one architecture"):
        average_weights([a, MLP(12, [10, 9], 4, bias=True)])


# ---------------------------------------------------------------------------------------------- commands

def test_initialisation_commands_run_end_to_end(tmp_path, capsys):
    from hetfuse.cli import main
    from hetfuse.io import load_checkpoint

    a, b = train_digits_pair(tmp_path)
    common = ["--dataset", "digits", "--quiet"]
    deep = tmp_path / "deep.safetensors"
    assert main(["deepen", str(a), "--like", str(b), "--out", str(deep)] + common) == 0
    assert "1→1" in capsys.readouterr().out
    m_a, _ = load_checkpoint(a)
    m_d, meta = load_checkpoint(deep)
    x = torch.randn(20, 64)
    assert describe(m_d).depth == 3 and torch.allclose(m_d(x), m_a(x), atol=1e-5)
    assert meta["deepened_from"] == str(a)
    for mapping, then in (("chain", None), ("cla", "ot"), ("chain", "avg")):
        out = tmp_path / f"t-{mapping}-{then}.safetensors"
        args = ["transfer", str(a), str(b), "--mapping", mapping, "--out", str(out), "--samples", "200"]
        assert main(args + (["--then", then] if then else []) + common) == 0
        assert describe(load_checkpoint(out)[0]).widths == describe(load_checkpoint(b)[0]).widths
    ft = tmp_path / "ft.safetensors"
    assert main(["finetune", str(deep), "--epochs", "2", "--batch-size", "64", "--out", str(ft)] + common) == 0
    _, meta = load_checkpoint(ft)
    assert meta["finetuned_from"] == str(deep) and len(meta["history"]) == 2 and "test_accuracy" in meta
    assert main(["finetune", str(deep), "--epochs", "3", "--batch-size", "64", "--out", str(ft)] + common) == 1
    assert "other settings" in capsys.readouterr().err
    assert main(["finetune", str(deep), "--epochs", "3", "--batch-size", "64", "--out", str(ft), "--restart"]
                + common) == 0
    assert len(load_checkpoint(ft)[1]["history"]) == 3
    st = tmp_path / "st.safetensors"
    assert main(["distill", "--teacher", str(b), "--student", "random:mlp:16", "--temperature", "4", "--alpha",
                 "0.7", "--epochs", "1", "--batch-size", "64", "--out", str(st)] + common) == 0
    _, meta = load_checkpoint(st)
    assert meta["temperature"] == 4.0 and meta["student_init"] == "random:mlp:16"
    assert main(["finetune", str(a), "--out", str(b)] + common) == 1  # another checkpoint is not overwritten
    assert "not a run to resume" in capsys.readouterr().err
