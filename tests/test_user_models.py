"""Networks written as users write them fuse across depths, come back as the user's own kind where the depth
allows, and save / load without executing code; checkpoints are checked before anything is allocated."""

import json
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import fx, nn

from hetfuse import fuse, load_model, save_model
from hetfuse.errors import CheckpointError, HetfuseError
from hetfuse.graph import depth_groups, describe
from hetfuse.models import MLP
from models_zoo_for_tests import UserResNet, UserVGG, bn1d_mlp, randomize_norms
from hetfuse.repair import reset_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _prepared(model, data, seed):
    torch.manual_seed(seed)
    randomize_norms(model, seed)
    reset_batchnorm(model, data)  # statistics that describe the data, as a trained network's do
    return model.eval()


def _pair(kind, data):
    if kind == "vgg":
        torch.manual_seed(0)
        shallow = UserVGG((8, "M", 16, "M"))
        torch.manual_seed(1)
        deep = UserVGG((8, 8, "M", 16, 16, "M"))
    elif kind == "resnet":
        torch.manual_seed(0)
        shallow = UserResNet((1, 2))
        torch.manual_seed(1)
        deep = UserResNet((2, 3))
    else:
        torch.manual_seed(0)
        shallow = bn1d_mlp((10, 8))
        torch.manual_seed(1)
        deep = bn1d_mlp((10, 10, 8))
    return _prepared(shallow, data, 0), _prepared(deep, data, 1)


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    # the BN reset's noise is of the order of 1 / (observations per channel): a conv channel has 1024 per image
    return torch.randn(n * 20, 12, generator=g) if kind == "mlp-bn1d" else torch.randn(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("kind", ["vgg", "resnet", "mlp-bn1d"])
def test_user_models_of_two_depths_give_back_each_parent_with_one_hot_weights(kind):
    data, x = _data(kind, 40, 1), _data(kind, 6, 2)
    shallow, deep = _pair(kind, data)
    assert [len(g.units) for g in depth_groups(describe(shallow, example=x))] != \
        [len(g.units) for g in depth_groups(describe(deep, example=x))]
    for weights, parent in (([1.0, 0.0], shallow), ([0.0, 1.0], deep)):
        for repair in ("none", "auto"):
            res = fuse([shallow, deep], data, weights=weights, samples=24, repair=repair)
            with torch.no_grad():  # the BN reset's noise, ~1 / observations per channel (800 rows here)
                torch.testing.assert_close(res.model(x), parent(x), rtol=3e-3, atol=3e-3)
    # target = the shallower network: its balanced graph; target = the deeper one: the user's own class
    res = fuse([shallow, deep], data, samples=24)
    assert isinstance(res.model, fx.GraphModule)
    res = fuse([shallow, deep], data, samples=24, target=1)
    assert type(res.model) is type(deep)


@pytest.mark.parametrize("kind", ["vgg", "resnet", "mlp-bn1d"])
def test_user_models_save_and_load(kind, tmp_path):
    data, x = _data(kind, 40, 1), _data(kind, 6, 2)
    shallow, deep = _pair(kind, data)
    for target in (0, 1):
        res = fuse([shallow, deep], data, samples=24, target=target, weights=[0.4, 0.6])
        path = save_model(res.model, tmp_path / f"{kind}{target}.safetensors")
        fresh = type(deep)() if kind != "mlp-bn1d" else nn.Sequential()
        base = {"vgg": lambda target=target: UserVGG((8, 8, "M", 16, 16, "M") if target else (8, "M", 16, "M")),
                "resnet": lambda target=target: UserResNet((2, 3) if target else (1, 2)),
                "mlp-bn1d": lambda target=target: bn1d_mlp((10, 10, 8) if target else (10, 8))}[kind]()
        loaded = load_model(path, base=base)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), res.model(x))
        if kind == "mlp-bn1d":  # a plain nn.Sequential of torch layers: recorded as data, no instance needed
            with torch.no_grad():
                torch.testing.assert_close(load_model(path)(x), res.model(x), rtol=0, atol=0)
        else:
            with pytest.raises(CheckpointError, match="load_model"):
                load_model(path)  # a user's class cannot be rebuilt without an instance
            with pytest.raises(CheckpointError, match="saved from"):
                load_model(path, base=MLP(4, [3], 2))
        del fresh


def test_a_fully_connected_model_keeps_its_batchnorm_and_its_class():
    """Fully connected models are not rebuilt as hetfuse's MLP: BatchNorm1d survives and the class is kept."""
    data = torch.randn(64, 12)
    a = _prepared(bn1d_mlp((10, 8)), data, 0)
    from hetfuse.graph import permuted_copy

    twin = permuted_copy(a, describe(a), seed=2)[0]
    res = fuse([twin, a], data, samples=48)
    assert type(res.model) is nn.Sequential and any(isinstance(m, nn.BatchNorm1d) for m in res.model)
    torch.testing.assert_close(res.model(data), a(data), rtol=1e-4, atol=1e-4)


def _write(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_a_checkpoint_whose_metadata_disagrees_with_its_tensors_is_refused_before_allocating(tmp_path):
    m = MLP(784, [400], 10)
    state = m.state_dict()
    for meta in (
        {"format": "hetfuse", "hetfuse_version": "0", "arch": json.dumps(dict(m.arch(), hidden=[200_000_000]))},
        {"format": "hetfuse", "hetfuse_version": "0.2",
         "base": json.dumps({"zoo": dict(m.arch(), hidden=[200_000_000])}), "edits": "[]"},
        {"format": "hetfuse", "hetfuse_version": "0.2", "base": json.dumps({"zoo": m.arch()}),
         "edits": json.dumps([{"op": "replace_module", "target": "layers.1",
                               "module": {"type": "Linear", "args": {"in_features": 784,
                                                                     "out_features": 200_000_000, "bias": True}}}])},
    ):
        path = tmp_path / "claim.safetensors"
        _write(path, state, meta)
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="shape|do not match"):
            load_model(path)
        assert time.perf_counter() - t0 < 5  # refused at once, nothing of 627 GB was allocated


@pytest.mark.parametrize("edit, words", [
    ({"op": "insert", "after": "nope", "nodes": [], "modules": {}}, "node"),
    ({"op": "replace_module", "target": "layers.1", "module": {"type": "os.system", "args": {}}}, "unsupported module"),
    ({"op": "insert", "after": "layers_1", "modules": {},
      "nodes": [{"name": "a", "op": "call_function", "target": "builtins.eval", "args": ["1"]}]}, "allowed"),
    ({"op": "run_code"}, "unknown edit"),
])
def test_edits_of_an_untrusted_checkpoint_can_only_build_supported_modules(tmp_path, edit, words):
    m = MLP(6, [5], 3)
    path = tmp_path / "e.safetensors"
    _write(path, m.state_dict(), {"format": "hetfuse", "hetfuse_version": "0.2",
                                   "base": json.dumps({"zoo": m.arch()}), "edits": json.dumps([edit])})
    with pytest.raises(CheckpointError, match=words):
        load_model(path)


def test_models_that_do_not_correspond_are_refused_with_the_reason():
    data = torch.randn(16, 3, 32, 32)
    with pytest.raises(HetfuseError, match="BatchNorm is present in model"):
        fuse([UserVGG((8, "M", 16, "M"), bn=True), UserVGG((8, "M", 16, "M"), bn=False)], data, samples=8)
