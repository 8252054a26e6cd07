"""What the experiments share: seeds, the cache of trained models, training recipes, CSV output."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..cache import cache_dir, cache_key
from ..data import Dataset, load_dataset
from ..errors import CheckpointError, HetfuseError
from ..io import load_checkpoint, save_checkpoint
from ..report.tables import fmt_ms, mean_std  # noqa: F401  (re-exported for the experiments)

# The paper's MNIST MLP settings (CLAFusion Appendix B, Table 5).
MLP_RECIPE = {"lr": 0.01, "momentum": 0.5, "batch_size": 64}
# CIFAR training used by the CLAFusion CNN experiments here.
CIFAR_RECIPE = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "batch_size": 128,
                "label_smoothing": 0.1, "augment": True, "schedule": "onecycle"}


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-4"`` (a range, inclusive), ``"0,2,3"`` (a list) or a mix (``"0-2,7"``); order kept,
    duplicates dropped."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [int(text)]
    seeds: list[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise HetfuseError(f"no seeds in {text!r}; use e.g. 0-4 or 0,2,3")
    for part in parts:
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1:])
                if hi < lo:
                    raise HetfuseError(f"seed range {part!r} runs backwards")
                vals = list(range(lo, hi + 1))
            else:
                vals = [int(part)]
        except ValueError as e:
            if isinstance(e, HetfuseError):
                raise
            raise HetfuseError(f"bad seed specification {part!r} in {text!r}; use e.g. 0-4 or 0,2,3") from None
        for v in vals:
            if v < 0:
                raise HetfuseError(f"seeds must be non-negative, got {v}")
            if v not in seeds:
                seeds.append(v)
    return seeds


def write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) and k not in ("wb", "weight") else r[k])
                        for k in columns})


def format_mapping(alignment: Iterable[int]) -> str:
    """A 0-based alignment as the papers write it: 1-based, e.g. ``[1,2,5]``."""
    return "[" + ",".join(str(int(a) + 1) for a in alignment) + "]"


def resolve_dataset(dataset: Dataset | None, data_root, name: str = "mnist") -> Dataset:
    return dataset if dataset is not None else load_dataset(name, data_root)


def first_alignment(report: dict) -> list[int] | None:
    """The depth alignment of the first network that was balanced (0-based), or None at equal depths."""
    for m in report["mappings"]:
        if m["changed"]:
            return m["alignment"]
    return None


# ------------------------------------------------------------------------------------------------ the cache


def cached_model(spec: dict, train, *, prefix: str, cache: bool | str | os.PathLike = True) -> tuple[nn.Module, dict]:
    """The model trained by ``train() -> (model, metadata)``, stored in the cache under a key of ``spec`` (which
    must name everything that changes the result) and loaded from there on later calls."""
    folder = cache_dir("models") if cache is True else (Path(cache) if cache else None)
    path = folder / f"{cache_key(spec, prefix=prefix)}.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        try:
            model, meta = load_checkpoint(path)
            if meta.get("cache_spec") == spec:
                return model.eval(), meta
        except CheckpointError:
            pass  # corrupt or foreign: train again and overwrite
    t0 = time.perf_counter()
    model, meta = train()
    meta = dict(meta, cache_spec=spec, train_seconds=time.perf_counter() - t0)
    if path is not None:
        save_checkpoint(model, path, metadata=meta, force=True)
    return model.eval(), meta


def train_mlp(dataset: Dataset, idx: torch.Tensor | None, hidden: Sequence[int], *, part: str, seed: int, epochs: int,
              cache: bool | str | os.PathLike = True, progress: bool = False) -> nn.Module:
    """An ``MLP(input, hidden, classes, bias=False)`` initialised with ``torch.manual_seed(seed)`` and trained
    with the paper's MNIST recipe (SGD lr 0.01, momentum 0.5, batch 64; shuffling seeded with ``seed``) for
    ``epochs`` epochs on ``dataset.x_train[idx]`` (all of it when ``idx`` is None); cached."""
    from ..models import MLP
    from ..train import train_model

    x, y = dataset.x_train, dataset.y_train
    if idx is not None:
        x, y = x[idx], y[idx]
    spec = {"kind": "mlp", "dataset": dataset.name, "n_train": int(x.shape[0]), "part": part,
            "hidden": [int(h) for h in hidden], "seed": int(seed), "epochs": int(epochs), **MLP_RECIPE,
            "train_sum": float(y.sum())}

    def train():
        torch.manual_seed(int(seed))
        model = MLP(dataset.input_dim, list(hidden), dataset.num_classes, bias=False)
        hist = train_model(model, x, y, epochs=epochs, seed=int(seed), progress=progress,
                           desc=f"train {part} seed {seed}", **MLP_RECIPE)
        return model, {"history": hist}

    return cached_model(spec, train, prefix=f"mlp-{dataset.name}-{part}-s{seed}", cache=cache)[0]


def train_zoo(arch: str, dataset: Dataset, *, epochs: int, seed: int, recipe: dict | None = None,
              channels_last: bool = True, cache: bool | str | os.PathLike = True,
              progress: bool = False) -> tuple[nn.Module, dict]:
    """A zoo model (``arch`` string) trained on ``dataset`` with ``recipe`` (default :data:`CIFAR_RECIPE`); cached."""
    from ..models import build_model
    from ..train import train_model

    recipe = dict(CIFAR_RECIPE if recipe is None else recipe)
    spec = {"kind": "zoo", "arch": arch, "dataset": dataset.name, "n_train": int(dataset.x_train.shape[0]),
            "seed": int(seed), "epochs": int(epochs), **recipe}

    def train():
        torch.manual_seed(seed)
        model = build_model(arch, input_dim=dataset.input_shape[0], output_dim=dataset.num_classes,
                            input_shape=dataset.input_shape)
        hist = train_model(model, dataset.x_train, dataset.y_train, epochs=epochs, seed=seed, progress=progress,
                           desc=f"train {arch}", channels_last=channels_last, record_time=True, **recipe)
        if channels_last:
            model = model.to(memory_format=torch.contiguous_format)
        return model, {"spec": arch, "epochs": epochs, "seed": seed, "dataset": dataset.name, "history": hist}

    return cached_model(spec, train, prefix=f"{arch}-{dataset.name}-s{seed}-e{epochs}", cache=cache)


# ------------------------------------------------------------------------------------------------ provenance


def command_line() -> str:
    """The command line of this process as it was typed (``hetfuse ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("hetfuse", "__main__.py", "cli.py"):
        argv[0] = "hetfuse"
    return " ".join(shlex.quote(a) for a in argv)


def provenance() -> dict:
    """The package version and, where the code is a git checkout, its commit and whether the package's own
    files differ from it (results written into the checkout do not count)."""
    info = {"hetfuse_version": __version__}
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def prepare_output(out_dir, force: bool = False) -> Path:
    """The output folder of an experiment, created if need be; one that already holds files is refused unless
    ``force`` (results are never overwritten silently)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HetfuseError(f"output {out} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else []
    if existing and not force:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        what = f"{out} already holds results ({shown})"
        raise HetfuseError(f"{what}; pass force=True to replace them",
                           cli_message=f"{what}; pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_command(out: Path, command: str | None) -> str:
    """Write ``command.txt``: the command that produced the folder (as run), the package version and the git
    commit. Returns the command."""
    cmd = command if command is not None else f"(Python call; process: {command_line()})"
    prov = provenance()
    extra = f"hetfuse {prov['hetfuse_version']}"
    if "git_commit" in prov:
        dirty = " (with uncommitted changes to the package)" if prov.get("git_dirty") else ""
        extra += f", git {prov['git_commit']}{dirty}"
    (out / "command.txt").write_text(f"{cmd}\n# {extra}\n")
    return cmd


class ResumableRows:
    """The rows of an experiment's ``results.csv``, written after every new row; with ``resume`` the rows of an
    earlier, interrupted run are kept and :meth:`has` tells which still need computing."""

    def __init__(self, path: Path, columns: Sequence[str], key: Sequence[str], *, resume: bool):
        self.path, self.columns, self.key = Path(path), list(columns), list(key)
        self.rows: list[dict] = []
        if resume and self.path.is_file():
            with open(self.path, newline="") as fh:
                self.rows = list(csv.DictReader(fh))
        self._keys = {self._key(r) for r in self.rows}

    def _key(self, row: dict) -> tuple:
        def norm(v):
            try:  # 4.0 and the CSV's "4.0000" are one key
                return repr(float(v))
            except (TypeError, ValueError):
                return str(v)

        return tuple(norm(row.get(k, "")) for k in self.key)

    def has(self, **key) -> bool:
        return self._key(key) in self._keys

    def get(self, **key) -> dict | None:
        want = self._key(key)
        return next((r for r in self.rows if self._key(r) == want), None)

    def add(self, row: dict) -> dict:
        row = {k: row.get(k, "") for k in self.columns}
        self.rows.append(row)
        self._keys.add(self._key(row))
        write_csv(self.path, self.rows, self.columns)
        return row
