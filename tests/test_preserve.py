"""Preserving the early layers (``preserve_until`` / ``--preserve-until``): every model keeps its first k depth units
as its own branch, the tail after them is merged (a :class:`~hetfuse.branches.MultiBranch`)."""

import json

import pytest
import torch

from hetfuse import FusionConfig, fuse, load_model, prepare_fusion, save_model
from hetfuse.branches import MultiBranch
from hetfuse.cli import main
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe, permuted_copy
from hetfuse.models import MLP, build_model
from models_zoo_for_tests import UserResNet, inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _pair(kind, seed=3):
    data = inputs(kind, 48, 1)
    model = make(kind, 0, data)
    x = inputs(kind, 8, 2)
    return model, permuted_copy(model, describe(model, example=x[:2]), seed=seed)[0], data, x


def test_preserving_zero_units_is_the_plain_merge():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a, b = MLP(12, [10, 8], 4, bias=True), MLP(12, [10, 8], 4, bias=True)
    plain = fuse([a, b], x, samples=32, match="perm-acts")
    for k in (0, None):
        res = fuse([a, b], x, samples=32, match="perm-acts", preserve_until=k)
        assert type(res.model) is type(plain.model) and not isinstance(res.model, MultiBranch)
        with torch.no_grad():
            assert torch.equal(res.model(x), plain.model(x))


@pytest.mark.parametrize("kind", ["mlp", "vgg-bn", "resnet-projection"])
@pytest.mark.parametrize("match", ["perm-acts", "ot-acts", "zip"])
def test_a_network_fused_with_its_permuted_copy_comes_back(kind, match):
    model, twin, data, x = _pair(kind)
    res = fuse([twin, model], data, weights=[0.3, 0.7], samples=24, match=match, preserve_until=1)
    m = res.model
    assert isinstance(m, MultiBranch) and len(m.branches) == 2
    assert res.config.preserve_until == 1 and res.report["config"]["preserve_until"] == 1
    with torch.no_grad():
        _close(m(x), model(x), 2e-4)
        _close(m.scale, torch.ones_like(m.scale))  # the branches agree: the renormalisation is the identity


@pytest.mark.parametrize("kind, k", [("vgg-bn", 3), ("resnet-projection", 2), ("vit-zoo", 1)])
def test_deeper_cuts_and_feature_last_junctions(kind, k):
    model, twin, data, x = _pair(kind)
    res = fuse([twin, model], data, samples=24, match="perm-acts", preserve_until=k)
    with torch.no_grad():
        _close(res.model(x), model(x), 2e-4)
    assert res.model.feature_axis == (-1 if kind == "vit-zoo" else 1)


def test_three_permuted_copies():
    model, _, data, x = _pair("mlp")
    g = describe(model)
    copies = [permuted_copy(model, g, seed=s)[0] for s in (1, 2)]
    res = fuse([copies[0], model, copies[1]], data, samples=24, match="perm-acts", preserve_until=1)
    assert len(res.model.branches) == 3
    with torch.no_grad():
        _close(res.model(x), model(x))


@pytest.mark.parametrize("repair", ["none", "auto"])
@pytest.mark.parametrize("target", [0, 1])
def test_all_weight_on_one_model_computes_that_model(repair, target):
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a, b = MLP(12, [10, 8, 6], 4, bias=True), MLP(12, [10, 8, 6], 4, bias=True)
    res = fuse([a, b], x, weights=[1.0, 0.0], target=target, samples=48, match="perm-acts", repair=repair,
               preserve_until=2)
    assert torch.equal(res.model.shares[1], torch.zeros(8))  # the cut after unit 2: 8 features
    with torch.no_grad():
        _close(res.model(x), a(x), 1e-5)
    # a permuted copy of a with weight 0 as well: model 0's function, whatever the other
    twin = permuted_copy(b, describe(b), seed=2)[0]
    res = fuse([b, twin], x, weights=[1.0, 0.0], samples=48, match="ot-acts", repair=repair, preserve_until=1)
    with torch.no_grad():
        _close(res.model(x), b(x), 1e-5)


def _stats(t):
    r = t.movedim(1, -1).reshape(-1, t.shape[1]).double() if t.dim() > 2 else t.double()
    return r.mean(0), r.std(0, unbiased=False)


def test_the_junction_gets_the_share_weighted_statistics_of_the_branches():
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    a, b = MLP(12, [10, 8, 6], 4, bias=True), MLP(12, [10, 8, 6], 4, bias=True)
    prep = prepare_fusion([a, b], x, FusionConfig(samples=100, match="ot-acts", preserve_until=1, repair="none"))
    m = prep.combine([0.4, 0.6])
    xr = prep.repair_samples
    with torch.no_grad():
        feats = [_stats(br(xr)) for br in m.branches]
        mean, std = _stats(m.junction(xr))
        beta = m.shares.double()
        _close(mean, sum(beta[i] * feats[i][0] for i in range(2)), 1e-5)
        _close(std, sum(beta[i] * feats[i][1] for i in range(2)), 1e-5)
        assert float((m.scale - 1).abs().max()) > 1e-3  # different networks: averaging shrank the spread
    off = prepare_fusion([a, b], x, FusionConfig(samples=100, match="ot-acts", preserve_until=1, repair="none",
                                                 preserve_renorm=False)).combine([0.4, 0.6])
    assert torch.equal(off.scale, torch.ones(10)) and torch.equal(off.shift, torch.zeros(10))
    with torch.no_grad():
        _close(off.junction(xr), off.mixed(xr), 0)


def test_repair_corrects_the_tail_of_the_assembled_network():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    a, b = MLP(12, [10, 8, 6], 4, bias=False), MLP(12, [10, 8, 6], 4, bias=False)
    prep = prepare_fusion([a, b], x, FusionConfig(samples=100, match="perm-acts", preserve_until=1, repair="repair"))
    m = prep.combine([0.5, 0.5])
    from hetfuse.combine import shares

    beta, stats, g = shares(prep.aligned, [0.5, 0.5]), prep.parent_stats(), prep.graph
    seen = {}
    layers = {s: sp.producers[0] for s, sp in enumerate(g.spaces)}
    hooks = [m.tail.get_submodule(layers[s]).register_forward_hook(
        lambda _m, _a, out, s=s: seen.__setitem__(s, _stats(out))) for s in (1, 2)]
    with torch.no_grad():
        m(prep.repair_samples)
    for h in hooks:
        h.remove()
    for s in (1, 2):  # the tail's layers: the interpolated parent statistics, seen through the branches
        _close(seen[s][0], (beta[0][s] * stats[0][s][0] + beta[1][s] * stats[1][s][0]), 1e-4)
        _close(seen[s][1], (beta[0][s] * stats[0][s][1] + beta[1][s] * stats[1][s][1]), 1e-4)
    assert m.tail.get_submodule(layers[1]).bias is not None  # REPAIR's bias, an edit of the tail
    assert all(br.get_submodule(layers[0]).bias is None for br in m.branches)  # the branches are left alone


def test_models_of_different_depths_and_widths():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    a, b = MLP(12, [16, 12, 8], 4, bias=True), MLP(12, [16, 14, 12, 10, 8], 4, bias=True)
    res = fuse([a, b], x, samples=48, preserve_until=2)  # cla + add: a gets two identity layers
    assert isinstance(res.model, MultiBranch) and res.report["depths_in"] == [3, 5]
    with torch.no_grad():
        out = res.model(x)
    assert out.shape == (64, 4) and bool(torch.isfinite(out).all())
    # fused widths wider than a model (elastic-zip, width max): its branch does not dilute the features it lacks
    c = MLP(12, [10, 12, 8], 4, bias=True)
    res = fuse([c, a], x, samples=48, match="elastic-zip", preserve_until=1)
    sh = res.model.shares
    _close(sh.sum(0), torch.ones(sh.shape[1]))
    assert sh.shape == (2, 16) and bool((sh[0] == 0).any())  # some fused neurons have no member of c
    with torch.no_grad():
        assert bool(torch.isfinite(res.model(x)).all())


def test_save_and_load_give_the_same_network(tmp_path):
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a, b = MLP(12, [10, 8, 6], 4, bias=False), MLP(12, [10, 8, 6], 4, bias=False)
    m = fuse([a, b], x, samples=32, preserve_until=2).model  # REPAIR adds biases to the tail: edits
    path = save_model(m, tmp_path / "pfm.safetensors", metadata={"note": "x"})
    loaded = load_model(path)
    assert isinstance(loaded, MultiBranch) and loaded.feature_axis == m.feature_axis
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    for key in ("shares", "scale", "shift"):
        assert torch.equal(getattr(loaded, key), getattr(m, key))
    # a user's class: rebuilt from its base, one for every part
    img = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    r = make("resnet-projection", 0, img)
    twin = permuted_copy(r, describe(r, example=img[:2]), seed=4)[0]
    m = fuse([r, twin], img, samples=12, preserve_until=1).model
    path = save_model(m, tmp_path / "resnet.safetensors")
    with torch.no_grad():
        assert torch.equal(load_model(path, base=UserResNet())(img), m(img))


def test_bad_values_are_refused():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(HetfuseError, match="preserve_until must be"):
            FusionConfig(preserve_until=bad)
    with pytest.raises(HetfuseError, match="preserve_renorm"):
        FusionConfig(preserve_until=1, preserve_renorm="yes")
    with pytest.raises(HetfuseError, match="zip_until"):
        FusionConfig(match="zip", zip_until=1, preserve_until=1)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    a, b = MLP(12, [10, 8], 4), MLP(12, [10, 8], 4)
    with pytest.raises(HetfuseError, match="2 depth units"):
        fuse([a, b], x, samples=16, preserve_until=2)


def test_the_config_records_the_option():
    c = FusionConfig(preserve_until=2, preserve_renorm=False, match="perm-acts")
    d = json.loads(c.to_json())
    assert d["preserve_until"] == 2 and d["preserve_renorm"] is False
    assert FusionConfig.from_dict(d) == c
    assert c.replace(seed=3).preserve_until == 2 and c.replace(preserve_until=None).preserve_until is None
    assert FusionConfig().preserve_until is None and FusionConfig().preserve_renorm is True


def test_the_command_line_flag(tmp_path, capsys):
    paths = []
    for seed, hidden in ((0, "mlp:32,16"), (1, "mlp:24,16")):
        torch.manual_seed(seed)
        m = build_model(hidden, input_dim=64, output_dim=10, input_shape=(64,))
        paths.append(str(save_model(m, tmp_path / f"m{seed}.safetensors", metadata={"dataset": "digits"})))
    out = tmp_path / "f.safetensors"
    common = ["--dataset", "digits", "--samples", "100", "--repair-samples", "200", "--quiet"]
    assert main(["fuse", *paths, "--preserve-until", "1", "--out", str(out), *common]) == 0
    assert json.loads((tmp_path / "f.config.json").read_text())["preserve_until"] == 1
    assert isinstance(load_model(out), MultiBranch)
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", "digits", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["models"][0]["accuracy"] <= 100
    assert main(["check", str(out)]) == 0
    assert "multi-branch" in capsys.readouterr().out
    assert main(["fuse", *paths, "--preserve-until", "2", "--out", str(tmp_path / "g.safetensors"), *common]) == 1
    assert "preserve_until=2" in capsys.readouterr().err
    assert main(["fuse", *paths, "--preserve-until", "1", "--match", "elastic-zip", "--zip-until", "1",
                 "--out", str(tmp_path / "h.safetensors"), *common]) == 1
    assert "zip_until" in capsys.readouterr().err
