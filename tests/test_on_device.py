"""Everything on the model's device (the scale issue's §3): activations, moments, similarities, costs, plans, maps
and the combination stay torch tensors; a tensor becomes a NumPy array only inside a solver that runs on the host
(the linear assignment, the exact transport of POT, the greedy zip, the depth-alignment dynamic programs). Checked
on the CPU by watching every conversion of a tensor to NumPy during whole fusions."""

import inspect
import sys

import pytest
import torch

from hetfuse import fuse
from hetfuse.models import MLP
from models_zoo_for_tests import inputs, make

# the host-side solvers: where a cost may leave the device (function names in hetfuse, and the solver libraries)
SOLVERS = {"solve_assignment", "sparse_assignment", "greedy_zip", "as_matrix", "exact_plan"}
SOLVER_MODULES = ("ot.", "scipy.")


class _Watch:
    def __init__(self):
        self.outside: list[str] = []

    def check(self):
        frames = inspect.stack()[2:]
        if any(f.function in SOLVERS for f in frames):
            return
        if any(str(f.frame.f_globals.get("__name__", "")).startswith(SOLVER_MODULES) for f in frames):
            return
        inner = next((f for f in frames if "hetfuse" in f.filename), frames[0])
        self.outside.append(f"{inner.filename.split('hetfuse/')[-1]}:{inner.lineno} ({inner.function})")


@pytest.fixture
def watch(monkeypatch):
    w = _Watch()
    numpy_, array_ = torch.Tensor.numpy, torch.Tensor.__array__

    def numpy(self, *a, **k):
        w.check()
        return numpy_(self, *a, **k)

    def array(self, *a, **k):
        w.check()
        return array_(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    monkeypatch.setattr(torch.Tensor, "__array__", array)
    return w


def _mlps():
    torch.manual_seed(0)
    a, b = MLP(12, [16, 12], 4), MLP(12, [16, 16, 12], 4)
    return [a.eval(), b.eval()], torch.randn(80, 12)


@pytest.mark.parametrize("kw", [
    dict(match="perm-acts", depth_align="cla", repair="repair"),
    dict(match="perm-acts", depth_align="lma", budget=1.5, repair="lsq"),
    dict(match="ot-acts", depth_align="sma"),
    dict(match="zip", depth_align="lma"),
    dict(match="cca", depth_align="lma"),
    dict(match="perm-weights", depth_align="cla", representation="weights"),
    dict(match="ot-acts", depth_align="sma", solver="sinkhorn", reg=0.05),
    dict(match="ot-weights", depth_align="cla", representation="weights"),
    dict(match="perm-acts", depth_align="cla", solver="sparse", k=2),
    dict(match="ot-acts", depth_align="sma", solver="sparse", k=2),
])
def test_an_mlp_fusion_converts_to_numpy_only_in_the_solvers(watch, kw):
    models, x = _mlps()
    res = fuse(models, x, samples=80, **kw)
    assert res.model is not None
    assert watch.outside == [], f"{kw}: tensors went to NumPy outside the solvers at {sorted(set(watch.outside))}"


@pytest.mark.parametrize("match", ["ot-acts", "elastic-zip", "cca"])
def test_different_widths_convert_to_numpy_only_in_the_solvers(watch, match):
    torch.manual_seed(0)
    models = [MLP(12, [16, 12], 4).eval(), MLP(12, [20, 9], 4).eval()]
    fuse(models, torch.randn(80, 12), samples=80, match=match)
    assert watch.outside == [], f"{match}: tensors went to NumPy at {sorted(set(watch.outside))}"


@pytest.mark.parametrize("kind,match", [("resnet-projection", "perm-acts"), ("vit-zoo", "perm-acts"),
                                        ("vit-zoo", "zip")])
def test_cnn_and_transformer_fusions_convert_to_numpy_only_in_the_solvers(watch, kind, match):
    data = inputs(kind, 48, 0)
    a, b = make(kind, 0, data), make(kind, 1, data)
    fuse([a, b], data, match=match, samples=48)
    assert watch.outside == [], f"{kind}/{match}: tensors went to NumPy at {sorted(set(watch.outside))}"


def test_the_watch_sees_a_conversion(watch):
    torch.ones(3).numpy()  # called from here: not a solver
    assert watch.outside and "test_on_device" in sys.modules[__name__].__file__
