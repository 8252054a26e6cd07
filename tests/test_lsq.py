"""Least squares after matching (repair='lsq') and perm-acts' width budget (PLeaS)."""

import pytest
import torch
from torch import nn

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.errors import HetfuseError
from hetfuse.repair import RepairContext, lsq_refit

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, hidden=12, act=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, hidden), nn.ReLU() if act else nn.Identity(), nn.Linear(hidden, hidden),
              nn.ReLU() if act else nn.Identity(), nn.Linear(hidden, 4)]
    return nn.Sequential(*layers).double().eval()


def _planted(model, seed, *, positive=True):
    """``model`` with every hidden space moved by an invertible map that the network's nonlinearity commutes with:
    a permutation times positive scales (ReLU networks) or any invertible matrix (``positive=False``, for linear
    networks); the copy computes the same function."""
    g = torch.Generator().manual_seed(seed)
    twin = nn.Sequential(*[type(m)(m.in_features, m.out_features).double() if isinstance(m, nn.Linear) else m
                           for m in model]).eval()
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    maps = []
    for i in linears[:-1]:
        n = model[i].out_features
        if positive:
            perm = torch.randperm(n, generator=g)
            m = torch.zeros(n, n, dtype=torch.float64)
            m[torch.arange(n), perm] = torch.rand(n, generator=g, dtype=torch.float64) * 2.5 + 0.25
        else:
            m = torch.randn(n, n, generator=g, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64)
        maps.append(m)
    with torch.no_grad():
        for k, i in enumerate(linears):
            w, b = model[i].weight.clone(), model[i].bias.clone()
            if k > 0:
                w = w @ torch.linalg.inv(maps[k - 1])
            if k < len(maps):
                w, b = maps[k] @ w, maps[k] @ b
            twin[i].weight.copy_(w)
            twin[i].bias.copy_(b)
    return twin


@pytest.mark.parametrize("positive", [True, False])
def test_lsq_recovers_a_model_from_a_planted_invertible_transform_of_itself(positive):
    a = _mlp(0, act=positive)
    b = _planted(a, 1, positive=positive)
    x = torch.randn(400, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))  # the planted copy computes the same function
        plain = fuse([a, b], x, match="perm-acts", repair="none").model
        refit = fuse([a, b], x, match="perm-acts", repair="lsq", ridge=0.0).model
        assert (plain(x) - a(x)).abs().max() > 1e-3  # averaging alone does not give it back
        torch.testing.assert_close(refit(x), a(x), rtol=1e-6, atol=1e-6)


def test_lsq_targets_are_the_parents_matched_features_under_linear_maps():
    """Under CCA's linear maps the aligned network (the map pushed through a ReLU) is not the parent's matched
    features; the regression targets are (the parent's own features times its map): a planted invertible transform
    of a linear network is still recovered exactly, with CCA and with OT's soft maps."""
    a = _mlp(0, act=False)
    b = _planted(a, 1, positive=False)
    x = torch.randn(400, 6, dtype=torch.float64)
    with torch.no_grad():
        for match in ("cca", "ot-acts"):
            refit = fuse([a, b], x, match=match, repair="lsq", ridge=0.0).model
            torch.testing.assert_close(refit(x), a(x), rtol=1e-6, atol=1e-6)


def test_a_hidden_layer_is_fitted_to_the_parents_own_features_through_their_maps():
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(400, 6, dtype=torch.float64)
    w = [0.4, 0.6]
    prep = prepare_fusion([a, b], x, FusionConfig(match="cca"))
    ctx = RepairContext(prep.graph, prep.repair_samples, None, prepared=prep, weights=w)
    refit, _ = lsq_refit(prep.combine(w, repair="none"), ctx, ridge=0.0)
    with torch.no_grad():
        h = refit[:2](x)  # the fused network's own input to its second hidden layer
        maps = [prep.match.maps[i][1].out for i in range(2)]  # space 1: the second hidden layer
        target = w[0] * a[:3](x) @ maps[0] + w[1] * b[:3](x) @ maps[1]  # each parent's features, matched
        design = torch.cat([h, torch.ones(len(x), 1, dtype=h.dtype)], 1)
        best = torch.linalg.lstsq(design, target).solution
        torch.testing.assert_close(refit[2].weight.T, best[:-1], rtol=1e-6, atol=1e-8)


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double().eval()


def test_lsq_refits_convolutions_of_a_channel_scaled_copy_exactly():
    a = _cnn(0)
    b = _cnn(0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # channels of both conv spaces permuted and scaled by positive factors
        s1 = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
        p1 = torch.randperm(6, generator=g)
        s2 = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
        p2 = torch.randperm(8, generator=g)
        b[0].weight.copy_(a[0].weight[p1] * s1.view(-1, 1, 1, 1))
        b[0].bias.copy_(a[0].bias[p1] * s1)
        b[2].weight.copy_((a[2].weight[:, p1] / s1.view(1, -1, 1, 1))[p2]
                          * s2.view(-1, 1, 1, 1))
        b[2].bias.copy_(a[2].bias[p2] * s2)
        w = a[5].weight.view(5, 8, 16)[:, p2] / s2.view(1, -1, 1)
        b[5].weight.copy_(w.reshape(5, -1))
        b[5].bias.copy_(a[5].bias)
    x = torch.randn(400, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
        refit = fuse([a, b], x, match="perm-acts", repair="lsq", ridge=0.0).model
        torch.testing.assert_close(refit(x), a(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("outputs", ["mean", "direction"])
def test_lsq_fits_the_output_layer_to_the_weighted_mean_of_the_parents_logits(outputs):
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(400, 6, dtype=torch.float64)
    w = [0.3, 0.7]
    prep = prepare_fusion([a, b], x, None)
    fused = prep.combine(w, repair="none")
    ctx = RepairContext(prep.graph, prep.repair_samples, None, prepared=prep, weights=w)
    refit, details = lsq_refit(fused, ctx, ridge=0.0, outputs=outputs)
    layers = details["layers"]
    assert [d["layer"] for d in layers if d["refit"]] == ["0", "2", "4"]
    assert all(d["objective_reduction"] >= -1e-9 for d in layers)  # each refit can only lower its own error
    with torch.no_grad():
        h = refit[:4](x)  # the fused network's own inputs to the output layer
        ya, yb = a(x), b(x)
        if outputs == "direction":  # every parent's rows at the examples' mean norm
            na, nb = ya.norm(dim=1, keepdim=True), yb.norm(dim=1, keepdim=True)
            ya, yb = ya / na * (na + nb) / 2, yb / nb * (na + nb) / 2
        target = w[0] * ya + w[1] * yb
        design = torch.cat([h, torch.ones(len(x), 1, dtype=h.dtype)], 1)
        best = torch.linalg.lstsq(design, target).solution
        torch.testing.assert_close(refit[4].weight.T, best[:-1], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(refit[4].bias, best[-1], rtol=1e-6, atol=1e-8)


def test_lsq_handles_batchnorm_and_bias_free_layers():
    torch.manual_seed(0)

    def net():
        m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3))
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(32, 3, 8, 8))
        return m.eval()

    a, b = net(), net()
    x = torch.randn(64, 3, 8, 8)
    res = fuse([a, b], x, match="perm-acts", repair="lsq", samples=64)
    with torch.no_grad():
        out = res.model(x)
    assert out.shape == (64, 3) and bool(torch.isfinite(out).all())
    assert res.model[3].bias is not None  # a bias-free conv without BatchNorm got its bias (an edit)
    assert res.model[0].bias is None  # the one with BatchNorm keeps none: its bias went into the running mean


def test_lsq_parameters_are_checked():
    with pytest.raises(HetfuseError, match="ridge"):
        fuse([_mlp(0), _mlp(1)], torch.randn(20, 6, dtype=torch.float64), repair="lsq", ridge=-1.0)


# ------------------------------------------------------------------------------------------------ budget


def test_budget_one_is_the_plain_permutation_match_and_two_is_the_ensemble():
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(400, 6, dtype=torch.float64)
    w = [0.3, 0.7]
    with torch.no_grad():
        plain = fuse([a, b], x, weights=w, match="perm-acts", repair="none")
        one = fuse([a, b], x, weights=w, match="perm-acts", budget=1.0, repair="none")
        torch.testing.assert_close(one.model(x), plain.model(x))
        two = fuse([a, b], x, weights=w, match="perm-acts", budget=2.0, repair="none")
        assert two.report["fused_widths"] == [24, 24]
        torch.testing.assert_close(two.model(x), w[0] * a(x) + w[1] * b(x))
        half = fuse([a, b], x, weights=w, match="perm-acts", budget=1.5, repair="none")
        assert half.report["fused_widths"] == [18, 18]
        assert half.report["match_info"]["kept_apart"][1] == [6, 6]


def test_budget_with_three_models_and_a_permuted_copy():
    from hetfuse.graph import describe, permuted_copy

    a, b, c = _mlp(0), _mlp(1), _mlp(2)
    x = torch.randn(400, 6, dtype=torch.float64)
    with torch.no_grad():
        res = fuse([a, b, c], x, match="perm-acts", budget=2.0, repair="none")
        assert res.report["fused_widths"] == [36, 36]
        torch.testing.assert_close(res.model(x), (a(x) + b(x) + c(x)) / 3)
        twin = permuted_copy(a, describe(a, example=x[:2]), seed=4)[0]
        back = fuse([a, twin], x, match="perm-acts", budget=1.25, repair="lsq")
        torch.testing.assert_close(back.model(x), a(x), rtol=1e-5, atol=1e-5)


def test_budget_is_checked():
    with pytest.raises(HetfuseError, match="budget"):
        fuse([_mlp(0), _mlp(1)], torch.randn(20, 6, dtype=torch.float64), match="perm-acts", budget=2.5)


@pytest.mark.parametrize("kind,depth_align", [("mlp-nobias", "cla"), ("fc-residual", "cla"), ("vgg-bn", "cla"),
                                              ("resnet-projection", "cla"), ("vit-hand", "lma")])
def test_one_pass_over_all_samples_refits_as_the_layer_by_layer_route(kind, depth_align, monkeypatch):
    """Where every network's values fit in memory, lsq runs each network once over all samples (each layer's inputs
    read as the pass reaches it, after the layers before it were refitted); else it recomputes every layer's inputs
    from the network's input, batch by batch. Both give the same refit."""
    import hetfuse.repair.lsq as lsq
    from models_zoo_for_tests import inputs, make

    x = inputs(kind, 48, 0)
    models = [make(kind, 0, x), make(kind, 1, x)]
    made = []
    stepper = lsq._Stepper

    def counted(*args, **kwargs):
        made.append(1)
        return stepper(*args, **kwargs)

    monkeypatch.setattr(lsq, "_Stepper", counted)
    one_pass = fuse(models, x, match="perm-acts", depth_align=depth_align, repair="lsq", samples=48,
                    repair_samples=48).model
    assert len(made) == 3  # the fused network and both parents
    monkeypatch.setattr(lsq, "LOCKSTEP_BYTES", 0)
    by_layer = fuse(models, x, match="perm-acts", depth_align=depth_align, repair="lsq", samples=48,
                    repair_samples=48).model
    assert len(made) == 3  # not used this time
    with torch.no_grad():
        torch.testing.assert_close(one_pass(x), by_layer(x), rtol=1e-4, atol=1e-5)
