import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hetfuse.data.cifar as cifar
from hetfuse.data import Dataset, load_dataset, random_crop_flip
from hetfuse.data.cifar import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                load_cifar)
from hetfuse.errors import DataError

# --------------------------------------------------------------------------------------------
# fake sources

COLOURS = [(int(30 + 20 * i), int(220 - 20 * i), int((70 * i) % 256)) for i in range(10)]


def _img_bytes(colour, fmt="JPEG") -> bytes:
    arr = np.empty((32, 32, 3), dtype=np.uint8)
    arr[:] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_jpeg_tarball(folder: Path, n_train=3, n_test=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        # written in reverse order to check the loader sorts by class, then file name
        for split, n in (("test", n_test), ("train", n_train)):
            for cls_i in reversed(range(10)):
                for j in reversed(range(n)):
                    data = _img_bytes(COLOURS[cls_i])
                    info = tarfile.TarInfo(f"{split}/{CIFAR10_CLASSES[cls_i]}/{j:04d}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def write_png_tree(folder: Path, n_train=2, n_test=1) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for cls_i, cls in enumerate(CIFAR10_CLASSES):
            d = folder / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                (d / f"{j:04d}.png").write_bytes(_img_bytes(COLOURS[cls_i], fmt="PNG"))
    return folder


def _batch(x: np.ndarray, labels, label_key=b"labels") -> dict:
    return {b"batch_label": b"fake batch", label_key: list(labels), b"data": x,
            b"filenames": [b"f%d.png" % i for i in range(len(x))]}


def write_fake_batches(folder: Path, per_batch=4, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(_batch(x, y.tolist()), protocol=2))
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test)
    (d / "test_batch").write_bytes(pickle.dumps(_batch(xt, yt.tolist()), protocol=2))
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def _norm(x_flat: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(x_flat.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("HETFUSE_CACHE", str(c))
    return c / "datasets"


def _cache_files(cache_dir: Path):
    return sorted(cache_dir.iterdir()) if cache_dir.exists() else []


# --------------------------------------------------------------------------------------------
# loading


def test_jpeg_tarball(tmp_path, cache):
    write_jpeg_tarball(tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path)
    assert isinstance(ds, Dataset) and ds.name == "cifar10"
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32) and ds.input_dim == 3072
    assert ds.y_train.tolist() == [c for c in range(10) for _ in range(3)]
    assert ds.y_test.tolist() == [c for c in range(10) for _ in range(2)]
    assert ds.note is not None and "JPEG" in ds.note
    # every image is its class colour (up to JPEG error), normalised with the CIFAR-10 statistics
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        pix = (x * std + mean) * 255.0
        want = torch.tensor([COLOURS[int(c)] for c in y], dtype=torch.float32).view(-1, 3, 1, 1)
        assert (pix - want).abs().max() < 6.0
    # the cache was written atomically: one .npz, no temporary files left
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].suffix == ".npz"


def test_cache_hit_does_not_decode(tmp_path, cache, monkeypatch):
    tar = write_jpeg_tarball(tmp_path / "cifar10")
    first = load_dataset("cifar10", tmp_path)

    def boom(*a, **k):
        raise AssertionError("decoder called on a cache hit")

    monkeypatch.setattr(cifar, "_decode_image", boom)
    second = load_dataset("cifar10", tmp_path)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    assert second.note == first.note
    # a changed source (new mtime) is a cache miss
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_cache_is_rebuilt(tmp_path, cache):
    write_jpeg_tarball(tmp_path / "cifar10")
    first = load_dataset("cifar10", tmp_path)
    (path,) = _cache_files(cache)
    path.write_bytes(b"not an npz file")
    with pytest.warns(UserWarning, match="cache"):
        again = load_dataset("cifar10", tmp_path)
    assert torch.equal(first.x_train, again.x_train)
    assert np.load(path)["x_train"].shape == (30, 3, 32, 32)


def test_no_cache(tmp_path, cache):
    write_jpeg_tarball(tmp_path / "cifar10")
    ds = load_cifar("cifar10", tmp_path, cache_dir=False)
    assert ds.x_train.shape[0] == 30 and _cache_files(cache) == []


def test_png_tree_exact(tmp_path, cache):
    write_png_tree(tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert ds.y_train.tolist() == [c for c in range(10) for _ in range(2)]
    want = np.array([np.full((32, 32, 3), COLOURS[c], np.uint8).transpose(2, 0, 1).reshape(-1)
                     for c in ds.y_test.tolist()])
    torch.testing.assert_close(ds.x_test, _norm(want, CIFAR10_MEAN, CIFAR10_STD))
    assert ds.note is None  # lossless PNG files


def test_unknown_class_folder(tmp_path, cache):
    write_png_tree(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "train" / "zebra").mkdir()
    (tmp_path / "cifar10" / "train" / "zebra" / "0000.png").write_bytes(_img_bytes((0, 0, 0), "PNG"))
    with pytest.raises(DataError, match="zebra"):
        load_dataset("cifar10", tmp_path)


def test_pickled_batches(tmp_path, cache):
    folder = tmp_path / "cifar10"
    xtr, ytr, xte, yte = write_fake_batches(folder)
    write_jpeg_tarball(folder)  # the lossless batches win over the JPEG tarball
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.y_train.tolist() == ytr.tolist() and ds.y_test.tolist() == yte.tolist()
    torch.testing.assert_close(ds.x_train, _norm(xtr, CIFAR10_MEAN, CIFAR10_STD))
    torch.testing.assert_close(ds.x_test, _norm(xte, CIFAR10_MEAN, CIFAR10_STD))
    assert ds.note is None and ds.num_classes == 10


def test_pickled_batches_cache_hit(tmp_path, cache, monkeypatch):
    write_fake_batches(tmp_path / "cifar10")
    first = load_dataset("cifar10", tmp_path)
    monkeypatch.setattr(cifar, "_unpickle", lambda *a: (_ for _ in ()).throw(AssertionError("re-read")))
    assert torch.equal(load_dataset("cifar10", tmp_path).x_train, first.x_train)


def test_unsafe_pickle_refused(tmp_path, cache):
    write_fake_batches(tmp_path / "cifar10")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", tmp_path)


def test_cifar100(tmp_path, cache):
    d = tmp_path / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xtr, xte = rng.integers(0, 256, (7, 3072), dtype=np.uint8), rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    ytr, yte = [0, 99, 5, 42, 7, 7, 63], [1, 2, 98, 3]
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        b = _batch(x, y, label_key=b"fine_labels")
        b[b"coarse_labels"] = [v // 5 for v in y]
        (d / name).write_bytes(pickle.dumps(b, protocol=2))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.y_train.tolist() == ytr and ds.y_test.tolist() == yte
    torch.testing.assert_close(ds.x_train, _norm(xtr, CIFAR100_MEAN, CIFAR100_STD))
    torch.testing.assert_close(ds.x_test, _norm(xte, CIFAR100_MEAN, CIFAR100_STD))


def test_missing_files_message(tmp_path, cache):
    """One line naming the root and the expected layout; every path looked at in the details."""
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", tmp_path)
    msg, details = str(ei.value), ei.value.details
    assert "\n" not in msg and str(tmp_path) in msg and "cifar10-jpeg.tar.gz" in msg
    c = tmp_path / "cifar10"
    for p in ([c / "cifar-10-batches-py" / f"data_batch_{i}" for i in range(1, 6)]
              + [c / "cifar-10-batches-py" / "test_batch", c / "train", c / "test", c / "cifar10-jpeg.tar.gz"]):
        assert str(p) in details
    with pytest.raises(DataError) as ei:
        load_dataset("cifar100", tmp_path)
    assert str(tmp_path / "cifar100" / "cifar-100-python" / "train") in ei.value.details
    assert str(tmp_path / "cifar100" / "cifar-100-python" / "test") in ei.value.details


def test_tarball_without_test_split(tmp_path, cache):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar10-jpeg.tar.gz", "w:gz") as tf:
        data = _img_bytes(COLOURS[0])
        info = tarfile.TarInfo("train/airplane/0000.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="no test images"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------
# augmentation


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_shape_and_determinism():
    x = torch.randn(16, 3, 32, 32)
    a = random_crop_flip(x, generator=_gen(3))
    b = random_crop_flip(x, generator=_gen(3))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, random_crop_flip(x, generator=_gen(4)))


def test_augment_padding0_is_identity_or_mirror():
    x = torch.randn(64, 3, 8, 5)
    out = random_crop_flip(x, padding=0, generator=_gen(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 64  # both cases occur
    assert torch.equal(random_crop_flip(x, padding=0, flip=False, generator=_gen(0)), x)


def test_augment_matches_a_padded_crop_exactly():
    h, w, p = 6, 7, 2
    x = (torch.arange(2 * h * w, dtype=torch.float32) + 1).view(1, 2, h, w).repeat(200, 1, 1, 1)
    out = random_crop_flip(x, padding=p, generator=_gen(1))
    padded = torch.nn.functional.pad(x[0], (p, p, p, p))
    candidates = {}
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            crop = padded[:, oy:oy + h, ox:ox + w]
            candidates[(oy, ox, False)] = crop
            candidates[(oy, ox, True)] = crop.flip(-1)
    seen = set()
    for img in out:
        hits = [k for k, c in candidates.items() if torch.equal(c, img)]
        assert hits, "output is not a crop(+flip) of the zero-padded input"
        seen.add(hits[0])
    assert len(seen) > 25  # offsets and flips are actually random (50 possibilities)


def test_augment_constant_image():
    x = torch.full((32, 3, 10, 10), 2.5)
    out = random_crop_flip(x, padding=3, generator=_gen(2))
    assert set(out.unique().tolist()) <= {0.0, 2.5}
    for img in out:
        m = img[0] == 2.5
        rows, cols = m.any(1).nonzero().view(-1), m.any(0).nonzero().view(-1)
        # the image part is one solid rectangle of at least (10 - 3) x (10 - 3), the rest zeros
        assert len(rows) >= 7 and len(cols) >= 7
        assert bool(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all())
        assert int(m.sum()) == len(rows) * len(cols)
        assert torch.equal(img[1], img[0]) and torch.equal(img[2], img[0])


def test_augment_errors_and_empty():
    with pytest.raises(ValueError):
        random_crop_flip(torch.zeros(3, 32, 32), generator=_gen())
    with pytest.raises(ValueError):
        random_crop_flip(torch.zeros(1, 3, 4, 4), padding=-1, generator=_gen())
    assert random_crop_flip(torch.zeros(0, 3, 4, 4), generator=_gen()).shape == (0, 3, 4, 4)


def test_augment_is_fast():
    x = torch.randn(512, 3, 32, 32)
    g = _gen()
    random_crop_flip(x, generator=g)  # warm-up
    t = time.perf_counter()
    for _ in range(5):
        random_crop_flip(x, generator=g)
    assert (time.perf_counter() - t) / 5 < 0.2


# --------------------------------------------------------------------------------------------
# the real data (shared JPEG copy): slow on the first run (decodes 60,000 JPEGs), fast once cached


@pytest.mark.slow
def test_real_cifar10(cifar_root):
    ds = load_dataset("cifar10", cifar_root)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.num_classes == 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    # normalised with the standard statistics: per-channel mean ~0 and std ~1 on the training set
    m = ds.x_train.mean(dim=(0, 2, 3))
    s = ds.x_train.std(dim=(0, 2, 3))
    assert m.abs().max() < 0.05 and (s - 1).abs().max() < 0.05
