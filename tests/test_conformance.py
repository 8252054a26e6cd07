"""One conformance suite run over every registered method of every family, on every kind of network.

Matchers: a network fused with a permuted copy of itself gives back the network, and the maps have the
declared shapes. Balancers: ``add`` leaves the function unchanged; ``merge`` is exact where its sign estimate
is. Repairs: on a network fused with its permuted copy they change nothing. Similarities: a unit compared with
itself gets the best value of its row. Aligners: the alignment is valid and its objective optimal.
"""

import pytest
import torch

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.align import all_alignments, alignment_objective
from hetfuse.align.base import unit_reps
from hetfuse.balance import rebalance
from hetfuse.errors import HetfuseError
from hetfuse.graph import depth_groups, describe, permuted_copy
from hetfuse.registry import methods
from models_zoo_for_tests import KINDS, POST_NORM, inputs, make

pytestmark = pytest.mark.usefixtures("one_thread")

MATCHERS = list(methods("match"))
REPAIRS = list(methods("repair"))
KIND_NAMES = list(KINDS)


def _data(kind):
    return inputs(kind, 48, 1)


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("match", MATCHERS)
def test_every_matcher_gives_back_a_network_fused_with_its_permuted_copy(match, kind):
    data = _data(kind)
    model = make(kind, 0, data)
    x = inputs(kind, 8, 2)
    recovers = getattr(methods("match")[match], "recovers_permutations", True)
    twin = permuted_copy(model, describe(model, example=x), seed=3)[0] if recovers else make(kind, 0, data)
    res = fuse([twin, model], data, weights=[0.5, 0.5], samples=24, match=match, repair="none")
    with torch.no_grad():
        _close(res.model(x), model(x))
    assert type(res.model) is type(model)  # equal depth: a copy of the target's own class


@pytest.mark.parametrize("kind", ["mlp", "vgg-bn", "resnet-projection", "fc-residual"])
@pytest.mark.parametrize("match", MATCHERS)
def test_every_matcher_returns_maps_of_the_declared_shapes(match, kind):
    data = _data(kind)
    a, b = make(kind, 0, data), make(kind, 1, data)
    prep = prepare_fusion([a, b], data, FusionConfig(samples=24, match=match, repair="none"))
    widths = prep.match.widths
    assert len(widths) == len(prep.balanced_graphs[0].spaces)
    for i, g in enumerate(prep.balanced_graphs):
        for s, (space, sm) in enumerate(zip(g.spaces, prep.match.maps[i], strict=False)):
            assert sm.out.shape == (space.size, widths[s]) and sm.inn.shape == (space.size, widths[s])
            assert prep.match.linear or bool((sm.out >= 0).all())  # CCA's maps are general linear maps
            assert bool((sm.out.sum(0) > 0).any())
    assert describe(prep.skeleton).widths == widths


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("repair", REPAIRS)
def test_every_repair_keeps_a_network_fused_with_its_permuted_copy(repair, kind):
    data = _data(kind)
    model = make(kind, 0, data)
    x = inputs(kind, 8, 2)
    twin = permuted_copy(model, describe(model, example=x), seed=5)[0]
    try:
        res = fuse([twin, model], data, weights=[0.3, 0.7], samples=24, repair=repair)
    except HetfuseError as e:
        assert "no BatchNorm-free layer" in str(e) and repair == "repair"
        return
    with torch.no_grad():
        _close(res.model(x), model(x), 2e-4)


def _deeper_alignments(model, x):
    """Per group: an alignment that adds one unit after the first (and keeps the first unit matched); a group of
    layers not followed by a ReLU (a BERT pooler's tanh) has no identity layer to add and stays as it is."""
    groups = depth_groups(describe(model, example=x))
    deepen = [g.kind == "block" or g.units[0].relu for g in groups]
    return ([[0] + [j + 1 for j in range(1, len(g.units))] if d else list(range(len(g.units)))
             for g, d in zip(groups, deepen, strict=True)],
            [len(g.units) + d for g, d in zip(groups, deepen, strict=True)])


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_balancer_add_leaves_the_function_unchanged(kind):
    data = _data(kind)
    model = make(kind, 0, data)
    x = inputs(kind, 8, 2)
    if kind in ("mlp", "mlp-nobias", "mlp-bn1d"):
        x = x.abs()  # the identity layer after the first unit reads a ReLU output: exact for any input anyway
    alignments, counts = _deeper_alignments(model, x)
    deeper = rebalance(model, alignments, counts, method="add", x=data)
    assert [len(g.units) for g in depth_groups(describe(deeper, example=x))] == counts
    with torch.no_grad():
        if kind in POST_NORM:  # a zero post-norm layer is LayerNorm(x), not x: the change is real (and reported)
            assert (deeper(x) - model(x)).abs().max() > 1e-3
        else:
            _close(deeper(x), model(x), 1e-5)


def _constant_sign(model, seed):
    """Weights that make every hidden pre-activation keep its sign on non-negative inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                sign = torch.where(torch.rand(m.out_features, 1, generator=g) < 0.7, 1.0, -1.0)
                m.weight.copy_(sign * torch.rand(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(sign[:, 0] * torch.rand(m.out_features, generator=g))
            elif isinstance(m, torch.nn.BatchNorm1d):  # sign-preserving normalisation
                m.running_mean.zero_(), m.running_var.fill_(1.0), m.weight.data.fill_(1.5), m.bias.data.zero_()
    return model


@pytest.mark.parametrize("kind", ["mlp", "mlp-nobias", "mlp-bn1d"])
def test_balancer_merge_is_exact_where_the_sign_estimate_is(kind):
    from models_zoo_for_tests import bn1d_mlp
    from hetfuse.models import MLP

    deep = (bn1d_mlp((10, 9, 8, 6)) if kind == "mlp-bn1d" else MLP(12, [10, 9, 8, 6], 4, bias=kind == "mlp"))
    deep = _constant_sign(deep, 0).eval()
    x = torch.rand(64, 12)  # non-negative inputs keep every sign fixed
    for a in ([0, 3], [1, 2], [0, 1, 3]):
        merged = rebalance(deep, [a], [4], method="merge", x=x)
        assert describe(merged).widths == [describe(deep).widths[i] for i in a]
        with torch.no_grad():
            _close(merged(x), deep(x), 1e-4)


@pytest.mark.parametrize("similarity", list(methods("similarity")))
@pytest.mark.parametrize("kind", ["mlp", "vgg-bn", "resnet-projection", "vit-hand"])
def test_every_similarity_ranks_a_unit_first_against_itself(similarity, kind):
    data = _data(kind)
    model = make(kind, 0, data)
    g = describe(model, example=data[:2])
    groups = depth_groups(g)
    method = methods("similarity")[similarity]()
    reps = unit_reps(model, g, groups, data, method.needs)
    for row in reps:
        if len(row) < 2:
            continue
        cost = method.matrix(row, row, "cost")
        for i in range(len(row)):
            assert cost[i, i] <= cost[i].min() + 1e-9


@pytest.mark.parametrize("aligner", [a for a in methods("depth_align") if a != "fixed"])
def test_every_aligner_is_optimal_for_its_objective(aligner):
    cls = methods("depth_align")[aligner]
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        m = int(torch.randint(2, 7, (1,), generator=g))
        n = int(torch.randint(1, m + 1, (1,), generator=g))
        matrix = torch.randint(0, 4, (m, n), generator=g).double()
        ff, fl = bool(trial % 2), bool(trial % 3) and not (n == 1 and trial % 2 and m > 1)
        a = cls(fix_first=ff, fix_last=fl).align_group(matrix, m=m, n=n, fix_first=ff, fix_last=fl, group=0, offset=0)
        values = [alignment_objective(matrix, b, aligner) for b in all_alignments(m, n, fix_first=ff, fix_last=fl)]
        best = min(values) if cls.objective == "cost" else max(values)
        assert alignment_objective(matrix, a, aligner) == best


def test_the_fixed_aligner_places_units_where_it_is_told():
    torch.manual_seed(0)
    from hetfuse.models import MLP

    shallow, deep = MLP(6, [5, 4], 3), MLP(6, [5, 5, 5, 4], 3)
    res = fuse([shallow, deep], torch.randn(50, 6), samples=40, depth_align="fixed", mapping=[0, 2], repair="none")
    assert res.report["mappings"][0]["alignment"] == [0, 2]


@pytest.mark.parametrize("pair", ["preact", "mobilenet", "convnext", "vit-hand", "vit-zoo", "bert-zoo"])
def test_depth_different_peer_kinds_fused_with_weights_one_zero_give_back_the_shallower(pair):
    """Pre-activation ResNets (stream read at the additions, not at the next block's BatchNorm), depthwise
    networks (MobileNetV2 inverted residuals, ConvNeXt-style blocks) and pre-LN transformers (a zero layer is an
    exact identity) of different depths: with weights (1, 0) the fused model is the shallower one."""
    from models_zoo_for_tests import ConvNeXtLike, HandViT, MobileNetV2Like, PreActResNet

    from hetfuse.models import build_model

    def zoo(spec, shape):
        return lambda: build_model(spec, input_dim=shape[0], output_dim=5, input_shape=shape)

    shallow, deep = {"preact": (lambda: PreActResNet((1, 2)), lambda: PreActResNet((2, 3))),
                     "mobilenet": (lambda: MobileNetV2Like((1, 2)), lambda: MobileNetV2Like((2, 3))),
                     "convnext": (lambda: ConvNeXtLike(2), lambda: ConvNeXtLike(3)),
                     "vit-hand": (lambda: HandViT(2), lambda: HandViT(4)),
                     "vit-zoo": (zoo("vit:depth=1,dim=16,heads=2,patch=8", (3, 32, 32)),
                                 zoo("vit:depth=3,dim=16,heads=2,patch=8", (3, 32, 32))),
                     "bert-zoo": (zoo("bert:depth=2,dim=16,heads=4,vocab=40,seq=6", (6,)),
                                  zoo("bert:depth=3,dim=16,heads=4,vocab=40,seq=6", (6,)))}[pair]
    kind = "bert-zoo" if pair == "bert-zoo" else "resnet-preact"
    data = inputs(kind, 48, 1)
    torch.manual_seed(0)
    a, b = shallow().eval(), deep().eval()
    ga, gb = (depth_groups(describe(m, example=data[:2])) for m in (a, b))
    assert [g.kind for g in ga] == [g.kind for g in gb]
    assert sum(len(g.units) for g in gb) > sum(len(g.units) for g in ga)
    res = fuse([a, b], data, weights=[1.0, 0.0], samples=32, repair="none")
    x = inputs(kind, 8, 2)
    with torch.no_grad():
        _close(res.model(x), a(x), 1e-5)


def test_a_preactivation_stage_is_one_group_of_all_its_blocks():
    from models_zoo_for_tests import PreActResNet

    g = describe(PreActResNet((2, 3)), example=inputs("resnet-preact", 2, 0))
    assert [(gr.kind, len(gr.units)) for gr in depth_groups(g)] == [("block", 2), ("block", 3)]
