"""The torch.export tracer (:func:`hetfuse.graph.export_trace.export_graph`): the rebuilt GraphModule computes what
the model computes, is rooted at the model, and describes like the model's torch.fx trace; Hugging Face models
(when transformers is installed) export to modules, get_attr nodes and torch functions."""

import operator
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetfuse.errors import UnsupportedModelError
from hetfuse.graph import check_permutation_invariance, describe
from hetfuse.graph.export_trace import export_graph
from hetfuse.models import build_model
from models_zoo_for_tests import HandViT, make

pytestmark = pytest.mark.usefixtures("one_thread")


class _Result(NamedTuple):
    logits: torch.Tensor
    inputs: torch.Tensor


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(n, seed=0):
    return torch.randint(0, 40, (n, 6), generator=torch.Generator().manual_seed(seed))


def _zoo(spec, **shape):
    torch.manual_seed(0)
    return build_model(spec, **shape).eval()


VIT = dict(input_dim=3, output_dim=10, input_shape=(3, 32, 32))
ZOO = {
    "vit-cls": (lambda: _zoo("vit:depth=2,dim=16,heads=4,patch=8", **VIT), _images),
    "vit-mean": (lambda: _zoo("vit:depth=2,dim=16,heads=4,patch=8,pool=mean", **VIT), _images),
    "bert": (lambda: _zoo("bert:depth=2,dim=16,heads=4,vocab=40,seq=6", input_dim=6, output_dim=10,
                          input_shape=(6,)), _tokens),
    "hand-vit": (lambda: (torch.manual_seed(0), HandViT().eval())[1], _images),
}


def _same_function(gm, model, x):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)


def _shape_of(graph):
    return [(s.size, s.stream, len(s.members), len(s.out_members())) for s in graph.spaces]


def _rooted_at(gm, model):
    own_modules = dict(model.named_modules())
    for name, mod in gm.named_modules():
        if name and type(mod) is not nn.Module:  # plain modules stand for parents the graph does not call
            assert own_modules[name] is mod
    state = model.state_dict()
    for k, v in gm.state_dict().items():
        assert v is state[k] or v.data_ptr() == state[k].data_ptr()


@pytest.mark.parametrize("kind", list(ZOO))
def test_exported_transformers_compute_and_describe_like_the_model(kind):
    build, inputs = ZOO[kind]
    model = build()
    x, other = inputs(4), inputs(5, 1)
    gm = export_graph(model, x)
    assert isinstance(gm, torch.fx.GraphModule)
    _same_function(gm, model, other)  # any batch size: the batch axis is exported as dynamic
    _rooted_at(gm, model)
    assert not model.training
    # every layer is its module, nothing is left as an ATen op
    layers = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert layers == {name for name, m in model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding))}
    assert not [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    ref, got = describe(model, x), describe(gm, x)
    assert _shape_of(got) == _shape_of(ref)
    assert got.attention == ref.attention and len(got.attention) == 2
    assert got.layer_modules == ref.layer_modules
    assert {m.name for s in got.spaces for m in s.members} == {m.name for s in ref.spaces for m in s.members}
    for seed in range(2):
        check_permutation_invariance(gm, got, other, seed=seed)


def test_nodes_keep_their_module_paths():
    model = ZOO["vit-cls"][0]()
    gm = export_graph(model, _images(2))
    attention = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    path, cls = list(attention.meta["nn_module_stack"].values())[-1]
    assert path == "blocks.0.attn" and cls is type(model.blocks[0].attn)
    token = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "cls_token")
    assert token.users and next(iter(token.users)).target == "expand"
    pooled = next(n for n in gm.graph.nodes if n.target is operator.getitem and n.args[1] == (slice(None), 0))
    assert "nn_module_stack" not in pooled.meta  # code of the root module, as symbolic_trace records it


@pytest.mark.parametrize("kind", ["mlp-bn1d", "resnet-projection", "resnet-bottleneck", "mobilenet-depthwise"])
def test_convolutional_zoo_models_with_in_place_ops_export(kind):
    """``out += shortcut``, ``nn.ReLU(inplace=True)`` and ``nn.ReLU6(inplace=True)`` become functional ops."""
    model = make(kind)
    x = torch.randn(3, *((12,) if kind == "mlp-bn1d" else (3, 32, 32)), generator=torch.Generator().manual_seed(0))
    gm = export_graph(model, x)
    _same_function(gm, model, x)
    assert not [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert _shape_of(describe(gm, x)) == _shape_of(describe(model, x))


def test_an_in_place_op_whose_old_value_is_read_later_stays_in_place():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            v = h.view(h.shape[0], 2, 4)  # a view taken before the mutation, read after it
            h.relu_()
            return self.b(v.flatten(1))

    model = Net().eval()
    x = torch.randn(4, 6)
    gm = export_graph(model, x)
    _same_function(gm, model, x)
    assert any(n.target is torch.ops.aten.relu_.default for n in gm.graph.nodes)


def test_a_layer_applied_unlike_its_module_is_refused():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.conv2d(x, self.conv.weight, self.conv.bias, stride=2).mean(dim=(2, 3)))

    with pytest.raises(UnsupportedModelError, match=r"'conv' \(Conv2d\) with stride \(2, 2\).*\(1, 1\)"):
        export_graph(Strided(), torch.randn(2, 3, 9, 9))

    class Eps(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(F.layer_norm(x, (5,), self.ln.weight, self.ln.bias, eps=1e-3))

    with pytest.raises(UnsupportedModelError, match=r"'ln' \(LayerNorm\) with eps 0.001"):
        export_graph(Eps(), torch.randn(2, 5))

    class OtherBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)
            self.shift = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.shift)

    with pytest.raises(UnsupportedModelError, match=r"'fc' \(Linear\) but its bias is not the module's"):
        export_graph(OtherBias(), torch.randn(2, 5))


def test_weights_that_are_not_a_linear_s_own_stay_functional():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 5))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.linear(x, self.w[:4]))

    model = Packed().eval()
    x = torch.randn(3, 5)
    gm = export_graph(model, x)
    _same_function(gm, model, x)
    lin = next(n for n in gm.graph.nodes if n.target is F.linear)
    segment = lin.args[1]
    assert segment.target is operator.getitem and segment.args[1] == slice(None, 4)
    assert segment.args[0].op == "get_attr" and segment.args[0].target == "w"


def test_what_torch_export_refuses_is_named():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(UnsupportedModelError, match="torch.export refused DataDependent"):
        export_graph(DataDependent(), torch.randn(2, 4))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return _Result(self.fc(x), x)

    with pytest.raises(UnsupportedModelError, match="returns a"):
        export_graph(Pair(), torch.randn(2, 4))


def test_the_model_keeps_its_mode_and_the_module_returns_tuples():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 2), nn.Dropout(0.5)

        def forward(self, x):
            h = self.drop(self.fc(x))
            return h, h + 1

    model = Two().train()
    x = torch.randn(3, 4)
    gm = export_graph(model, x)
    assert model.training and model.fc.training
    model.eval()
    with torch.no_grad():
        for a, b in zip(gm(x), model(x), strict=True):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- Hugging Face (transformers 5)


class _Field(nn.Module):
    """A Hugging Face model whose forward returns one field of its output (``logits``, ``last_hidden_state``)."""

    def __init__(self, model, field):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x):
        return getattr(self.model(x), self.field)


def _hf(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 attn_implementation="sdpa")
    if name.startswith("Bert"):
        config = transformers.BertConfig(vocab_size=40, max_position_embeddings=16, num_labels=3, **small)
        cls = getattr(transformers, name)
        field = "logits" if name == "BertForSequenceClassification" else "last_hidden_state"
        return _Field(cls(config), field).eval(), _tokens
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)
    return _Field(transformers.ViTForImageClassification(config), "logits").eval(), _images


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification", "ViTForImageClassification"])
def test_hugging_face_models_export_to_modules_and_torch_functions(name):
    wrapper, inputs = _hf(name)
    assert wrapper.model.config._attn_implementation == "sdpa"
    x = inputs(4)
    gm = export_graph(wrapper, x)
    _same_function(gm, wrapper, inputs(5, 1))
    _rooted_at(gm, wrapper)
    modules = dict(wrapper.named_modules())
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert all(isinstance(modules[t], (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding)) for t in called)
    assert any(t.endswith("attention.self.query") or t.endswith("attention.q_proj") for t in called)
    assert sum(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes) == 2
    assert not any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    if name.startswith("Bert"):
        attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        assert any(t.endswith("embeddings.position_ids") for t in attrs)  # a buffer read directly
        assert not any(k.endswith("position_ids") for k in gm.state_dict())  # still not persistent
    # describe either follows the model or names what it cannot follow
    try:
        describe(gm, x)
    except UnsupportedModelError as exc:
        assert "node '" in str(exc) or "output" in str(exc)


def test_layer_configurations_and_functions_map_to_modules_and_torch_calls():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding="same")
            self.bn = nn.BatchNorm2d(6, affine=False)
            self.ln = nn.LayerNorm(6, elementwise_affine=False)
            self.act = nn.GELU(approximate="tanh")
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
            h = F.avg_pool2d(h, 2).permute(0, 2, 3, 1)  # N x H x W x C
            h = self.act(self.ln(h)).permute(0, 3, 1, 2)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    model = Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 16, 16)
    gm = export_graph(model, x)
    _same_function(gm, model, x)
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"conv", "bn", "ln", "fc"}
    gelu = next(n for n in gm.graph.nodes if n.target is F.gelu)
    assert gelu.kwargs == {"approximate": "tanh"}
    targets = {n.target for n in gm.graph.nodes}
    assert {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten, torch.relu, "permute"} <= targets
    assert not [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
