"""Converged CIFAR-10 parents, trained once, committed under ``results/parents/`` and reused by the experiments.

Each parent is one entry of :data:`PARENTS` (a name, an architecture, the classes it learns, its head, its recipe,
its epochs and seed). ``hetfuse experiment parents --out results/parents [--only NAME,...]`` trains the entries in
order, one after the other, and for each finished one writes ``results/parents/NAME/``:

* ``model.safetensors`` — the weights (float32 where the file stays under 5 MB, else float16; loaded as float32),
  with the architecture and head in its metadata (:func:`hetfuse.load_model` reads it, no code executed);
* ``log.csv`` — per epoch: training loss and accuracy, learning rate, seconds, and test accuracy (recorded only:
  the last epoch is kept whatever the test accuracy says);
* ``command.txt`` — the command that trained it, the package version and git commit;
* ``accuracy.json`` — the test accuracy of the stored weights as loaded (all classes, and for a class-split task
  model its own classes and the joint accuracy).

Training is resumable: the state after every finished epoch (weights, momentum, log) is kept beside the committed
parents, in ``results/parents/_resume/NAME.state.safetensors`` (not in the cache, which may not survive to the next
session: a session that stops in the middle of a parent commits its state there), and the same command continues
after the last finished epoch. A state over :data:`MAX_STATE_FILE_BYTES` is split into that file and part files
beside it (``NAME.state.eEPOCH.partK.safetensors``), each small enough to commit. A finished parent's state is
deleted. A state left in the cache by an older version (``$HETFUSE_CACHE/parents``) is moved there.
:func:`load_parent` reads ``results/parents/NAME``; where that folder is missing it trains the entry with the same
command (a cache miss).

Recipe (measured in ``results/bench/parents_recipe``): SGD with Nesterov momentum 0.9, batch 128, one-cycle
learning rate (peak 0.1·batch/128 after 30 % of the steps, cosine to peak/1e4), weight decay 5e-4, label smoothing
0.1, random crop (zero padding 4) + horizontal flip; no test-time augmentation. One torch thread per process;
channels_last memory format where the processor survives it (:mod:`hetfuse.train.memory_format`; it changes the
speed, not the arithmetic's result beyond rounding: a run resumes across it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import HetfuseError

# the public code's first two CIFAR-10 5+5 splits (class_split.CIFAR10_SPLITS)
_SPLITS = [([6, 7, 3, 0, 5], [2, 8, 4, 9, 1]), ([8, 0, 6, 7, 4], [3, 5, 1, 2, 9])]
RECIPE = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "batch_size": 128,
          "schedule": "onecycle", "label_smoothing": 0.1, "augment": True}
CLASS_SPLIT_EMBED_SCALE = 10.0  # as class_split.CIFAR_EMBED_SCALE (measured there)
MAX_FP32_BYTES = 5_000_000
# a resume state is committed when a session stops in the middle of a parent: files of at most 16 MiB stay under
# the repository's 20 MB limit for a file (a VGG16 x0.5 state, weights and momentum, is ~30 MB: two files)
MAX_STATE_FILE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Parent:
    name: str
    arch: str
    epochs: int
    seed: int = 0
    classes: tuple[int, ...] | None = None   # a class-split task model (embedding head over these classes)
    dataset: str = "cifar10"
    recipe: dict = field(default_factory=lambda: dict(RECIPE))

    @property
    def head(self) -> dict:
        if self.classes is None:
            return {"kind": "linear"}
        return {"kind": "embed", "classes": list(self.classes), "scale": CLASS_SPLIT_EMBED_SCALE}


def _class_split(archs: dict[str, str], epochs: int, splits=(0, 1)) -> list[Parent]:
    """Every task model of a class-split table: per split, each architecture on task A and on task B (the table's
    two directions and its homogeneous rows need all four)."""
    out = []
    for k in splits:
        for task, classes in (("A", _SPLITS[k][0]), ("B", _SPLITS[k][1])):
            for key, arch in archs.items():
                out.append(Parent(f"cs{k}{task}-{key}", arch, epochs, seed=100 * (task == "B"),
                                  classes=tuple(classes)))
    return out


_RESNETS = {"resnet20": "resnet20:w=1", "resnet32": "resnet32:w=1"}
_VGGS = {"vgg11": "vgg11:w=0.5,bn", "vgg16": "vgg16:w=0.5,bn"}

# Training order: one complete split of the ResNet depth pair first (the first table that can be run), then the
# second split, the full-data ResNet pair, the VGG pair, the width pair. The width pair is ResNet-20 x0.5 beside the
# committed x1 task models (the paper's width ratio 2 at a sixth of the CPU time of x1 beside x2: the x2 models,
# ~3x the epoch time of x1, would take about 8 of the issue's ~8 core-hours on their own).
PARENTS: dict[str, Parent] = {p.name: p for p in [
    *_class_split(_RESNETS, 30, splits=(0,)),
    *_class_split(_RESNETS, 30, splits=(1,)),
    Parent("full-resnet20", "resnet20:w=1", 40),
    Parent("full-resnet32", "resnet32:w=1", 40),
    *_class_split(_VGGS, 30),
    Parent("full-vgg11", "vgg11:w=0.5,bn", 40),
    Parent("full-vgg16", "vgg16:w=0.5,bn", 40),
    *_class_split({"resnet20x0.5": "resnet20:w=0.5"}, 30),
]}


def parents_dir(root: str | os.PathLike | None = None) -> Path:
    """``results/parents`` of the checkout (or ``$HETFUSE_PARENTS``, or ``root``)."""
    if root is not None:
        return Path(root)
    env = os.environ.get("HETFUSE_PARENTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "results" / "parents"


def _command(p: Parent) -> str:
    return f"OMP_NUM_THREADS=1 hetfuse experiment parents --only {p.name} --out results/parents"


def _build(p: Parent, ds):
    from ..models import build_model
    from ..train import OutputHead

    head = None
    if p.classes is not None:
        head = OutputHead("embed", ds.num_classes, list(p.classes), scale=CLASS_SPLIT_EMBED_SCALE)
    torch.manual_seed(p.seed)
    model = build_model(p.arch, input_dim=ds.input_shape[0], output_dim=head.outputs if head else ds.num_classes,
                        input_shape=ds.input_shape)
    return model, head


def _metrics(model, head, p: Parent, ds) -> dict:
    from ..train import accuracy, model_task_metrics

    if head is None:
        return {"test_acc": accuracy(model, ds.x_test, ds.y_test)}
    other = [c for c in range(ds.num_classes) if c not in p.classes]
    m = model_task_metrics(model, head, ds.x_test, ds.y_test, [list(p.classes), other])
    return {"test_acc_own": m["tasks"][0], "test_joint": m["joint"]}


def train_parent(p: Parent, ds, *, out_root=None, progress: bool = True, command: str | None = None) -> Path:
    """Train (or resume) one parent and write its folder (see the module docstring); returns the folder. Raises
    :class:`ParentBusy` where another process is training it."""
    folder = parents_dir(out_root) / p.name
    state_dir = resume_dir(out_root)
    state_dir.mkdir(parents=True, exist_ok=True)
    with training_lock(state_dir, p.name):
        return _train_parent(p, ds, folder, state_dir, out_root=out_root, progress=progress, command=command)


class ParentBusy(HetfuseError):
    """Another process is training this parent (it holds the parent's lock)."""


@contextmanager
def training_lock(state_dir: Path, name: str):
    """Hold ``state_dir/NAME.lock`` while training ``name``: two processes would write one resume state. Raises
    :class:`ParentBusy` where another process holds it. An advisory ``flock``, released when the process ends, however
    it ends; where the platform has none (not POSIX), no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = state_dir / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ParentBusy(f"parent {name} is being trained by another process (it holds {path})") from None
        yield


def _train_parent(p: Parent, ds, folder: Path, state_dir: Path, *, out_root, progress: bool, command) -> Path:
    from ..cache import cache_dir
    from ..io import save_model
    from ..train import FitSettings, fit
    from ..train.fitting import state_path, write_log
    from .common import write_command

    state = state_path(state_dir / f"{p.name}.safetensors")
    legacy = cache_dir() / "parents"
    if not state.is_file() and state_path(legacy / f"{p.name}.safetensors").is_file():
        for f in legacy.glob(f"{p.name}.*"):  # the state, and the last epoch's weights and log beside it
            shutil.move(f, state_dir / f.name)
    model, head = _build(p, ds)
    x, y = ds.x_train, ds.y_train
    if p.classes is not None:
        idx = torch.nonzero(torch.isin(y, torch.tensor(p.classes))).flatten()
        x, y = x[idx], y[idx]
    r = p.recipe
    settings = FitSettings(epochs=p.epochs, lr=r["lr"], momentum=r["momentum"], nesterov=r["nesterov"],
                           weight_decay=r["weight_decay"], batch_size=r["batch_size"], schedule=r["schedule"],
                           label_smoothing=r["label_smoothing"], augment=r["augment"], seed=p.seed, val_fraction=0.0,
                           channels_last=True)  # where the processor survives it (train.memory_format): ~20 % faster
    t0 = time.perf_counter()
    result = fit(model, x, y, settings, out=state_dir / f"{p.name}.safetensors", head=head, progress=progress,
                 evaluate=lambda m: _metrics(m, head, p, ds),
                 metadata={"parent": asdict(p)}, desc=f"train {p.name}", state_shard_bytes=MAX_STATE_FILE_BYTES)
    folder.mkdir(parents=True, exist_ok=True)
    model = result.model.float().eval()
    n_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    store = model if n_bytes <= MAX_FP32_BYTES else _half(model)
    meta = {"parent": asdict(p), "head": p.head, "dtype": "float32" if store is model else "float16",
            "epochs": p.epochs, "train_seconds_this_run": time.perf_counter() - t0}
    save_model(store, folder / "model.safetensors", metadata=meta, force=True)
    write_log(folder / "log.csv", result.history, digits=4)
    write_command(folder, command or _command(p))
    loaded, _ = load_parent(p.name, ds=ds, root=out_root, train_missing=False)
    acc = _metrics(loaded, _build(p, ds)[1], p, ds)
    acc.update(epochs=p.epochs, arch=p.arch, classes=list(p.classes) if p.classes else None, dtype=meta["dtype"],
               train_seconds=sum(h["seconds"] for h in result.history))
    (folder / "accuracy.json").write_text(json.dumps(acc, indent=2) + "\n")
    for f in state_dir.glob(f"{p.name}.*"):
        f.unlink()  # finished: the weights and the log are in the parent's folder now
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
    return folder


def resume_dir(root=None) -> Path:
    """Where unfinished parents keep their state (committed when a session stops in the middle of one)."""
    return parents_dir(root) / "_resume"


def _half(model):
    import copy

    m = copy.deepcopy(model)
    return m.half()


def load_parent(name: str, *, ds=None, root=None, data_root=None, train_missing: bool = True, progress: bool = False):
    """``(model, head)`` of a committed parent (float32, eval mode); ``head`` is an
    :class:`~hetfuse.train.OutputHead` for a class-split task model, else ``None``. A missing folder is trained
    (same command) when ``train_missing``."""
    from ..io import load_model
    from ..train import OutputHead

    if name not in PARENTS:
        raise HetfuseError(f"unknown parent {name!r}; known: {', '.join(PARENTS)}")
    p = PARENTS[name]
    path = parents_dir(root) / name / "model.safetensors"
    if not path.is_file():
        if not train_missing:
            raise HetfuseError(f"parent {name} has no {path}")
        if ds is None:
            from ..data import load_dataset

            ds = load_dataset(p.dataset, data_root)
        train_parent(p, ds, out_root=root, progress=progress)
    model = load_model(path).float().eval()
    head = None
    if p.classes is not None:
        head = OutputHead("embed", 10, list(p.classes), scale=CLASS_SPLIT_EMBED_SCALE)
    return model, head


def run_parents(*, data_root=None, out_dir=None, only=None, progress: bool = True) -> list[Path]:
    """Train every entry of :data:`PARENTS` (or those named in ``only``) whose folder is missing, in order."""
    from ..data import load_dataset

    names = list(PARENTS) if not only else list(only)
    unknown = [n for n in names if n not in PARENTS]
    if unknown:
        raise HetfuseError(f"unknown parent(s) {', '.join(unknown)}; known: {', '.join(PARENTS)}")
    ds = None
    done = []
    for n in names:
        folder = parents_dir(out_dir) / n
        if (folder / "model.safetensors").is_file() and (folder / "accuracy.json").is_file():
            done.append(folder)
            continue
        if ds is None:
            ds = load_dataset(PARENTS[n].dataset, data_root)
        print(f"training parent {n} ({PARENTS[n].arch}, {PARENTS[n].epochs} epochs)", flush=True)
        try:
            done.append(train_parent(PARENTS[n], ds, out_root=out_dir, progress=progress))
        except ParentBusy as e:  # two queues may name the same parent: the second goes on with its next one
            print(f"skipped: {e}", flush=True)
            continue
        summarize(out_dir)
    summarize(out_dir)
    return done


# Targets of the "parents worth merging" issue: own-task accuracy of a class-split task model, test accuracy of a
# full-data parent; the papers' numbers for scale.
TARGETS = {"class-split": 90.0, "full": 90.0}
PAPER_NOTE = ("the heterogeneous-merging paper's class-split task models reach about 95 % on their own five classes; "
              "the CLAFusion paper's full-data CIFAR-10 parents 90-93 %")


def summarize(root=None) -> str:
    """``results/parents/README.md``: every entry of :data:`PARENTS`, its status (trained, with its accuracy, epochs
    and single-thread CPU time, or waiting), against the targets. Returns the text written."""
    import csv

    folder = parents_dir(root)
    rows, cpu = [], 0.0
    for name, p in PARENTS.items():
        acc_file = folder / name / "accuracy.json"
        kind = "class-split" if p.classes is not None else "full"
        if acc_file.is_file():
            acc = json.loads(acc_file.read_text())
            main = acc.get("test_acc_own", acc.get("test_acc"))
            with open(folder / name / "log.csv", newline="") as fh:
                log = list(csv.DictReader(fh))
            hours = sum(float(r["seconds"]) for r in log) / 3600
            cpu += hours
            best = max(float(r.get("test_acc_own") or r.get("test_acc") or "nan") for r in log)
            met = "yes" if main >= TARGETS[kind] else "no"
            extra = f"; joint {acc['test_joint']:.2f}" if "test_joint" in acc else ""
            rows.append(f"| {name} | `{p.arch}` | {kind}{' ' + str(list(p.classes)) if p.classes else ''} | "
                        f"{p.epochs} | **{main:.2f}**{extra} (best epoch on test, for the record only: {best:.2f}) | "
                        f"{hours:.2f} | {met} |")
        else:
            rows.append(f"| {name} | `{p.arch}` | {kind}{' ' + str(list(p.classes)) if p.classes else ''} | "
                        f"{p.epochs} | waiting | | |")
    text = "\n".join([
        "# Converged CIFAR-10 parents", "",
        "Trained once by `hetfuse experiment parents --out results/parents` (entries and order: "
        "`hetfuse.experiments.parents.PARENTS`; each folder's `command.txt` has the exact command and commit), "
        "resumable after every epoch, one torch thread. Recipe: SGD + Nesterov 0.9, batch 128, one-cycle learning "
        "rate (peak 0.1 at 30 %, cosine to 1e-5), weight decay 5e-4, label smoothing 0.1, random crop (padding 4) + "
        "flip, no test-time augmentation; the last epoch is kept (no early stopping; the test accuracy of every epoch "
        "is logged for the record only). Class-split task models: CIFAR-10 5+5 on the public code's splits, 512-d "
        "random class embeddings at cosine scale 10 (as the class-split tables). Data: the shared JPEG re-encoding "
        "of CIFAR-10 (accuracies run somewhat lower than on the original).", "",
        f"Targets: >= {TARGETS['class-split']:.0f} % on the own five classes (class-split), >= {TARGETS['full']:.0f} "
        f"% test accuracy (full data); for scale, {PAPER_NOTE}.", "",
        "| parent | architecture | data | epochs | test accuracy (%; class-split: own five classes) | hours of "
        "training (one thread, wall clock) | target met |", "|---|---|---|---|---|---|---|", *rows, "",
        f"Trained so far: {cpu:.2f} hours of single-thread training (wall clock, beside other jobs). Seconds per "
        "epoch of each candidate architecture: `results/bench/parents_recipe/`.", ""])
    notes = folder / "notes.md"
    if notes.is_file():  # hand-written measurements and decisions, kept across rewrites
        text += "\n" + notes.read_text()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text)
    return text
