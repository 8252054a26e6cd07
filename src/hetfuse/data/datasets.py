"""Data sets: MNIST (from IDX files under a data root), any IDX folder, scikit-learn's bundled digits,
and CIFAR-10 / CIFAR-100 (see :mod:`hetfuse.data.cifar`).

Nothing here downloads anything. The data root comes from ``--data`` (the ``root`` argument) or the
``HETFUSE_DATA`` environment variable.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import Dataset

ENV_VAR = "HETFUSE_DATA"
KNOWN_DATASETS = ("mnist", "idx:PATH", "digits", "cifar10", "cifar100")

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root`` if given, else ``$HETFUSE_DATA``, else a :class:`DataError`."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    raise DataError(
        "no data root given: pass --data-root DIR (the folder that holds mnist/, cifar10/) "
        f"or set the environment variable {ENV_VAR}=DIR"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain, detected by its magic bytes) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"corrupt gzip data in IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise DataError(f"not an IDX file (too short, {len(raw)} bytes): {path}")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"not an IDX file (bad magic bytes {raw[:4].hex()}): {path}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"not an IDX file (unknown type code 0x{code:02x}): {path}")
    if ndim == 0:
        raise DataError(f"not an IDX file (zero dimensions): {path}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX header ({len(raw)} bytes, need {header}): {path}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"IDX file {path} has {actual} data bytes but its header (dims {dims}, {dtype.name}) "
            f"says {expected}: the file is corrupt or truncated"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header, count=math.prod(dims)).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: Path, stem: str, tried: list[Path]) -> Path | None:
    for cand in (folder / f"{stem}.gz", folder / stem):
        tried.append(cand)
        if cand.is_file():
            return cand
    return None


def _load_idx_folder(folder: Path, name: str) -> Dataset:
    tried: list[Path] = []
    found = {key: _find_idx(folder, stem, tried) for key, stem in IDX_FILES.items()}
    missing = [k for k, p in found.items() if p is None]
    if missing:
        raise DataError(f"data set {name!r}: missing IDX file(s) for {', '.join(missing)} in {folder} (expected the "
                        "four files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                        "t10k-labels-idx1-ubyte, each optionally .gz)",
                        details="looked at:\n  " + "\n  ".join(str(p) for p in tried))
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if xs.ndim < 2:
            raise DataError(f"data set {name!r}: {split} images in {found['x_' + split]} are not images "
                            f"(shape {xs.shape})")
        if ys.ndim != 1:
            raise DataError(f"data set {name!r}: {split} labels in {found['y_' + split]} must be 1-D, "
                            f"got shape {ys.shape}")
        if xs.shape[0] != ys.shape[0]:
            raise DataError(
                f"data set {name!r}: {xs.shape[0]} {split} images ({found['x_' + split]}) but "
                f"{ys.shape[0]} labels ({found['y_' + split]})"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"data set {name!r}: train images {arrays['x_train'].shape[1:]} and test images "
                        f"{arrays['x_test'].shape[1:]} differ in shape")

    def prep_x(a: np.ndarray) -> torch.Tensor:
        # identical preprocessing for train and test
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
        t = (t - MNIST_MEAN) / MNIST_STD
        if t.ndim == 3:
            t = t.unsqueeze(1)
        return t.contiguous()

    x_train, x_test = prep_x(arrays["x_train"]), prep_x(arrays["x_test"])
    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    for split, y in (("train", y_train), ("test", y_test)):
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"data set {name!r}: negative {split} label {int(y.min())}")
    num_classes = int(max(int(y_train.max()) if y_train.numel() else -1,
                          int(y_test.max()) if y_test.numel() else -1)) + 1
    if name == "mnist":
        num_classes = max(num_classes, 10)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, tuple(x_train.shape[1:]))


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise DataError(f"the 'digits' data set needs scikit-learn: {e}") from None
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    n_test = 400
    train_idx, test_idx = perm[: len(x) - n_test], perm[len(x) - n_test:]
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    xt = torch.from_numpy(x_train).reshape(-1, 1, 8, 8).contiguous()
    xs = torch.from_numpy(x_test).reshape(-1, 1, 8, 8).contiguous()
    return Dataset("digits", xt, torch.from_numpy(y[train_idx]), xs, torch.from_numpy(y[test_idx]),
                   10, (1, 8, 8))


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``mnist`` (``<root>/mnist/``), ``idx:PATH`` (a folder of the four IDX files), ``digits``,
    ``cifar10`` (``<root>/cifar10/``) or ``cifar100`` (``<root>/cifar100/``)."""
    key = name.strip()
    low = key.lower()
    if low == "digits":
        return _load_digits()
    if low.startswith("idx:"):
        folder = Path(key[4:]).expanduser()
        if not key[4:]:
            raise DataError("data set 'idx:PATH' needs a folder, e.g. idx:/data/mnist")
        return _load_idx_folder(folder, key)
    if low == "mnist":
        return _load_idx_folder(resolve_data_root(root) / "mnist", "mnist")
    if low in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(low, resolve_data_root(root))
    raise DataError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def skill_split(labels: torch.Tensor, part: str, *, seed: int = 0, special_label: int = 4,
                other_fraction: float = 0.1) -> torch.Tensor:
    """Indices of the heterogeneous "skill" split.

    Part A (``"a"``/``"skill-a"``): every example of ``special_label`` plus a random ``other_fraction``
    of each other label's examples. Part B (``"b"``/``"skill-b"``): the rest. ``"all"``: every index.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    p = part.strip().lower()
    n = labels.numel()
    if p == "all":
        return torch.arange(n, dtype=torch.long)
    if p not in ("a", "skill-a", "b", "skill-b"):
        raise DataError(f"unknown split part {part!r}; known: a, skill-a, b, skill-b, all")
    if not 0.0 <= other_fraction <= 1.0:
        raise DataError(f"other_fraction must lie in [0, 1], got {other_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    in_a = labels == special_label
    for lab in torch.unique(labels).tolist():
        if lab == special_label:
            continue
        idx = torch.nonzero(labels == lab, as_tuple=False).reshape(-1)
        k = int(round(other_fraction * idx.numel()))
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[:k]]
        in_a[chosen] = True
    mask = in_a if p in ("a", "skill-a") else ~in_a
    return torch.nonzero(mask, as_tuple=False).reshape(-1)


def alignment_samples(x: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``x`` chosen at random without replacement (seeded)."""
    have = int(x.shape[0])
    if n < 0:
        raise DataError(f"number of samples must be non-negative, got {n}")
    if have < n:
        raise DataError(f"fewer samples than requested: asked {n}, have {have}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(have, generator=gen)[:n]
    return x[idx]
