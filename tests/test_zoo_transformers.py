"""Model zoo: the pre-LN transformer encoders (vit, bert): arch strings, shapes, tracing, stable weight names, the
zero-block identity and a short training run."""

import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from hetfuse.models import ZOO, Attention, BertEncoder, ViT, build_model, list_archs, model_from_arch, parse_arch

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_SPECS = ["vit:depth=2,dim=16,heads=2,patch=4,mlp=32",
             "vit:depth=2,dim=16,heads=2,patch=4,mlp=32,qkv=1",
             "vit:depth=2,dim=16,heads=4,patch=4,mlp=32,pool=mean",
             "vit:depth=1,dim=16,heads=2,patch=2,pool=mean,qkv=1"]
BERT_SPECS = ["bert:depth=2,dim=16,heads=2,vocab=50,seq=8,mlp=32",
              "bert:depth=1,dim=16,heads=4,vocab=50,seq=8,pool=mean"]
IMAGE = (1, 8, 8)


def _build(spec, output_dim=5):
    if spec.startswith("bert"):
        return build_model(spec, input_dim=8, output_dim=output_dim)
    return build_model(spec, input_dim=64, output_dim=output_dim, input_shape=IMAGE)


def _example(spec, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if spec.startswith("bert"):
        return torch.randint(0, 50, (n, 8), generator=g)
    return torch.randn(n, *IMAGE, generator=g)


# ----------------------------------------------------------------------------------------------- arch strings


def test_defaults_and_parsing():
    p = lambda s, **kw: parse_arch(s, input_dim=3072, output_dim=10, **kw)  # noqa: E731
    assert p("vit") == {"type": "vit", "depth": 4, "dim": 64, "heads": 4, "patch": 4, "mlp": 256, "pool": "cls",
                        "qkv": 3, "num_classes": 10, "in_channels": 3, "image_size": [32, 32]}
    assert p("vit:depth=4,dim=64,heads=4,patch=4,mlp=128") == dict(p("vit"), mlp=128)
    assert p("vit:dim=32")["mlp"] == 128  # mlp defaults to 4 * dim
    assert p(" ViT : Pool=MEAN , qkv=1 ") == dict(p("vit"), pool="mean", qkv=1)
    a = parse_arch("vit:patch=7", input_dim=784, output_dim=7, input_shape=(1, 28, 28))
    assert (a["in_channels"], a["image_size"], a["num_classes"]) == (1, [28, 28], 7)
    assert parse_arch("vit:patch=4", input_dim=1, output_dim=2, input_shape=(3, 12, 16))["image_size"] == [12, 16]
    assert p("bert") == {"type": "bert", "depth": 2, "dim": 64, "heads": 4, "vocab": 1000, "seq": 32, "mlp": 256,
                         "pool": "cls", "num_classes": 10}
    assert p("bert:depth=3,dim=32,heads=8,vocab=500,seq=16,mlp=40,pool=mean") == {
        "type": "bert", "depth": 3, "dim": 32, "heads": 8, "vocab": 500, "seq": 16, "mlp": 40, "pool": "mean",
        "num_classes": 10}
    # a one-dimensional input shape is the sequence length
    assert p("bert", input_shape=(16,))["seq"] == 16
    assert p("bert:seq=16", input_shape=(16,))["seq"] == 16
    assert isinstance(build_model("bert", input_dim=32, output_dim=3), BertEncoder)
    assert isinstance(build_model("vit", input_dim=3072, output_dim=3, input_shape=(3, 32, 32)), ViT)


@pytest.mark.parametrize("spec,match", [
    ("vit:width=2", r"unknown option 'width=2'.*valid options: depth=<int>, dim=<int>, heads=<int>, patch=<int>, "
                    r"mlp=<int>, pool=cls\|mean, qkv=3\|1"),
    ("vit:depth", "unknown option 'depth'"),
    ("vit:bn", "valid options: depth="),
    ("bert:qkv=1", "valid options: depth=<int>, dim=<int>, heads=<int>, vocab=<int>, seq=<int>, mlp=<int>, "
                   r"pool=cls\|mean$"),
    ("bert:patch=4", "unknown option"),
    ("vit:depth=2,depth=3", "'depth' given twice"),
    ("bert:pool=cls,pool=mean", "'pool' given twice"),
    ("vit:dim=abc", "bad dim 'abc'.*integer"),
    ("vit:dim=1.5", "bad dim"),
    ("vit:depth=0", "positive"),
    ("bert:vocab=-3", "positive"),
    ("vit:pool=max", "bad pool 'max'.*cls, mean"),
    ("vit:qkv=2", "bad qkv"),
    ("vit:dim=30,heads=4", "dim 30 is not divisible by heads 4"),
    ("bert:dim=10,heads=3", "not divisible"),
    ("vit:patch=5", r"patch 5 does not divide the image size 32x32"),
    ("vitt", "unknown architecture.*vit.*bert"),
])
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_arch(spec, input_dim=3072, output_dim=10)


def test_input_shape_errors():
    with pytest.raises(ValueError, match="patch 4 does not divide the image size 28x30"):
        parse_arch("vit", input_dim=1, output_dim=10, input_shape=(1, 28, 30))
    with pytest.raises(ValueError, match="input_shape must be"):
        parse_arch("vit", input_dim=784, output_dim=10, input_shape=(784,))
    with pytest.raises(ValueError, match=r"bert takes token ids.*\(1, 28, 28\)"):
        parse_arch("bert", input_dim=784, output_dim=10, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="seq=8 but the inputs hold 16 tokens"):
        parse_arch("bert:seq=8", input_dim=16, output_dim=10, input_shape=(16,))
    with pytest.raises(ValueError, match="not divisible"):
        ViT(dim=30, heads=4)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ViT(patch=5, image_size=(32, 32))
    with pytest.raises(ValueError, match="pool"):
        BertEncoder(pool="max")
    with pytest.raises(ValueError, match="qkv"):
        Attention(16, 2, qkv=2)
    with pytest.raises(ValueError, match="not a ViT"):
        ViT.from_arch({"type": "bert"})
    with pytest.raises(ValueError, match="unknown architecture type"):
        model_from_arch({"type": "gpt"})


def test_zoo_listing():
    assert {"vit", "bert"} <= set(ZOO)
    examples = [s for s in list_archs() if s.partition(":")[0] in ("vit", "bert")]
    assert [s.partition(":")[0] for s in examples] == ["vit", "bert"]
    for spec in examples:
        arch = parse_arch(spec, input_dim=3072, output_dim=10)
        assert arch["mlp"] == 128 and arch["dim"] == 64


# ----------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("spec", VIT_SPECS + BERT_SPECS)
def test_forward_trace_export_and_roundtrip(spec):
    torch.manual_seed(0)
    model = _build(spec).eval()
    x = _example(spec)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 5) and torch.isfinite(y).all()
    # deterministic under torch.manual_seed
    torch.manual_seed(0)
    again = _build(spec).eval()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        assert torch.equal(again(x), y)
        # the outputs depend on each example alone (no mixing across the batch)
        torch.testing.assert_close(model(x[:1]), y[:1], rtol=1e-5, atol=1e-6)

    gm = fx.symbolic_trace(model)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == model.depth
    ep = torch.export.export(model, (x,))
    x2 = _example(spec, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)
        torch.testing.assert_close(ep.module()(x), y)
        torch.testing.assert_close(gm(x2), model(x2))
        torch.testing.assert_close(ep.module()(x2), model(x2))

    arch = model.arch()
    assert arch == parse_arch(spec, input_dim=64 if spec.startswith("vit") else 8, output_dim=5,
                              input_shape=IMAGE if spec.startswith("vit") else None)
    rebuilt = model_from_arch(json.loads(json.dumps(arch)))  # checkpoint metadata is JSON
    assert type(rebuilt) is type(model) and rebuilt.arch() == arch
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), y)


@pytest.mark.parametrize("spec", [VIT_SPECS[1], BERT_SPECS[0]])
def test_checkpoint_roundtrip(spec, tmp_path):
    from hetfuse.io import load_checkpoint, save_checkpoint

    model = _build(spec).eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.arch() == model.arch()
    x = _example(spec)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def _block_keys(i, fused):
    proj = ["qkv"] if fused else ["q", "k", "v"]
    keys = [f"blocks.{i}.norm1.weight", f"blocks.{i}.norm1.bias"]
    keys += [f"blocks.{i}.attn.{p}.{w}" for p in [*proj, "proj"] for w in ("weight", "bias")]
    keys += [f"blocks.{i}.norm2.weight", f"blocks.{i}.norm2.bias"]
    keys += [f"blocks.{i}.mlp.{p}.{w}" for p in ("fc1", "fc2") for w in ("weight", "bias")]
    return keys


def test_state_dict_names_and_shapes():
    vit = _build("vit:depth=2,dim=16,heads=2,patch=4,mlp=24")
    sd = vit.state_dict()
    assert list(sd) == ["cls_token", "pos_embed", "patch.weight", "patch.bias", *_block_keys(0, False),
                        *_block_keys(1, False), "norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert sd["patch.weight"].shape == (16, 1, 4, 4)
    assert sd["cls_token"].shape == (1, 1, 16) and sd["pos_embed"].shape == (1, 4 + 1, 16)
    assert sd["blocks.0.attn.q.weight"].shape == (16, 16) and sd["blocks.1.mlp.fc1.weight"].shape == (24, 16)
    assert sd["head.weight"].shape == (5, 16)

    fused = _build("vit:depth=1,dim=16,heads=2,patch=2,pool=mean,qkv=1").state_dict()
    assert "cls_token" not in fused and fused["pos_embed"].shape == (1, 16, 16)
    assert set(_block_keys(0, True)) <= set(fused) and fused["blocks.0.attn.qkv.weight"].shape == (48, 16)
    assert not any(".attn.q." in k for k in fused)

    bert = _build("bert:depth=1,dim=16,heads=2,vocab=50,seq=8,mlp=24").state_dict()
    assert list(bert) == ["pos_embed", "embed.weight", *_block_keys(0, False), "norm.weight", "norm.bias",
                          "head.weight", "head.bias"]
    assert bert["embed.weight"].shape == (50, 16) and bert["pos_embed"].shape == (1, 8, 16)


def test_attention_is_standard_multi_head_attention():
    """Both projection styles compute softmax(q k^T / sqrt(d)) v per head; the fused weight stacks q, k, v."""
    torch.manual_seed(0)
    sep = Attention(12, 3, qkv=3).eval()
    fused = Attention(12, 3, qkv=1).eval()
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([sep.q.weight, sep.k.weight, sep.v.weight]))
        fused.qkv.bias.copy_(torch.cat([sep.q.bias, sep.k.bias, sep.v.bias]))
        fused.proj.load_state_dict(sep.proj.state_dict())
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        def heads(t):
            return t.view(2, 5, 3, 4).transpose(1, 2)

        q, k, v = heads(sep.q(x)), heads(sep.k(x)), heads(sep.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
        ref = sep.proj(att.transpose(1, 2).reshape(2, 5, 12))
        torch.testing.assert_close(sep(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-6)


def _insert_zero_block(small, big, at):
    """Copy ``small``'s weights into ``big`` (one block more), with ``big``'s block ``at`` the extra one, its
    ``attn.proj`` and ``mlp.fc2`` zeroed (the rest of that block keeps its random weights)."""
    mapping = {}
    for k, v in small.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            i = int(i) + (1 if int(i) >= at else 0)
            k = f"blocks.{i}.{rest}"
        mapping[k] = v
    sd = big.state_dict()
    assert set(sd) - set(mapping) == {k for k in sd if k.startswith(f"blocks.{at}.")}
    sd.update(mapping)
    big.load_state_dict(sd)


@pytest.mark.parametrize("family,at", [("vit", 1), ("vit-fused", 0), ("vit-mean", 2), ("bert", 1)])
def test_zero_block_is_identity(family, at):
    """Pre-LN: a block whose attn.proj and mlp.fc2 are zero adds nothing, so depth 3 with one such block = depth 2."""
    opts = {"vit": "patch=4", "vit-fused": "patch=4,qkv=1", "vit-mean": "patch=2,pool=mean",
            "bert": "vocab=50,seq=8"}[family]
    name = family.partition("-")[0]
    torch.manual_seed(0)
    small = _build(f"{name}:depth=2,dim=16,heads=2,mlp=32,{opts}").eval()
    torch.manual_seed(1)
    big = _build(f"{name}:depth=3,dim=16,heads=2,mlp=32,{opts}").eval()
    x = _example(name)
    _insert_zero_block(small, big, at)
    extra = big.blocks[at]
    with torch.no_grad():
        differs = (big(x) - small(x)).abs().max()
        for lin in (extra.attn.proj, extra.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-6)
    assert differs > 1e-3  # the extra block did something before it was zeroed


def test_training_reduces_loss():
    from hetfuse.train import train_model

    g = torch.Generator().manual_seed(0)
    n, classes = 96, 3
    y = torch.arange(n) % classes
    prototypes = torch.randn(classes, *IMAGE, generator=g)
    x = prototypes[y] + 0.5 * torch.randn(n, *IMAGE, generator=g)
    torch.manual_seed(0)
    model = _build("vit:depth=1,dim=16,heads=2,patch=4,mlp=32", output_dim=classes)
    hist = train_model(model, x, y, epochs=6, lr=0.05, momentum=0.9, batch_size=16, seed=0, progress=False)
    assert len(hist) == 6
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert hist[-1]["train_acc"] > 90.0
    assert not model.training
