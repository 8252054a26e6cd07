import json
import os

import pytest
import torch
from safetensors.torch import save_file

from hetfuse.errors import CheckpointError
from hetfuse.io import load_checkpoint, save_checkpoint
from hetfuse.models import MLP


def make_model(seed=0):
    torch.manual_seed(seed)
    return MLP(64, [16, 8], 10, bias=[True, False, True])


def test_roundtrip(tmp_path):
    m = make_model()
    p = save_checkpoint(m, tmp_path / "sub" / "m.safetensors", metadata={"seed": 3, "acc": 91.5})
    assert p.is_file()
    loaded, extra = load_checkpoint(p)
    assert extra == {"seed": 3, "acc": 91.5}
    assert isinstance(loaded, MLP) and not loaded.training
    assert loaded.arch() == m.arch()
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    assert torch.equal(loaded(x), m(x))
    assert os.listdir(tmp_path / "sub") == ["m.safetensors"]


def test_overwrite(tmp_path):
    p = tmp_path / "m.safetensors"
    save_checkpoint(make_model(0), p)
    before = p.read_bytes()
    with pytest.raises(CheckpointError, match="force=True") as e:  # a Python caller's keyword (the CLI: --force)
        save_checkpoint(make_model(1), p)
    assert "--force" not in str(e.value) and "--force" in e.value.cli_message
    assert p.read_bytes() == before
    save_checkpoint(make_model(1), p, force=True)
    loaded, _ = load_checkpoint(p)
    assert torch.equal(loaded.linears()[0].weight, make_model(1).linears()[0].weight)


def test_nan_refused_on_save_and_load(tmp_path):
    m = make_model()
    with torch.no_grad():
        m.linears()[1].weight[0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(m, p)
    assert list(tmp_path.iterdir()) == []
    # a file with NaN written by something else
    meta = {"format": "hetfuse", "hetfuse_version": "0", "arch": json.dumps(m.arch()), "extra": "{}"}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p), metadata=meta)
    with pytest.raises(CheckpointError, match=str(p).replace("\\", "\\\\") + ".*NaN"):
        load_checkpoint(p)


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)
    good = save_checkpoint(make_model(), tmp_path / "good.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_checkpoint(trunc)


def test_foreign_and_mismatch(tmp_path):
    m = make_model()
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    foreign = tmp_path / "foreign.safetensors"
    save_file(state, str(foreign))
    with pytest.raises(CheckpointError, match="foreign"):
        load_checkpoint(foreign)
    other_arch = MLP(64, [16, 9], 10, bias=[True, False, True]).arch()
    meta = {"format": "hetfuse", "hetfuse_version": "0", "arch": json.dumps(other_arch), "extra": "{}"}
    mism = tmp_path / "mismatch.safetensors"
    save_file(state, str(mism), metadata=meta)
    with pytest.raises(CheckpointError, match="mismatch.safetensors.*shape"):
        load_checkpoint(mism)
    missing = tmp_path / "missing.safetensors"
    meta["arch"] = json.dumps(m.arch())
    save_file({k: v for k, v in state.items() if k != "layers.1.weight"}, str(missing), metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(missing)


def test_pickle_refused_unless_allowed(tmp_path):
    m = make_model()
    whole = tmp_path / "whole.pt"
    torch.save(m, whole)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_checkpoint(whole)
    loaded, extra = load_checkpoint(whole, allow_pickle=True)
    x = torch.randn(3, 64)
    m.eval()
    assert torch.equal(loaded(x), m(x)) and extra == {} and not loaded.training

    d = tmp_path / "dict.pth"
    torch.save({"arch": m.arch(), "state_dict": m.state_dict()}, d)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_checkpoint(d)
    loaded2, _ = load_checkpoint(d, allow_pickle=True)
    assert torch.equal(loaded2(x), m(x))

    # a torch.save file disguised with a .safetensors name is still refused
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(d.read_bytes())
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_checkpoint(disguised)


def test_no_partial_file_on_failure(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*args, **kwargs):
        path = args[1] if len(args) > 1 else kwargs["filename"]
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    target = tmp_path / "out" / "m.safetensors"
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(make_model(), target)
    assert list((tmp_path / "out").iterdir()) == []


def _conv_sequential():
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Sequential(nn.Conv2d(8, 12, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(12),
                                    nn.ReLU(inplace=True)),
                      nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Dropout(0.2),
                      nn.Linear(48, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Identity(), nn.Linear(20, 10))
    m.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that differ from a fresh BatchNorm's
            m(torch.randn(16, 3, 16, 16))
    return m.eval()


def test_a_plain_sequential_loads_without_base(tmp_path):
    """nn.Sequential of standard torch layers: its layers are recorded as data, so load_model needs no base= and
    executes no code."""
    from collections import OrderedDict

    from torch import nn

    from hetfuse.io import load_model, save_model
    from hetfuse.io.checkpoint import read_header

    m = _conv_sequential()
    p = save_model(m, tmp_path / "seq.safetensors")
    assert "sequential" in json.loads(read_header(p)[0]["base"])
    loaded = load_model(p)
    assert type(loaded) is nn.Sequential and not loaded.training
    assert list(loaded.state_dict()) == list(m.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded(x), m(x))
    # named layers and float64 parameters
    named = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 32), act=nn.ReLU(), fc2=nn.Linear(32, 10))).double().eval()
    back = load_model(save_model(named, tmp_path / "named.safetensors"))
    y = torch.randn(3, 64, dtype=torch.float64)
    assert back.fc1.weight.dtype == torch.float64 and torch.equal(back(y), named(y))


def test_a_sequential_with_other_layers_still_needs_base(tmp_path):
    from torch import nn

    from hetfuse.io import load_model, save_model

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    m = nn.Sequential(nn.Linear(4, 4), Scale()).eval()
    p = save_model(m, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="Sequential.*base="):
        load_model(p)
    x = torch.randn(2, 4)
    assert torch.equal(load_model(p, base=nn.Sequential(nn.Linear(4, 4), Scale()))(x), m(x))


@pytest.mark.parametrize("layer", [
    {"type": "Module", "args": {}},  # not a listed layer type
    {"type": "Linear", "args": {"in_features": 4, "out_features": 4, "bias": True, "device": "cpu"}},
    {"type": "Conv2d", "args": {"in_channels": 4, "out_channels": 4, "kernel_size": 1, "padding_mode": "os.system"}},
    {"type": "Linear", "args": {"in_features": 4, "out_features": 2**50}},
])
def test_a_tampered_sequential_description_is_refused(tmp_path, layer):
    from torch import nn

    from hetfuse.io import save_model
    from hetfuse.io.checkpoint import read_header

    p = save_model(nn.Sequential(nn.Linear(4, 4)), tmp_path / "s.safetensors")
    meta, _ = read_header(p)
    from safetensors.torch import load_file

    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(p)), str(bad), metadata=dict(meta, base=json.dumps({"sequential": [["0", layer]]})))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)
