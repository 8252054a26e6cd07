import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hetfuse.data import alignment_samples, load_dataset, read_idx, resolve_data_root, skill_split
from hetfuse.errors import DataError


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, code: int = 0x08) -> Path:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx_folder(folder: Path, n_train=20, n_test=8, gz=True, side=28) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, side, side)), gz=gz)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", np.arange(n_train) % 10, gz=gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, side, side)), gz=gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10, gz=gz)
    return folder


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code", [0x08, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_roundtrip(tmp_path, gz, code):
    arr = (np.arange(24).reshape(2, 3, 4) % 100).astype(np.float64)
    out = read_idx(write_idx(tmp_path / "f.idx", arr, gz=gz, code=code))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.isnative


def test_read_idx_corrupt(tmp_path):
    p = write_idx(tmp_path / "f", np.zeros((3, 4)))
    raw = p.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-1])
    (tmp_path / "magic").write_bytes(b"\x01\x00" + raw[2:])
    (tmp_path / "code").write_bytes(b"\x00\x00\x07" + raw[3:])
    (tmp_path / "short").write_bytes(b"\x00\x00")
    (tmp_path / "badgz").write_bytes(gzip.compress(raw)[:-6])
    for name in ["trunc", "magic", "code", "short", "badgz"]:
        with pytest.raises(DataError):
            read_idx(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_folder(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "m", gz=gz)
    ds = load_dataset(f"idx:{folder}")
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (8, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_dim == 784 and ds.input_shape == (1, 28, 28)
    # identical preprocessing for train and test: raw 0 maps to the same value in both
    raw_tr = read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    expect = (raw_tr.astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expect, rtol=1e-6, atol=1e-6)


def test_mnist_via_root(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "mnist")
    ds = load_dataset("mnist", tmp_path)
    assert ds.num_classes == 10 and len(ds.y_train) == 20
    monkeypatch.setenv("HETFUSE_DATA", str(tmp_path))
    assert load_dataset("mnist").x_test.shape[0] == 8


def test_count_mismatch(tmp_path):
    folder = write_idx_folder(tmp_path / "m", gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(7) % 10)
    with pytest.raises(DataError, match="labels"):
        load_dataset(f"idx:{folder}")


def test_missing_files_lists_paths(tmp_path):
    """One line naming the folder and the expected files; every path looked at in the details."""
    with pytest.raises(DataError) as ei:
        load_dataset("mnist", tmp_path)
    msg, details = str(ei.value), ei.value.details
    assert "\n" not in msg and str(tmp_path / "mnist") in msg
    for stem in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        assert stem in msg
        assert str(tmp_path / "mnist" / stem) in details
        assert str(tmp_path / "mnist" / (stem + ".gz")) in details


def test_unknown_name_and_root(monkeypatch):
    with pytest.raises(DataError, match="mnist.*digits"):
        load_dataset("nope")
    monkeypatch.delenv("HETFUSE_DATA", raising=False)
    with pytest.raises(DataError, match="HETFUSE_DATA"):
        resolve_data_root(None)
    assert resolve_data_root("/x") == Path("/x")
    monkeypatch.setenv("HETFUSE_DATA", "/y")
    assert resolve_data_root(None) == Path("/y")


def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1397, 1, 8, 8) and ds.x_test.shape == (400, 1, 8, 8)
    assert ds.y_train.shape == (1397,) and ds.num_classes == 10 and ds.input_dim == 64
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-2
    ds2 = load_dataset("digits")
    assert torch.equal(ds.x_test, ds2.x_test) and torch.equal(ds.y_train, ds2.y_train)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=300), seed=st.integers(0, 2**31 - 1),
       frac=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]))
def test_skill_split_properties(labels, seed, frac):
    y = torch.tensor(labels)
    a = skill_split(y, "a", seed=seed, other_fraction=frac)
    b = skill_split(y, "skill-b", seed=seed, other_fraction=frac)
    allidx = skill_split(y, "all")
    assert torch.equal(allidx, torch.arange(len(labels)))
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(len(labels)))
    assert set(torch.nonzero(y == 4).reshape(-1).tolist()) <= set(a.tolist())
    for lab in range(10):
        if lab == 4:
            continue
        n_lab = int((y == lab).sum())
        n_in_a = int((y[a] == lab).sum())
        assert n_in_a == round(frac * n_lab)
    assert torch.equal(a, skill_split(y, "skill-a", seed=seed, other_fraction=frac))


def test_skill_split_seed_changes_selection():
    y = torch.arange(2000) % 10
    a0, a1 = skill_split(y, "a", seed=0), skill_split(y, "a", seed=1)
    assert len(a0) == len(a1) == 200 + 9 * 20
    assert not torch.equal(a0, a1)
    with pytest.raises(DataError):
        skill_split(y, "c")


def test_alignment_samples():
    x = torch.arange(50).reshape(25, 2).float()
    s = alignment_samples(x, 10, seed=3)
    assert s.shape == (10, 2)
    assert len({tuple(r) for r in s.tolist()}) == 10
    assert torch.equal(s, alignment_samples(x, 10, seed=3))
    assert alignment_samples(x, 25).shape == (25, 2)
    with pytest.raises(DataError, match="fewer samples than requested: asked 26, have 25"):
        alignment_samples(x, 26)


@pytest.mark.slow
def test_real_mnist(data_root):
    ds = load_dataset("mnist", data_root)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert int(ds.y_train.min()) == 0 and int(ds.y_train.max()) == 9
    assert int(ds.y_test.min()) == 0 and int(ds.y_test.max()) == 9
    assert ds.num_classes == 10
    assert abs(float(ds.x_train.mean())) < 0.05 and abs(float(ds.x_train.std()) - 1) < 0.05
