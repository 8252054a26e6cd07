"""CIFAR-10 and CIFAR-100 from a local data root, decoded once and cached as ``.npz``.

``load_cifar("cifar10", root)`` looks in ``<root>/cifar10/`` for, in this order of preference:

1. ``cifar-10-batches-py/`` -- the standard pickled batches (``data_batch_1`` .. ``data_batch_5``,
   ``test_batch``), i.e. the original lossless pixels;
2. ``train/`` and ``test/`` -- an unpacked class-folder tree ``<split>/<class>/*.jpg|*.png``;
3. ``cifar10-jpeg.tar.gz`` -- the same tree in a gzip tar, read directly (nothing is unpacked).

``load_cifar("cifar100", root)`` reads the standard ``<root>/cifar100/cifar-100-python/`` folder
(``train``, ``test``; the 100 fine labels).

Class index = position in :data:`CIFAR10_CLASSES` (the standard order, which is also alphabetical).
Nothing is ever downloaded. The decoded uint8 arrays (N x 3 x 32 x 32) are cached under
:func:`default_cache_dir` in a file whose name hashes the source files' paths, sizes and
modification times, so editing or replacing a source invalidates its cache entry. The cache file
is written atomically (temporary file + rename); an unreadable cache entry is ignored and rebuilt.

Images are scaled to [0, 1] and normalised per channel with the standard CIFAR mean / std, the
same for train and test. When the images come from JPEG files, :attr:`Dataset.note` says that
the data are a lossy JPEG re-encoding of CIFAR, so reported results can say so.

The pickled batches are read with a restricted unpickler that only admits the numpy objects the
standard files contain; they are only ever opened from the known folder layout above.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError
from .base import Dataset

from ..cache import CACHE_ENV_VAR  # noqa: E402,F401  (re-exported)
import contextlib
CACHE_FORMAT_VERSION = 1

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

JPEG_TARBALL = "cifar10-jpeg.tar.gz"
CIFAR10_BATCH_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR100_DIR = "cifar-100-python"

JPEG_NOTE = ("CIFAR-10 read from JPEG files (the shared copy is a lossy JPEG re-encoding, quality "
             "about 75, of the original images): accuracies are typically somewhat lower than on "
             "the original CIFAR-10")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SIDE = 32


# --------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    """``<cache root>/datasets``: ``$HETFUSE_CACHE/datasets`` if set, else ``~/.cache/hetfuse/datasets``."""
    from ..cache import cache_dir

    return cache_dir("datasets")


def _fingerprint(kind: str, files: list[Path]) -> str:
    """Hash of the source kind and every source file's resolved path, size and mtime."""
    h = hashlib.sha256(f"hetfuse-cifar-cache v{CACHE_FORMAT_VERSION} {kind}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except Exception as e:  # corrupt / truncated / foreign file: rebuild it
        warnings.warn(f"ignoring unreadable data set cache {path}: {e}", stacklevel=3)
        return None
    try:
        _check_arrays(arrays, str(path))
    except DataError as e:
        warnings.warn(f"ignoring malformed data set cache {path}: {e}", stacklevel=3)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically; a failure only warns (the cache is an optimisation)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # the permissions a new file gets, not mkstemp's 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write data set cache {path}: {e}", stacklevel=3)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, _SIDE, _SIDE):
            raise DataError(f"{where}: {split} images must be uint8 N x 3 x 32 x 32, "
                            f"got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: {x.shape[0]} {split} images but labels of shape {y.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{where}: no {split} images")


# --------------------------------------------------------------------------------------------
# decoders


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one image file's bytes to an RGB uint8 array of shape 32 x 32 x 3."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise DataError(f"cannot decode image {where}: {e}") from None
    if arr.shape != (_SIDE, _SIDE, 3):
        raise DataError(f"image {where} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr


def _split_class_of(parts: tuple[str, ...], where: str) -> tuple[str, int] | None:
    """``(split, class index)`` for an image path ending ``<split>/<class>/<file>``, or None to skip."""
    if len(parts) < 3:
        return None
    split, cls, fname = parts[-3:]
    if split not in ("train", "test") or fname.startswith(".") or not fname.lower().endswith(_IMAGE_SUFFIXES):
        return None
    if cls not in CIFAR10_CLASSES:
        raise DataError(f"{where}: unknown CIFAR-10 class folder {cls!r}; "
                        f"expected one of {', '.join(CIFAR10_CLASSES)}")
    return split, CIFAR10_CLASSES.index(cls)


def _assemble(items: dict[str, list[tuple[int, str, np.ndarray]]], where: str) -> dict[str, np.ndarray]:
    """Sort decoded ``(label, file name, HWC image)`` per split by class then file name; stack to NCHW."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        rows = sorted(items[split], key=lambda r: (r[0], r[1]))
        if not rows:
            raise DataError(f"{where}: no {split} images found (expected {split}/<class>/*.jpg)")
        out[f"x_{split}"] = np.ascontiguousarray(np.stack([r[2] for r in rows]).transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([r[0] for r in rows], dtype=np.int64)
    return out


def _decode_tarball(path: Path) -> dict[str, np.ndarray]:
    """Decode every ``<split>/<class>/<file>.jpg`` member of a (gzip) tar, streaming it once."""
    items: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts
                where = f"{path}:{member.name}"
                sc = _split_class_of(parts, where)
                if sc is None:
                    continue
                fobj = tf.extractfile(member)
                if fobj is None:
                    continue
                img = _decode_image(fobj.read(), where)
                items[sc[0]].append((sc[1], parts[-1], img))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read CIFAR-10 tarball {path}: {e}") from None
    return _assemble(items, str(path))


def _tree_files(folder: Path) -> list[Path]:
    files = []
    for split in ("train", "test"):
        for cls_dir in sorted((folder / split).iterdir()):
            if cls_dir.is_dir():
                files.extend(sorted(p for p in cls_dir.iterdir()
                                    if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
                                    and not p.name.startswith(".")))
    return files


def _decode_tree(folder: Path, files: list[Path]) -> dict[str, np.ndarray]:
    items: dict[str, list] = {"train": [], "test": []}
    for p in files:
        sc = _split_class_of(p.parts, str(p))
        if sc is None:
            continue
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from None
        items[sc[0]].append((sc[1], p.name, _decode_image(data, str(p))))
    return _assemble(items, str(folder))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that admits only the numpy objects found in the standard CIFAR batch files."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
                try:
                    return super().find_class(module.replace("numpy.core", "numpy._core", 1), name)
                except (ImportError, AttributeError):
                    pass
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle(path: Path) -> dict:
    """Load one standard CIFAR batch file (a pickled dict; bytes keys with ``encoding='bytes'``)."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read CIFAR batch file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch file {path} does not hold a dict (got {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"CIFAR batch file {path} lacks 'data' or {label_key!r} (has {sorted(map(str, d))})")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * _SIDE * _SIDE:
        raise DataError(f"CIFAR batch file {path}: 'data' must be uint8 N x 3072, got {x.dtype} {x.shape}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"CIFAR batch file {path}: {x.shape[0]} images but {y.shape[0]} labels")
    # rows hold the 1024 red, then green, then blue values of a row-major 32 x 32 image
    return x.reshape(-1, 3, _SIDE, _SIDE), y


def _decode_batches(train_files: list[Path], test_files: list[Path], label_key: str) -> dict[str, np.ndarray]:
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        parts = [_batch_arrays(p, label_key) for p in files]
        out[f"x_{split}"] = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
        out[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return out


# --------------------------------------------------------------------------------------------
# loading


def _normalise(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32, scaled to [0, 1], minus ``mean``, over ``std`` (per channel)."""
    t = torch.from_numpy(x).to(torch.float32)
    t.div_(255.0)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    t.div_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return t


def _announce(name: str, kind: str, files: list[Path], cache_path: Path | None) -> None:
    """Say what a long first decode does before it starts (about 15 s for the CIFAR-10 JPEG tarball)."""
    src = files[0].parent if len(files) > 1 else files[0]
    where = f"; cached in {cache_path} for next time" if cache_path is not None else ""
    slow = " (JPEG, about 15 s)" if kind in ("jpegtar", "tree") else ""
    print(f"hetfuse: decoding {name} from {src} once{slow}{where}", file=sys.stderr, flush=True)


def _cached(kind: str, name: str, files: list[Path], decode, cache_dir: Path | None) -> dict[str, np.ndarray]:
    if cache_dir is None:
        _announce(name, kind, files, None)
        arrays = decode()
        _check_arrays(arrays, name)
        return arrays
    cache_path = Path(cache_dir) / f"{name}-{kind}-{_fingerprint(kind, files)}.npz"
    arrays = _read_cache(cache_path)
    if arrays is None:
        _announce(name, kind, files, cache_path)
        arrays = decode()
        _check_arrays(arrays, name)
        _write_cache(cache_path, arrays)
    return arrays


def cifar_uint8(name: str, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None | bool = True,
                ) -> tuple[dict[str, np.ndarray], str | None]:
    """The raw uint8 arrays (``x_*``: N x 3 x 32 x 32, ``y_*``: int64) and the note for ``name``.

    ``root`` is the data root (holding ``cifar10/`` or ``cifar100/``). ``cache_dir``: True for
    :func:`default_cache_dir`, a folder, or False/None to neither read nor write a cache.
    """
    low = name.strip().lower()
    root = Path(root).expanduser()
    if cache_dir is True:
        cdir: Path | None = default_cache_dir()
    elif cache_dir is False or cache_dir is None:
        cdir = None
    else:
        cdir = Path(cache_dir).expanduser()

    tried: list[Path] = []
    if low == "cifar10":
        folder = root / "cifar10"
        bdir = folder / CIFAR10_BATCH_DIR
        train_b = [bdir / b for b in CIFAR10_TRAIN_BATCHES]
        test_b = [bdir / CIFAR10_TEST_BATCH]
        tried.extend(train_b + test_b)
        if all(p.is_file() for p in train_b + test_b):
            arrays = _cached("batches", low, train_b + test_b,
                             lambda: _decode_batches(train_b, test_b, "labels"), cdir)
            return arrays, None
        tree = [folder / "train", folder / "test"]
        tried.extend(tree)
        if all(p.is_dir() for p in tree):
            files = _tree_files(folder)
            arrays = _cached("tree", low, files, lambda: _decode_tree(folder, files), cdir)
            note = JPEG_NOTE if any(p.suffix.lower() in (".jpg", ".jpeg") for p in files) else None
            return arrays, note
        tar = folder / JPEG_TARBALL
        tried.append(tar)
        if tar.is_file():
            return _cached("jpegtar", low, [tar], lambda: _decode_tarball(tar), cdir), JPEG_NOTE
        what = "CIFAR-10"
    elif low == "cifar100":
        bdir = root / "cifar100" / CIFAR100_DIR
        train_f, test_f = bdir / "train", bdir / "test"
        tried.extend([train_f, test_f])
        if train_f.is_file() and test_f.is_file():
            arrays = _cached("batches", low, [train_f, test_f],
                             lambda: _decode_batches([train_f], [test_f], "fine_labels"), cdir)
            return arrays, None
        what = "CIFAR-100"
    else:
        raise DataError(f"unknown CIFAR data set {name!r}; known: cifar10, cifar100")
    layout = ("cifar10/cifar-10-batches-py/, cifar10/train/ + cifar10/test/ class folders, or "
              "cifar10/cifar10-jpeg.tar.gz" if low == "cifar10" else "cifar100/cifar-100-python/{train,test}")
    raise DataError(f"data set {low!r}: no {what} files under {root} (expected {layout})",
                    details="looked at:\n  " + "\n  ".join(str(p) for p in tried))


def load_cifar(name: str, root: str | os.PathLike, *,
               cache_dir: str | os.PathLike | None | bool = True) -> Dataset:
    """Load ``cifar10`` or ``cifar100`` from the data root ``root`` as a normalised :class:`Dataset`.

    ``x_*`` are float32 N x 3 x 32 x 32, normalised per channel with the standard CIFAR mean and
    std (identically for train and test); ``y_*`` are int64 class indices. See the module doc
    for the accepted file layouts and the cache (``cache_dir`` as in :func:`cifar_uint8`).
    """
    low = name.strip().lower()
    arrays, note = cifar_uint8(low, root, cache_dir=cache_dir)
    if low == "cifar10":
        mean, std, num_classes = CIFAR10_MEAN, CIFAR10_STD, 10
    else:
        mean, std, num_classes = CIFAR100_MEAN, CIFAR100_STD, 100
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"data set {low!r}: {split} labels outside 0..{num_classes - 1} "
                            f"(min {int(y.min())}, max {int(y.max())})")
    x_train = _normalise(arrays["x_train"], mean, std)
    x_test = _normalise(arrays["x_test"], mean, std)
    return Dataset(low, x_train, torch.from_numpy(np.ascontiguousarray(arrays["y_train"], dtype=np.int64)),
                   x_test, torch.from_numpy(np.ascontiguousarray(arrays["y_test"], dtype=np.int64)),
                   num_classes, (3, _SIDE, _SIDE), note=note)
