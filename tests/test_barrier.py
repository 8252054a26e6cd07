"""Loss barriers (hetfuse.barrier, ``hetfuse barrier``): zero for a network with itself and with a permuted copy of
itself once aligned, positive without alignment; endpoints that are the networks' own loss and error; networks of
different depths; the command's JSON, figure and page."""

import json

import pytest
import torch
import torch.nn.functional as F

import hetfuse
from hetfuse.barriers import BarrierResult, barrier_of
from hetfuse.cli import main
from hetfuse.data import load_dataset
from hetfuse.errors import HetfuseError
from hetfuse.graph import describe, permuted_copy
from hetfuse.models import MLP
from hetfuse.train import train_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trained(ds, hidden, seed, epochs=5):
    torch.manual_seed(seed)
    m = MLP(ds.input_dim, hidden, ds.num_classes)
    train_model(m, ds.x_train, ds.y_train, epochs=epochs, lr=0.05, momentum=0.9, seed=seed, progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def nets(digits):
    """Two MLPs of one architecture (other seeds) and a deeper one, every hidden layer 32 wide (so that the
    permutation matchers apply after balancing), trained a few epochs."""
    return {"a": _trained(digits, [32, 32], 0), "b": _trained(digits, [32, 32], 1),
            "deep": _trained(digits, [32, 32, 32], 2)}


def _own(model, ds):
    """Loss and error of a model on the test split, computed here independently of hetfuse.barrier."""
    with torch.no_grad():
        out = model.eval()(ds.x_test).double()
    return float(F.cross_entropy(out, ds.y_test)), float((out.argmax(1) != ds.y_test).double().mean())


@pytest.mark.parametrize("align", ["perm-acts", "none", None])
def test_a_network_with_itself_has_no_barrier(nets, digits, align):
    r = hetfuse.barrier(nets["a"], nets["a"], digits, points=5, align=align, progress=False)
    assert isinstance(r, BarrierResult)
    assert abs(r.loss_barrier) < 1e-6 and abs(r.error_barrier) < 1e-6
    assert max(r.loss) - min(r.loss) < 1e-6  # the path stays at the network


def test_a_permuted_copy_has_no_barrier_once_aligned_and_one_without(nets, digits):
    a = nets["a"]
    p, perms = permuted_copy(a, describe(a), seed=1)
    assert any(not torch.equal(q, torch.arange(q.numel())) for q in perms)
    aligned = hetfuse.barrier(a, p, digits, points=5, align="perm-acts", progress=False)
    assert abs(aligned.loss_barrier) < 1e-6 and abs(aligned.error_barrier) < 1e-6
    assert aligned.match == "perm-acts"
    vanilla = hetfuse.barrier(a, p, digits, points=5, align="none", progress=False)
    assert vanilla.match == "none"
    assert vanilla.loss_barrier > 0.1 and vanilla.error_barrier > 0.05
    assert 0 < vanilla.t_loss < 1 and 0 < vanilla.t_error < 1
    # both paths start and end at the same networks: only the middle differs
    assert vanilla.loss[0] == pytest.approx(aligned.loss[0], abs=1e-6)
    assert vanilla.loss[-1] == pytest.approx(aligned.loss[-1], abs=1e-6)


@pytest.mark.parametrize("align", ["perm-acts", "ot-acts", "none"])
def test_the_endpoints_are_the_networks_own_loss_and_error(nets, digits, align):
    a, b = nets["a"], nets["b"]
    r = hetfuse.barrier(a, b, digits, points=3, align=align, progress=False)
    (la, ea), (lb, eb) = _own(a, digits), _own(b, digits)
    assert r.loss[0] == pytest.approx(la, abs=1e-5) and r.loss[-1] == pytest.approx(lb, abs=1e-5)
    assert r.error[0] == pytest.approx(ea, abs=1e-9) and r.error[-1] == pytest.approx(eb, abs=1e-9)
    assert r.model_loss == pytest.approx([la, lb], abs=1e-5) and r.model_error == pytest.approx([ea, eb])
    assert r.examples == digits.y_test.numel()
    # the barrier is the largest gap above the straight line between the endpoints, where it is reached
    gaps = [v - ((1 - t) * r.loss[0] + t * r.loss[-1]) for t, v in zip(r.ts, r.loss, strict=True)]
    assert r.loss_barrier == pytest.approx(max(gaps)) and r.t_loss == r.ts[gaps.index(max(gaps))]
    assert r.loss_barrier > 0  # two independently trained networks: the path rises between them


def test_networks_of_different_depths(nets, digits):
    a, deep = nets["a"], nets["deep"]
    for align in ("perm-acts", None):
        r = hetfuse.barrier(a, deep, digits, points=7, align=align, progress=False)
        assert len(r.ts) == len(r.loss) == len(r.error) == 7
        assert r.ts == pytest.approx([k / 6 for k in range(7)])
        assert r.fusion["depths_in"] == [2, 3] and r.fusion["balanced_widths"] == [[32, 32, 32]] * 2
        assert r.loss[0] == pytest.approx(_own(a, digits)[0], abs=1e-5)
        assert r.loss[-1] == pytest.approx(_own(deep, digits)[0], abs=1e-5)
        assert r.error[0] == pytest.approx(_own(a, digits)[1]) and r.error[-1] == pytest.approx(_own(deep, digits)[1])
        assert r.loss_barrier >= 0 and r.error_barrier >= 0
    # and the other way round: the deeper network first
    back = hetfuse.barrier(deep, a, digits, points=3, align="perm-acts", progress=False)
    assert back.loss[0] == pytest.approx(_own(deep, digits)[0], abs=1e-5)
    assert back.loss[-1] == pytest.approx(_own(a, digits)[0], abs=1e-5)


def test_data_as_a_pair_and_the_barrier_formula(nets, digits):
    a, b = nets["a"], nets["b"]
    x, y = digits.x_test[:100], digits.y_test[:100]
    r = hetfuse.barrier(a, b, (x, y), points=4, align="perm-acts", align_data=digits.x_train, progress=False)
    with torch.no_grad():
        own = float(F.cross_entropy(a(x).double(), y))
    assert r.examples == 100 and r.loss[0] == pytest.approx(own, abs=1e-5)
    d = r.to_dict()
    for key in ("ts", "loss", "error", "loss_barrier", "error_barrier", "t_loss", "t_error"):
        assert key in d
    json.dumps(d)
    assert barrier_of([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == (1.5, 0.5)
    assert barrier_of([0.0, 0.5, 1.0], [1.0, 1.0, 2.0]) == (0.0, 0.0)  # under the line: 0 at the endpoints
    assert hetfuse.BarrierResult is BarrierResult and callable(hetfuse.barrier)


def test_sensible_errors(nets, digits):
    a = nets["a"]
    with pytest.raises(HetfuseError, match="at least 3"):
        hetfuse.barrier(a, a, digits, points=2, progress=False)
    with pytest.raises(HetfuseError, match="different output sizes"):
        hetfuse.barrier(MLP(64, [8], 10), MLP(64, [8], 5), digits, points=3, progress=False)
    with pytest.raises(HetfuseError, match="inputs but"):
        hetfuse.barrier(a, a, (digits.x_test, digits.y_test[:10]), points=3, progress=False)
    with pytest.raises(HetfuseError, match="labels"):
        hetfuse.barrier(a, a, (digits.x_test, digits.y_test + 10), points=3, progress=False)
    with pytest.raises(HetfuseError, match="bogus"):
        hetfuse.barrier(a, a, digits, points=3, align="bogus", progress=False)
    with pytest.raises(HetfuseError, match="equal widths"):  # a permutation needs equal widths
        hetfuse.barrier(a, MLP(64, [24, 32], 10), digits, points=3, align="perm-acts", progress=False)


def test_the_command_writes_json_figure_and_page(tmp_path, capsys):
    from conftest import train_digits_pair

    a, b = train_digits_pair(tmp_path)
    capsys.readouterr()
    out = tmp_path / "barrier"
    argv = ["barrier", str(a), str(b), "--dataset", "digits", "--points", "5", "--samples", "200", "--quiet"]
    assert main(argv + ["--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads((out / "barrier.json").read_text())
    assert printed == data
    for key in ("loss_barrier", "error_barrier", "t_loss", "t_error", "ts", "loss", "error", "model_loss",
                "model_error", "models", "dataset", "config"):
        assert key in data, key
    assert len(data["ts"]) == len(data["loss"]) == len(data["error"]) == 5
    assert data["match"] == "ot-acts" and data["config"]["stages"]["repair"]["method"] == "none"
    assert (out / "barrier.png").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert "barrier.png" in page and "barrier.json" in page and "<script" not in page
    assert str(tmp_path) not in page  # no absolute path of this machine
    # a second run into the same folder is refused unless --force; --align none is vanilla averaging
    assert main(argv + ["--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--out", str(out), "--force", "--align", "none", "--json"]) == 1  # widths differ
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "equal widths" in err[0]
    assert main(argv + ["--depth-align", "sma"]) == 0
    text = capsys.readouterr().out
    assert "loss barrier" in text and "error barrier" in text
    assert main(argv + ["--points", "2"]) == 1
    assert "--points" in capsys.readouterr().err
