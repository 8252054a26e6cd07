"""Transformers in the description and the fusion engine: the residual stream (embeddings, position embeddings, a
class token, every LayerNorm), feed-forward spaces and attention heads, derived by tracing and checked by
permuting; heads matched as whole units; depth balancing with zero (identity) layers. The conformance suite runs
every method over the transformer kinds of ``models_zoo_for_tests``; these tests check what is particular to
attention."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from hetfuse import FusionConfig, fuse, load_model, prepare_fusion, save_model
from hetfuse.errors import DataError, HetfuseError, UnsupportedModelError
from hetfuse.graph import check_permutation_invariance, describe, depth_groups, permute_state, permuted_copy
from hetfuse.graph.spec import head_permutation
from hetfuse.match.heads import head_structured
from hetfuse.models import build_model
from models_zoo_for_tests import HandViT, inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(depth=2, **kw):
    opts = ",".join(f"{k}={v}" for k, v in {"depth": depth, "dim": 16, "heads": 4, "patch": 8, **kw}.items())
    return build_model(f"vit:{opts}", input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()


def test_the_stream_holds_embeddings_positions_class_token_and_every_layernorm():
    model = make("vit-hand")
    g = describe(model, example=inputs("vit-hand", 2, 0))
    stream = [s for s in g.spaces if s.stream]
    assert len(stream) == 1
    names = {m.name for m in stream[0].members}
    assert {"embed.weight", "embed.bias", "cls", "pos", "ln.weight", "ln.bias", "fc.weight"} <= names
    for k in range(2):
        assert {f"layers.{k}.ln_a.weight", f"layers.{k}.attn.q.weight", f"layers.{k}.attn.k.weight",
                f"layers.{k}.attn.v.weight", f"layers.{k}.attn.out.weight", f"layers.{k}.attn.out.bias",
                f"layers.{k}.up.weight", f"layers.{k}.down.bias"} <= names
    by_name = {s.name: i for i, s in enumerate(g.spaces)}
    assert [(a.qk, a.v, a.heads) for a in g.attention] == [
        (by_name[f"layers.{k}.attn.q"], by_name[f"layers.{k}.attn.v"], 4) for k in range(2)]
    qk = g.spaces[g.attention[0].qk]
    assert {m.name for m in qk.members} == {"layers.0.attn.q.weight", "layers.0.attn.q.bias",
                                            "layers.0.attn.k.weight", "layers.0.attn.k.bias"}
    assert {m.name for m in g.spaces[g.attention[0].v].members} == {
        "layers.0.attn.v.weight", "layers.0.attn.v.bias", "layers.0.attn.out.weight"}
    assert [len(gr.units) for gr in depth_groups(g)] == [2]  # one unit per layer: attention + feed-forward


@pytest.mark.parametrize("kind", ["vit-hand", "vit-zoo", "bert-zoo"])
def test_permuting_every_space_heads_as_units_leaves_the_function_unchanged(kind):
    model = make(kind)
    x = inputs(kind, 6, 1)
    g = describe(model, example=x)
    assert g.attention and g.feature_last
    for seed in range(3):
        check_permutation_invariance(model, g, x, seed=seed)


def test_a_permutation_across_heads_changes_the_function_so_the_heads_constraint_is_real():
    model = make("vit-hand")
    x = inputs("vit-hand", 6, 1)
    g = describe(model, example=x)
    att = g.attention[0]
    for s in (att.qk, att.v):
        perm = torch.arange(g.spaces[s].size)
        perm[[0, 4]] = perm[[4, 0]]  # swap a neuron of head 0 with one of head 1 (head dim 4)
        clone = HandViT().eval()
        clone.load_state_dict(permute_state(model.state_dict(), g.spaces[s], perm))
        with torch.no_grad():
            assert (clone(x) - model(x)).abs().max() > 1e-4
    # a whole-head swap, the same in both spaces, changes nothing
    state = model.state_dict()
    for s in (att.qk, att.v):
        state = permute_state(state, g.spaces[s], head_permutation(torch.tensor([1, 0, 2, 3]),
                                                                   [torch.arange(4)] * 4))
    clone = HandViT().eval()
    clone.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_check_catches_a_position_embedding_left_out_of_the_stream():
    model = make("vit-hand")
    x = inputs("vit-hand", 6, 1)
    g = describe(model, example=x)
    stream = next(s for s in g.spaces if s.stream)
    stream.members = [m for m in stream.members if m.name != "pos"]
    with pytest.raises(AssertionError):
        check_permutation_invariance(model, g, x)


def _brute_force(scores, heads):
    """max over every head-structured permutation (head order shared, any order within heads) of the summed
    scores."""
    d = scores[0].shape[0] // heads
    best = -np.inf
    for order in itertools.permutations(range(heads)):
        total = 0.0
        for c in scores:
            for a, b in enumerate(order):
                block = c[a * d:(a + 1) * d, b * d:(b + 1) * d]
                total += max(sum(block[i, p[i]] for i in range(d)) for p in itertools.permutations(range(d)))
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_heads_as_units_is_the_best_head_structured_permutation(seed):
    rng = np.random.default_rng(seed)
    heads, d = (3, 2) if seed % 2 else (2, 3)
    scores = [rng.normal(size=(heads * d, heads * d)) for _ in range(2)]
    cols = head_structured(scores, heads)
    for c in cols:
        assert sorted(c) == list(range(heads * d))
        blocks = {(j // d, int(c[j]) // d) for j in range(heads * d)}
        assert len(blocks) == heads  # whole heads map to whole heads
    assert {j // d: int(cols[0][j]) // d for j in range(heads * d)} == \
        {j // d: int(cols[1][j]) // d for j in range(heads * d)}  # the same head order in both spaces
    got = sum(s[np.arange(heads * d), c].sum() for s, c in zip(scores, cols, strict=True))
    assert got == pytest.approx(_brute_force(scores, heads))


@pytest.mark.parametrize("match", ["perm-acts", "perm-weights", "ot-acts", "ot-weights"])
def test_permutation_matchers_align_another_model_without_changing_its_function(match):
    """Two independently initialised models: the target's neighbour moved into the target's neuron order (weights
    0, 1, no repair) computes exactly what it computed before, which needs heads matched as whole units."""
    x = inputs("vit-hand", 48, 1)
    a, b = make("vit-hand", 0), make("vit-hand", 1)
    prep = prepare_fusion([a, b], x, FusionConfig(match=match, samples=48, repair="none", target=0))
    moved = prep.combine([0.0, 1.0], repair=False)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), b(x), rtol=1e-4, atol=1e-5)
    for att in prep.graph.attention:
        for s in (att.qk, att.v):
            m = prep.match.maps[1][s].out
            d = m.shape[0] // att.heads
            heads = (m.reshape(att.heads, d, att.heads, d).sum((1, 3)) > 0).sum(1)
            assert bool((heads == 1).all())  # each head of b goes to exactly one head of the target


def test_a_planted_head_permutation_is_recovered():
    x = inputs("vit-hand", 48, 1)
    model = make("vit-hand")
    g = describe(model, example=x[:2])
    twin, perms = permuted_copy(model, g, seed=4)
    prep = prepare_fusion([twin, model], x, FusionConfig(match="perm-acts", samples=48, repair="none", target=1))
    for att in g.attention:
        for s in (att.qk, att.v):
            cols = prep.match.maps[0][s].out.argmax(1)  # twin's neuron j -> target neuron cols[j]
            assert torch.equal(cols, perms[s])  # twin's neuron j is the model's neuron perms[s][j]


def test_soft_transport_keeps_heads_whole_and_says_the_attention_is_approximate():
    x = inputs("vit-hand", 32, 1)
    prep = prepare_fusion([make("vit-hand", 0), make("vit-hand", 1)], x,
                          FusionConfig(match="ot-acts", samples=32, solver="sinkhorn", reg=0.05))
    from hetfuse.match.heads import keeps_heads

    for att in prep.graph.attention:
        for s in (att.qk, att.v):
            m = prep.match.maps[1][s].out
            assert keeps_heads(m, att.heads, exact=False) and not keeps_heads(m, att.heads)
    assert any("transported, not permuted" in n for n in prep.report["notes"])


def test_depth_different_vits_fuse_into_the_deeper_depth():
    x = inputs("vit-hand", 48, 1)
    torch.manual_seed(0)
    res = fuse([_vit(1), _vit(3)], x, samples=32)
    g = describe(res.model, example=x[:2])
    assert len(depth_groups(g)[0].units) == 3 and len(g.attention) == 3
    with torch.no_grad():
        assert bool(torch.isfinite(res.model(x)).all())


def test_fused_transformers_save_and_load(tmp_path):
    x = inputs("vit-hand", 48, 1)
    torch.manual_seed(0)
    res = fuse([_vit(1), _vit(2)], x, samples=32)
    path = tmp_path / "fused.safetensors"
    save_model(res.model, path)
    again = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(again(x[:4]), res.model(x[:4]))


def test_token_models_need_token_ids():
    model = make("bert-zoo")
    with pytest.raises(DataError, match="token ids"):
        fuse([model, model], torch.randn(20, 6), samples=16)


def test_layernorm_on_a_fully_connected_layer_moves_with_its_neurons():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)
            nn.init.normal_(self.ln.weight)
            nn.init.normal_(self.ln.bias)

        def forward(self, x):
            return self.b(torch.relu(self.ln(self.a(x))))

    model = Net().eval()
    g = describe(model)
    assert {m.name for m in g.spaces[0].members} >= {"ln.weight", "ln.bias"}
    check_permutation_invariance(model, g, torch.randn(10, 5))


def test_a_fused_qkv_projection_is_split_into_its_query_key_and_value_parts():
    model = make("vit-fused-qkv")
    x = inputs("vit-fused-qkv", 8, 1)
    g = describe(model, example=x[:2])
    qk, v = g.spaces[g.attention[0].qk], g.spaces[g.attention[0].v]
    assert {(m.name, m.offset) for m in qk.members} == {
        ("blocks.0.attn.qkv.weight", 0), ("blocks.0.attn.qkv.bias", 0), ("blocks.0.attn.qkv.weight", 16),
        ("blocks.0.attn.qkv.bias", 16)}
    assert {(m.name, m.offset) for m in v.members} >= {("blocks.0.attn.qkv.weight", 32), ("blocks.0.attn.qkv.bias", 32)}
    info = next(mi for mi in g.modules if mi.name == "blocks.0.attn.qkv")
    assert info.out_parts == [g.attention[0].qk, g.attention[0].qk, g.attention[0].v]
    assert len(g.headed) == 6  # each part is read as N x heads x tokens x d


def test_what_the_description_cannot_follow_is_named():
    class Masked(nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.causal = causal
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            n, t, _ = x.shape
            q, k, v = (f(x).view(n, t, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
            mask = torch.ones(t, t, dtype=torch.bool)  # fx cannot trace this (a traced size): torch.export does
            if self.causal:
                mask = mask.tril()
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o(out.transpose(1, 2).reshape(n, t, 8)).mean(dim=1)

    with pytest.raises(UnsupportedModelError, match="mask"):
        describe(Masked(causal=True), example=torch.randn(2, 3, 8))
    g = describe(Masked(causal=False), example=torch.randn(2, 3, 8))  # a mask that masks nothing is dropped
    assert len(g.attention) == 1


def test_zip_keeps_heads_whole_and_the_report_would_say_when_a_matcher_did_not():
    from hetfuse.match.base import MatchResult, SpaceMap
    from hetfuse.match.heads import attention_notes

    x = inputs("vit-hand", 48, 1)
    a, b = make("vit-hand", 0), make("vit-hand", 1)
    zipped = prepare_fusion([a, b], x, FusionConfig(match="zip", samples=48, repair="none"))
    assert not any("heads" in n for n in zipped.report["notes"])
    attention = {s for att in zipped.graph.attention for s in (att.qk, att.v)}
    assert {m["space"] for m in zipped.report["match_info"]["merges"] if m["heads_as_units"]} == attention
    for att in zipped.graph.attention:  # each head of b goes to exactly one head of the target
        for s in (att.qk, att.v):
            m = zipped.match.maps[1][s].out
            d = m.shape[0] // att.heads
            assert bool(((m.reshape(att.heads, d, att.heads, d).sum((1, 3)) > 0).sum(1) == 1).all())
    # a matcher that mixed heads (here: a map swapping one neuron across two heads) gets a note
    graphs = zipped.balanced_graphs
    maps = [[SpaceMap.identity(sp.size) for sp in g.spaces] for g in graphs]
    n = graphs[1].spaces[graphs[1].attention[0].qk].size
    swap = torch.eye(n, dtype=torch.float64)[:, [4, 1, 2, 3, 0] + list(range(5, n))]
    maps[1][graphs[1].attention[0].qk] = SpaceMap(swap, swap.clone())
    notes = attention_notes(graphs, MatchResult([sp.size for sp in graphs[0].spaces], maps), 0)
    assert len(notes) == 1 and "do not move whole heads" in notes[0]


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoders_are_traced_through_and_keep_their_function(norm_first, batch_first):
    """nn.TransformerEncoder (packed in_proj_weight read as three segments): the permutation self-check, and
    another model aligned onto the target computes what it computed."""
    from models_zoo_for_tests import TorchEncoder, randomize_norms

    x = inputs("torch-encoder-preln", 40, 1)
    torch.manual_seed(0)
    a, b = (randomize_norms(TorchEncoder(norm_first, batch_first), s).eval() for s in (0, 1))
    g = describe(a, example=x[:2])
    assert len(g.attention) == 2 and {m.offset for m in g.spaces[g.attention[0].qk].members} == {0, 16}
    check_permutation_invariance(a, g, x)
    prep = prepare_fusion([a, b], x, FusionConfig(match="perm-acts", samples=40, repair="none", target=0))
    with torch.no_grad():
        torch.testing.assert_close(prep.combine([0.0, 1.0], repair=False)(x), b(x), rtol=1e-4, atol=1e-5)
    assert type(prep.combine()) is type(a)


def test_a_post_norm_depth_difference_is_balanced_with_a_warning_that_measures_the_change(tmp_path):
    from models_zoo_for_tests import TorchEncoder

    x = inputs("torch-encoder-preln", 40, 1)
    torch.manual_seed(0)
    pre = [TorchEncoder(True, depth=d).eval() for d in (2, 3)]
    res = fuse(pre, x, weights=[1.0, 0.0], samples=40, repair="none")
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), pre[0](x), rtol=1e-5, atol=1e-6)  # pre-LN: exact
    post = [TorchEncoder(False, depth=d).eval() for d in (2, 3)]
    with pytest.warns(UserWarning, match=r"change its outputs by [0-9.e-]+.*post-norm"):
        res = fuse(post, x, weights=[1.0, 0.0], samples=40, repair="none")
    assert any("post-norm" in n for n in res.report["notes"])
    save_model(res.model, tmp_path / "post.safetensors")
    again = load_model(tmp_path / "post.safetensors", base=TorchEncoder(False, depth=2))
    with torch.no_grad():
        torch.testing.assert_close(again(x), res.model(x))


def test_the_command_line_checks_transformers_and_says_which_inputs_do_not_fit(tmp_path, capsys):
    from hetfuse.cli import main

    vit = tmp_path / "vit.safetensors"
    save_model(build_model("vit:depth=1,dim=16,heads=4,patch=4", input_dim=1, output_dim=10,
                           input_shape=(1, 8, 8)), vit)
    assert main(["check", str(vit), "--image-size", "8"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["check", str(vit)]) != 0  # 32 x 32 images do not fit its 4 position embeddings
    assert "does not run on random 1x32x32 inputs (--image-size)" in capsys.readouterr().err
    bert = tmp_path / "bert.safetensors"
    save_model(make("bert-zoo"), bert)
    assert main(["check", str(bert)]) == 0
    assert "OK" in capsys.readouterr().out


def test_different_head_layouts_are_refused_naming_both():
    x = inputs("vit-hand", 32, 1)
    with pytest.raises(HetfuseError, match=r"4 heads of 4 query/key and 4 value dimensions in model 0 but 2 heads of "
                                           r"8 and 8 in model 1"):
        fuse([_vit(1, heads=4), _vit(1, heads=2)], x, samples=32)


def test_vits_of_different_widths_and_depths_fuse_by_transport_heads_as_units(tmp_path):
    """dim 16 vs 24 (4 heads of 4 vs 6 dimensions), depth 1 vs 2: OT moves whole heads onto whole heads with a
    transport inside each; weights (1, 0) onto the narrower model give it back exactly; the fused model saves."""
    x = inputs("vit-hand", 48, 1)
    torch.manual_seed(0)
    narrow, wide = _vit(1), _vit(2, dim=24)
    for match in ("ot-acts", "ot-weights"):
        res = fuse([narrow, wide], x, weights=[1.0, 0.0], samples=48, match=match, repair="none", target=0)
        with torch.no_grad():
            torch.testing.assert_close(res.model(x), narrow(x), rtol=1e-5, atol=1e-6)
        assert any("transported, not permuted" in n for n in res.report["notes"])
        assert res.report["fused_widths"][0] == 16
    res = fuse([narrow, wide], x, samples=48, match="ot-acts", target=1)  # into the wider widths
    g = describe(res.model, example=x[:2])
    assert g.spaces[0].size == 24 and [a.heads for a in g.attention] == [4, 4]
    save_model(res.model, tmp_path / "wide.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "wide.safetensors")(x), res.model(x))
    with pytest.raises(HetfuseError, match="equal widths"):
        fuse([narrow, wide], x, samples=48, match="perm-acts")


def test_a_position_embedding_is_resized_with_its_stream(tmp_path):
    """Elastic zipping widens the stream of a token model without attention: its position embedding is
    replaced by one of the fused width (a recorded edit), and the fused model saves and loads."""
    class Tokens(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.embed, self.pos = nn.Embedding(30, d), nn.Parameter(torch.randn(1, 5, d) * 0.1)
            self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 16), nn.Linear(16, d)
            self.head = nn.Linear(d, 3)

        def forward(self, ids):
            x = self.embed(ids) + self.pos
            x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
            return self.head(x.mean(dim=1))

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (40, 5))
    res = fuse([Tokens(8), Tokens(12)], ids, samples=40, match="elastic-zip", target=0)
    assert dict(res.model.named_parameters())["pos"].shape == (1, 5, 12)
    assert res.report["fused_widths"][0] == 12
    save_model(res.model, tmp_path / "tokens.safetensors")
    again = load_model(tmp_path / "tokens.safetensors", base=Tokens(8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), res.model(ids))


def test_the_command_line_trains_fuses_evaluates_and_reports_vits(tmp_path, capsys):
    from hetfuse.cli import main

    for depth in (1, 2):
        assert main(["train", "--arch", f"vit:depth={depth},dim=16,heads=4,patch=4", "--dataset", "digits",
                     "--epochs", "1", "--seed", str(depth), "--out", str(tmp_path / f"vit{depth}.safetensors"),
                     "--quiet"]) == 0
    out = tmp_path / "fused.safetensors"
    assert main(["fuse", str(tmp_path / "vit1.safetensors"), str(tmp_path / "vit2.safetensors"), "--dataset",
                 "digits", "--depth-align", "lma", "--match", "perm-acts", "--samples", "100", "--out", str(out),
                 "--report", str(tmp_path / "rep"), "--quiet"]) == 0
    assert (tmp_path / "rep" / "index.html").is_file()
    assert main(["eval", str(out), "--dataset", "digits"]) == 0
    assert main(["check", str(out), "--image-size", "8"]) == 0
    assert "OK" in capsys.readouterr().out
