"""Multi-task merging of class-split models (the heterogeneous-merging paper's Tables I and III, ZipIt!'s baselines).

The classes of a data set are split into two disjoint tasks A and B; one model is trained per task with an
embedding head (scored by 100 × cosine against fixed class embeddings; see :mod:`hetfuse.train.heads`), and
every pair is merged by every depth aligner × neuron matcher with the same models and seeds. Reported per row:
joint accuracy (argmax over all classes), each task's accuracy (argmax over its classes, on its images) and
their mean, beside the task models and their ensemble (each model scoring its own task's classes).

Settings (``hetfuse experiment class-split-mnist|class-split-cifar|class-split-width``):

* ``mnist``: MNIST 5+5, five random splits (seeded), MLPs of 3 and 5 hidden layers of 256 (and 5 of 512 for
  elastic zipping); both directions of the heterogeneous pair.
* ``cifar``: CIFAR-10 5+5 on the public code's splits; ResNet [4,4,4] vs [8,8,8] ("ResNet26"/"ResNet50") and
  VGG13 vs VGG19 in the paper's layout, at CPU scale (narrow, few epochs — stated in the summary).
* ``width``: CIFAR-10 5+5, ResNet [4,4,4] at widths x and 2x, elastic zipping.
* ``converged-resnet``, ``converged-vgg``, ``converged-width``: the same tables on the committed, converged task
  models of ``results/parents`` (:mod:`hetfuse.experiments.parents`: ResNet-20 vs ResNet-32, VGG11 vs VGG16 x0.5,
  ResNet-20 x1 vs x2; 30 epochs each) instead of models trained here for a few epochs. A parent that is not
  committed yet is trained first (hours) unless ``committed_only``: then the rows that need it wait (listed in the
  summary) and a later ``resume`` run fills them in.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import FusionConfig
from ..data import Dataset, load_dataset
from ..errors import HetfuseError
from ..pipeline import prepare_fusion
from ..train import OutputHead, ZIPIT_RECIPE, ensemble_task_metrics, model_task_metrics, train_model
from ..train.heads import EMBED_SCALE
from .common import cached_model, fmt_ms, mean_std, prepare_output, write_command

COLUMNS = ["dataset", "arch_a", "arch_b", "pair", "direction", "classes_a", "classes_b", "method", "depth_align",
           "match", "joint", "task_a", "task_b", "per_task_avg", "seconds"]

# The public code of the heterogeneous-merging paper seeds NumPy with 0 and draws scikit-learn splits three times.
CIFAR10_SPLITS = [([6, 7, 3, 0, 5], [2, 8, 4, 9, 1]), ([8, 0, 6, 7, 4], [3, 5, 1, 2, 9]),
                  ([1, 0, 6, 9, 7], [2, 3, 8, 4, 5])]

# Table I of the paper (CIFAR-10 5+5, three pairs): method -> (joint, per-task avg), per model family.
PAPER_TABLE1 = {
    "resnet": {"Task A": (48.32, 66.24), "Task B": (48.30, 64.82), "Homo Avg": (42.22, 62.34),
               "Homo Perm": (63.96, 87.18), "Homo Zip": (83.34, 93.77), "Perm + SMA": (66.65, 88.41),
               "Perm + LMA": (67.58, 88.55), "Zip + SMA": (83.15, 93.68), "Zip + LMA": (83.18, 94.16)},
    "vgg": {"Task A": (47.53, 63.67), "Task B": (47.95, 62.66), "Homo Avg": (10.38, 21.09),
            "Homo Perm": (48.48, 79.41), "Homo Zip": (73.20, 89.95), "Perm + SMA": (46.83, 72.24),
            "Perm + LMA": (48.86, 76.17), "Zip + SMA": (70.17, 85.95), "Zip + LMA": (70.40, 86.15)},
}
# Heterogeneous-merging paper, Table III (width heterogeneity, CIFAR-100 50+50: another data set than ours):
# the original ResNet26 x4 and x8 and their elastic zip; (joint, per-task avg)
PAPER_TABLE3 = {"Task A": (40.88, 52.36), "Task B": (41.28, 52.66), "Elastic zip": (59.19, 70.79)}
PAPER = {**PAPER_TABLE1, "width": PAPER_TABLE3}


@dataclass
class Method:
    label: str
    pair: str               # "homo": arch_a on A + arch_a on B; "hetero": arch_a on A + arch_b on B
    depth_align: str = "cla"
    match: str = "ot-acts"
    params: dict = field(default_factory=dict)
    new: bool = False       # a method of the "closing the gap" issue (lsq, budgets, cca, preserve)


def paper_grid() -> list[Method]:
    """The rows of the heterogeneous-merging paper's Table I (homogeneous Avg / Perm / Zip; heterogeneous Perm and
    Zip with SMA and LMA) plus CLAFusion: the CIFAR-10 tables, where each fusion of two CNNs costs ~30 s here."""
    return [Method("Homo Avg", "homo", match="none"), Method("Homo Perm", "homo", match="perm-acts"),
            Method("Homo Zip", "homo", match="zip"), Method("CLAFusion", "hetero", "cla", "ot-acts"),
            Method("Perm + SMA", "hetero", "sma", "perm-acts"), Method("Perm + LMA", "hetero", "lma", "perm-acts"),
            Method("Zip + SMA", "hetero", "sma", "zip"), Method("Zip + LMA", "hetero", "lma", "zip")]


# With seeded random class embeddings (nearly orthogonal, unlike CLIP's text embeddings, whose pairwise cosines
# are high) and the papers' scale 100, CIFAR-10 task models trained for a few epochs reach a low loss with
# cosines of ~0.05: measured on VGG13 x0.125 after 6 epochs, 99.9% of every output is one class-independent
# direction, an untrained class wins every joint prediction (joint accuracy 10.00) and every merge of two such
# models predicts one class (per-task accuracy 20.0, chance). Scale 10 needs cosines of ~0.5 for the same loss:
# after 2 epochs train accuracy 61.3 vs 36.8 at scale 100, joint accuracy 32.6 (the model's own classes win, as
# with the papers' CLIP heads). The MNIST MLPs train well at 100 and keep it.
CIFAR_EMBED_SCALE = 10.0


def methods_grid(homogeneous: bool = True) -> list[Method]:
    """The rows: homogeneous baselines, CLAFusion, and every aligner x matcher on the heterogeneous pair."""
    rows = []
    if homogeneous:
        rows += [Method("Homo Avg", "homo", match="none"), Method("Homo Perm", "homo", match="perm-acts"),
                 Method("Homo Zip", "homo", match="zip")]
    rows.append(Method("CLAFusion", "hetero", "cla", "ot-acts"))
    for align, (label, match) in itertools.product(("cla", "sma", "lma"),
                                                    [("OT", "ot-acts"), ("Perm", "perm-acts"),
                                                     ("Weights", "perm-weights"), ("Zip", "zip")]):
        rows.append(Method(f"{label} + {align.upper()}", "hetero", align, match))
    rows.append(Method("Avg + CLA", "hetero", "cla", "none"))
    return rows


OUTPUT_ENSEMBLE = "Output-averaging ensemble"


def gap_grid(*, cifar: bool = False) -> list[Method]:
    """Closing the gap to the ensemble: the best existing one-shot rows beside least squares after matching
    (``lsq``, with perm-acts' width budgets 1.2 and 1.5), CCA merging and preserved early layers, on the same
    parents; a samples sweep (100 / 2000 alignment samples) for the least-squares rows. On CIFAR-10 the least-
    squares fit reads 500 of the repair samples (``fit_samples``: each fit runs every model up to the layer), the
    grid keeps the rows that answer the question (each ResNet fusion with lsq takes minutes here) and preserves the
    first 7 depth units (of 10 / 16: stem and blocks), where PFM reports its gains on deep CNNs."""
    lsq = {"repair": "lsq", **({"fit_samples": 500} if cifar else {})}
    rows = [Method("Homo Perm", "homo", match="perm-acts"), Method("Homo Zip", "homo", match="zip"),
            Method("CLAFusion", "hetero", "cla", "ot-acts"), Method("Perm + LMA", "hetero", "lma", "perm-acts"),
            Method("Zip + LMA", "hetero", "lma", "zip"),
            Method("Homo Perm + LSQ", "homo", match="perm-acts", params=lsq, new=True),
            Method("Homo Perm + LSQ 1.2x", "homo", match="perm-acts", params={**lsq, "budget": 1.2}, new=True),
            Method("Homo Perm + LSQ 1.5x", "homo", match="perm-acts", params={**lsq, "budget": 1.5}, new=True),
            Method("Homo Zip + LSQ", "homo", match="zip", params=lsq, new=True),
            Method("Homo CCA", "homo", match="cca", new=True),
            Method("Homo CCA + LSQ", "homo", match="cca", params=lsq, new=True),
            Method("Homo Perm, preserve 1", "homo", match="perm-acts", params={"preserve_until": 1}, new=True),
            Method("Perm + LMA + LSQ", "hetero", "lma", "perm-acts", params=lsq, new=True),
            Method("Perm + LMA + LSQ 1.2x", "hetero", "lma", "perm-acts", params={**lsq, "budget": 1.2}, new=True),
            Method("Perm + LMA + LSQ 1.5x", "hetero", "lma", "perm-acts", params={**lsq, "budget": 1.5}, new=True),
            Method("Zip + LMA + LSQ", "hetero", "lma", "zip", params=lsq, new=True),
            Method("CLAFusion + LSQ", "hetero", "cla", "ot-acts", params=lsq, new=True),
            Method("CCA + LMA", "hetero", "lma", "cca", new=True),
            Method("CCA + LMA + LSQ", "hetero", "lma", "cca", params=lsq, new=True),
            Method("Perm + LMA, preserve 1", "hetero", "lma", "perm-acts", params={"preserve_until": 1}, new=True),
            Method("Homo Perm + LSQ (direction)", "homo", match="perm-acts", params={**lsq, "outputs": "direction"},
                   new=True),
            Method("Perm + LMA + LSQ (direction)", "hetero", "lma", "perm-acts",
                   params={**lsq, "outputs": "direction"}, new=True),
            Method("Zip + LMA + LSQ (direction)", "hetero", "lma", "zip", params={**lsq, "outputs": "direction"},
                   new=True)]
    if cifar:  # each ResNet fusion with lsq takes minutes here: the rows that answer the question, no more
        keep = {"Homo Zip", "Perm + LMA", "Zip + LMA", "Homo Perm + LSQ", "Homo Perm + LSQ 1.5x", "Homo Zip + LSQ",
                "Homo CCA + LSQ", "Perm + LMA + LSQ", "Perm + LMA + LSQ 1.5x", "Zip + LMA + LSQ", "CCA + LMA + LSQ",
                "Zip + LMA + LSQ (direction)"}
        rows = [m for m in rows if m.label in keep]
        rows += [Method("Homo Zip, preserve 7", "homo", match="zip", params={"preserve_until": 7}, new=True),
                 Method("Zip + LMA, preserve 7", "hetero", "lma", "zip", params={"preserve_until": 7}, new=True)]
    # references, not merges: the exact mean of the two task models' outputs as one network (budget 2 averages
    # nothing), the best a single network scored like the merges can be expected to do without training
    rows += [Method(f"{OUTPUT_ENSEMBLE} (homo)", "homo", match="perm-acts", params={"budget": 2.0, "repair": "none"}),
             Method(f"{OUTPUT_ENSEMBLE} (hetero)", "hetero", "lma", "perm-acts",
                    params={"budget": 2.0, "repair": "none"})]
    if not cifar:
        rows += [Method(f"Perm + LMA + LSQ, {n} samples", "hetero", "lma", "perm-acts", params={**lsq, "samples": n},
                        new=True) for n in (100, 2000)]
        rows += [Method(f"Homo Perm + LSQ, {n} samples", "homo", match="perm-acts", params={**lsq, "samples": n},
                        new=True) for n in (100, 2000)]
    return rows


@dataclass
class Setting:
    name: str
    dataset: str
    archs: dict[str, str]                      # role -> architecture string
    splits: list[tuple[list[int], list[int]]]
    epochs: int
    recipe: dict
    methods: list[Method]
    family: str = ""                           # key into PAPER (the paper's numbers beside ours)
    width_pair: tuple[str, str] | None = None  # (arch role on A, arch role on B) merged by elastic zipping
    width_rows: list[tuple[str, dict]] = field(default_factory=lambda: [("Elastic zip (width)", {})])  # label, params
    note: str = ""
    embed_scale: float = EMBED_SCALE           # the embedding head's cosine scale (see CIFAR_EMBED_SCALE)
    parents: dict[str, str] | None = None      # role -> the committed parents' architecture key (converged-*)


class WaitingForParent(HetfuseError):
    """A row needs a task model that is not committed in results/parents yet (``committed_only``)."""


def random_splits(num_classes: int, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        perm = rng.permutation(num_classes).tolist()
        out.append((perm[: num_classes // 2], perm[num_classes // 2:]))
    return out


MNIST_RECIPE = {"lr": 0.01, "momentum": 0.5, "nesterov": False, "weight_decay": 0.0, "batch_size": 64,
                "schedule": "constant", "label_smoothing": 0.0, "augment": False}


VIT_RECIPE = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "batch_size": 128,
              "schedule": "onecycle", "label_smoothing": 0.0, "augment": False}


def settings(name: str, *, epochs: int | None = None, width: float | None = None, splits: int | None = None) -> Setting:
    if name == "mnist":
        return Setting("mnist", "mnist", {"a": "mlp:256,256,256", "b": "mlp:256,256,256,256,256",
                                          "wide": "mlp:512,512,512,512,512"},
                       random_splits(10, splits or 5), epochs or 10, MNIST_RECIPE, methods_grid(),
                       width_pair=("a", "wide"),
                       note="MLPs with 512-d embedding heads, the paper's MNIST SGD (lr 0.01, momentum 0.5, batch 64)")
    w = width if width is not None else 0.5
    recipe = dict(ZIPIT_RECIPE, batch_size=250)
    cpu = ("CPU scale: widths x{w} (the paper: x8 ResNets, x1 VGGs), {e} epochs (the paper: 200), batch 250, JPEG "
           "CIFAR-10")
    if name == "cifar-resnet":
        e = epochs or 15
        return Setting("cifar-resnet", "cifar10", {"a": f"resnet26:w={w}", "b": f"resnet50:w={w}"},
                       CIFAR10_SPLITS[:splits or 2], e, recipe, paper_grid(), family="resnet",
                       note=cpu.format(w=w, e=e) + "; shortcut projections are 1x1 convs (the public code: 3x3)",
                       embed_scale=CIFAR_EMBED_SCALE)
    if name == "cifar-vgg":
        wv = width if width is not None else 0.125
        e = epochs or 15
        return Setting("cifar-vgg", "cifar10", {"a": f"mvgg13:w={wv}", "b": f"mvgg19:w={wv}"},
                       CIFAR10_SPLITS[:splits or 2], e, recipe, paper_grid(), family="vgg",
                       note=cpu.format(w=wv, e=e), embed_scale=CIFAR_EMBED_SCALE)
    if name == "width":
        e = epochs or 15
        return Setting("width", "cifar10", {"a": f"resnet26:w={w}", "b": f"resnet26:w={2 * w}"},
                       CIFAR10_SPLITS[:splits or 2], e, recipe,
                       [Method("Elastic zip", "hetero", "cla", "elastic-zip", {"width": "max"}),
                        Method("Elastic zip (min width)", "hetero", "cla", "elastic-zip", {"width": "min"}),
                        Method("OT to the wider", "hetero", "cla", "ot-acts", {"target": 1})], family="width",
                       note=cpu.format(w=f"{w} vs x{2 * w}", e=e) + "; the paper's Table III is on CIFAR-100 "
                       "50+50: its columns beside ours are its ResNet26 x4 (beside Task A), x8 (beside Task B) and "
                       "their elastic zip, and our rows average both directions (narrow model on task A, then wide "
                       "model on task A)", embed_scale=CIFAR_EMBED_SCALE)
    if name == "vit-mnist":
        vit = "vit:depth={d},dim=64,heads=4,patch=7,mlp=128"
        lsq = {"repair": "lsq"}
        return Setting("vit-mnist", "mnist", {"a": vit.format(d=4), "b": vit.format(d=6)},
                       random_splits(10, splits or 2), epochs or 6, VIT_RECIPE,
                       paper_grid() + [Method("Homo Perm + LSQ", "homo", match="perm-acts", params=lsq, new=True),
                                       Method("Perm + LMA + LSQ", "hetero", "lma", "perm-acts", params=lsq, new=True),
                                       Method("Zip + LMA + LSQ", "hetero", "lma", "zip", params=lsq, new=True)],
                       family="vit",
                       note="ViTs of depth 4 and 6 (dim 64, 4 heads, patch 7 = 16 patches + a class token, MLP 128, "
                            "pre-LN), SGD + Nesterov, one-cycle lr 0.05, batch 128, weight decay 5e-4. MNIST, not "
                            "CIFAR-10: measured here, a depth-4 ViT of that size takes 41 CPU-seconds per CIFAR-10 "
                            "task epoch and reaches 60 % on its own five classes after 2 epochs; the 8 task models of "
                            "2 splits at the 20-30 epochs such ViTs need are 2.3-3.4 h of one core, over the 1.5 h "
                            "the issue allows (the MNIST ones: about 2 minutes each)")
    if name == "gap-mnist":
        base = settings("mnist", epochs=epochs, splits=splits)
        base.name, base.methods = "gap-mnist", gap_grid()
        base.width_rows = [("Elastic zip (width)", {}), ("Elastic zip (width) + LSQ", {"repair": "lsq"})]
        return base
    if name == "gap-converged-resnet":
        base = _converged("converged-resnet", splits or 1)
        base.name, base.methods, base.family = "gap-converged-resnet", gap_grid(cifar=True), "resnet"
        return base
    if name.startswith("converged-"):
        return _converged(name, splits)
    raise HetfuseError(f"unknown class-split setting {name!r}; known: mnist, cifar-resnet, cifar-vgg, width, "
                       "converged-resnet, converged-vgg, converged-width, gap-mnist, gap-converged-resnet, vit-mnist")


def _converged(name: str, splits: int | None) -> Setting:
    from .parents import PARENTS, RECIPE

    keys = {"converged-resnet": ("resnet20", "resnet32"), "converged-vgg": ("vgg11", "vgg16"),
            "converged-width": ("resnet20x0.5", "resnet20")}
    if name not in keys:
        raise HetfuseError(f"unknown class-split setting {name!r}; known: {', '.join(keys)}")
    ka, kb = keys[name]
    pa, pb = PARENTS[f"cs0A-{ka}"], PARENTS[f"cs0A-{kb}"]
    n = splits or 2
    if n > 2:
        raise HetfuseError("the committed parents cover the first 2 class splits (--splits 1 or 2)")
    note = (f"converged task models committed in results/parents ({pa.epochs} epochs each: SGD + Nesterov, one-cycle "
            f"lr {RECIPE['lr']}, batch {RECIPE['batch_size']}, weight decay {RECIPE['weight_decay']}, label smoothing "
            f"{RECIPE['label_smoothing']}, crop + flip; one torch thread on a CPU; the paper: 200 epochs)")
    if name == "converged-width":
        methods = [Method("Elastic zip", "hetero", "cla", "elastic-zip", {"width": "max"}),
                   Method("Elastic zip (min width)", "hetero", "cla", "elastic-zip", {"width": "min"}),
                   Method("OT to the wider", "hetero", "cla", "ot-acts", {"target": 1}),
                   Method("Elastic zip + LSQ", "hetero", "cla", "elastic-zip",
                          {"width": "max", "repair": "lsq", "fit_samples": 500}, new=True)]
        family = "width"
        note += ("; the paper's Table III is on CIFAR-100 50+50 with ResNet26 x4 and x8, ours: ResNet-20 x0.5 and x1 "
                 "(the same width ratio 2)")
    else:
        methods, family = paper_grid(), name.removeprefix("converged-")
        note += ("; the paper: ResNet26/ResNet50 x8 ([4,4,4] vs [8,8,8] blocks), ours: ResNet-20/ResNet-32 x1 ([3,3,3] "
                 "vs [5,5,5])" if family == "resnet" else "; the paper: VGG13/VGG19 x1 without BatchNorm, ours: "
                 "VGG11/VGG16 x0.5 with BatchNorm")
    return Setting(name, "cifar10", {"a": pa.arch, "b": pb.arch}, CIFAR10_SPLITS[:n], pa.epochs, dict(RECIPE),
                   methods, family=family, note=note, embed_scale=CIFAR_EMBED_SCALE, parents={"a": ka, "b": kb})


def load_task_model(setting: Setting, k: int, task: str, role: str, *, data_root=None, ds=None,
                    committed_only: bool = False, progress: bool = False):
    """``(model, head)``: the committed parent of split ``k``, task ``task`` ('A'/'B'), for ``role``."""
    from .parents import load_parent, parents_dir

    name = f"cs{k}{task}-{setting.parents[role]}"
    if committed_only and not (parents_dir() / name / "model.safetensors").is_file():
        raise WaitingForParent(f"parent {name} is not committed yet")
    return load_parent(name, ds=ds, data_root=data_root, progress=progress)


def train_task_model(setting: Setting, ds: Dataset, arch: str, classes: list[int], seed: int, *, cache=True,
                     progress=False):
    from ..models import build_model

    head = OutputHead("embed", ds.num_classes, classes, scale=setting.embed_scale)
    idx = torch.nonzero(torch.isin(ds.y_train, torch.tensor(classes))).flatten()
    spec = {"kind": "class-split", "dataset": ds.name, "arch": arch, "classes": list(classes), "seed": int(seed),
            "epochs": setting.epochs, "head": head.to_dict(), **setting.recipe}

    def train():
        torch.manual_seed(seed)
        model = build_model(arch, input_dim=ds.input_dim if arch.startswith("mlp") else ds.input_shape[0],
                            output_dim=head.outputs, input_shape=ds.input_shape)
        x = ds.x_train[idx]
        hist = train_model(model, x if not arch.startswith("mlp") else x.flatten(1), ds.y_train[idx],
                           epochs=setting.epochs, seed=seed, progress=progress, head=head, record_time=True,
                           desc=f"train {arch} on {classes}", channels_last=not arch.startswith("mlp"),
                           **setting.recipe)
        model = model.to(memory_format=torch.contiguous_format)
        return model, {"history": hist, "head": head.to_dict(), "classes": list(classes), "arch": arch}

    model, meta = cached_model(spec, train, prefix=f"{arch}-{ds.name}-{''.join(map(str, classes))}-s{seed}",
                               cache=cache)
    return model, head


def run_class_split(name: str, *, data_root=None, out_dir, seeds: Sequence[int] = (0,), epochs: int | None = None,
                    samples: int = 400, width: float | None = None, splits: int | None = None, progress: bool = True,
                    cache=True, dataset: Dataset | None = None, force: bool = False, resume: bool = False,
                    command: str | None = None, setting: Setting | None = None,
                    committed_only: bool = False) -> list[dict]:
    """Run one setting (see the module docstring); returns the CSV rows. ``resume`` keeps the rows of an earlier,
    interrupted run in ``out_dir`` and computes only the missing ones. ``committed_only`` (converged settings):
    skip the rows whose parents are not committed yet instead of training them."""
    from tqdm.auto import tqdm

    setting = setting or settings(name, epochs=epochs, width=width, splits=splits)
    if setting.parents is not None and (epochs is not None or width is not None or list(seeds) != [0]):
        raise HetfuseError("the converged settings use the committed parents as they are: --epochs, --width and "
                           "--seeds do not apply")
    out = Path(out_dir)
    done: list[dict] = []
    if resume and (out / "results.csv").is_file():
        with open(out / "results.csv", newline="") as fh:
            done = list(csv.DictReader(fh))
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = prepare_output(out_dir, force)
    ds = dataset if dataset is not None else load_dataset(setting.dataset, data_root)
    flat = setting.archs["a"].startswith("mlp")
    x_test = ds.x_test.flatten(1) if flat else ds.x_test
    x_train = ds.x_train.flatten(1) if flat else ds.x_train
    keys = {(r["pair"], r["direction"], r["method"]) for r in done}
    rows = list(done)
    waiting: list[str] = []
    jobs = [(s, k, (A, B)) for s in seeds for k, (A, B) in enumerate(setting.splits)]
    bar = tqdm(jobs, desc=f"class split {setting.name}", disable=not progress)
    for seed, k, (A, B) in bar:
        models = {}

        def get(role: str, task: str, *, models=models, A=A, B=B, seed=seed, k=k):
            key = (role, task)
            if key not in models and setting.parents is not None:
                models[key] = load_task_model(setting, k, task, role, ds=ds, committed_only=committed_only,
                                              progress=progress)
            elif key not in models:
                classes = A if task == "A" else B
                models[key] = train_task_model(setting, ds, setting.archs[role], classes, seed + 100 * (task == "B"),
                                               cache=cache, progress=progress)
            return models[key]

        for d_idx, (ra, rb) in enumerate([("a", "b"), ("b", "a")]):
            pair = f"{k}" if len(seeds) == 1 else f"{k}/s{seed}"
            base = {"dataset": setting.dataset, "arch_a": setting.archs[ra], "arch_b": setting.archs[rb],
                    "pair": pair, "direction": d_idx, "classes_a": " ".join(map(str, A)),
                    "classes_b": " ".join(map(str, B))}

            def add(label, metrics, seconds, depth_align="", match="", *, base=base, pair=pair, d_idx=d_idx):
                rows.append(dict(base, method=label, depth_align=depth_align, match=match, joint=metrics["joint"],
                                 task_a=metrics["tasks"][0], task_b=metrics["tasks"][1],
                                 per_task_avg=metrics["per_task_avg"], seconds=seconds))
                keys.add((str(pair), str(d_idx), label))
                _write(out / "results.csv", rows)  # after every row: an interrupted run resumes from the next one

            def todo(label, *, pair=pair, d_idx=d_idx):
                return (str(pair), str(d_idx), label) not in keys

            def fetch(label, *which, k=k, d_idx=d_idx):
                """The task models of one row, or None (and the row waits) where a parent is not committed."""
                try:
                    return [get(role, task) for role, task in which]
                except WaitingForParent as e:
                    waiting.append((str(e), k, d_idx, label))
                    return None

            tasks = [A, B]
            if todo("Task A") and (got := fetch("Task A", (ra, "A"))):
                add("Task A", model_task_metrics(*got[0], x_test, ds.y_test, tasks), 0.0)
            if todo("Task B") and (got := fetch("Task B", (rb, "B"))):
                add("Task B", model_task_metrics(*got[0], x_test, ds.y_test, tasks), 0.0)
            if todo("Ensemble") and (got := fetch("Ensemble", (ra, "A"), (rb, "B"))):
                add("Ensemble", ensemble_task_metrics([m for m, _ in got], [h for _, h in got], x_test, ds.y_test,
                                                      tasks), 0.0)
            for m in setting.methods:
                if not todo(m.label):
                    continue
                got = fetch(m.label, (ra, "A"), (ra, "B") if m.pair == "homo" else (rb, "B"))
                if got is None:
                    continue
                pair_models, ha = [got[0][0], got[1][0]], got[0][1]
                params = dict(m.params)
                target = params.pop("target", None)
                n_samples = params.pop("samples", samples)
                t0 = time.perf_counter()
                try:
                    cfg = FusionConfig(depth_align=m.depth_align, match=m.match, samples=n_samples, seed=seed,
                                       target=target, **params)
                    fused = prepare_fusion(pair_models, x_train, cfg).combine()
                    metrics = model_task_metrics(fused, ha, x_test, ds.y_test, tasks)
                except HetfuseError as e:
                    metrics = {"joint": float("nan"), "tasks": [float("nan")] * 2, "per_task_avg": float("nan")}
                    print(f"{m.label}: {e}")
                add(m.label, metrics, time.perf_counter() - t0, m.depth_align, m.match)
            for w_label, w_params in (setting.width_rows if setting.width_pair is not None else []):
                if not todo(w_label):
                    continue
                wa, wb = setting.width_pair
                pm = [get(wa, "A")[0], get(wb, "B")[0]] if d_idx == 0 else [get(wb, "A")[0], get(wa, "B")[0]]
                ha = get(ra, "A")[1]
                t0 = time.perf_counter()
                fused = prepare_fusion(pm, x_train, FusionConfig(depth_align="lma", match="elastic-zip",
                                                                 samples=samples, seed=seed, **w_params)).combine()
                add(w_label, model_task_metrics(fused, ha, x_test, ds.y_test, tasks),
                    time.perf_counter() - t0, "lma", "elastic-zip")
            _write(out / "results.csv", rows)
    cmd = write_command(out, command)
    (out / "summary.md").write_text(_summary(setting, rows, seeds, samples, cmd, ds, waiting))
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    tmp.replace(path)


def _summary(setting: Setting, rows: list[dict], seeds, samples, cmd, ds, waiting=()) -> str:
    labels = list(dict.fromkeys(r["method"] for r in rows))
    paper = PAPER.get(setting.family, {})
    lines = [f"# Class-split merging: {setting.name}", "",
             f"Data: {setting.dataset} ({ds.note or 'original files'}); tasks (A / B): " +
             "; ".join(f"{A} / {B}" for A, B in setting.splits) + f"; seeds {list(seeds)}. Models: " +
             ", ".join(f"{k} = `{v}`" for k, v in setting.archs.items()) + f"; {setting.epochs} epochs" +
             (f"; {setting.note}" if setting.note else "") + ". Every model has a 512-d embedding head scored by "
             f"{setting.embed_scale:g} x cosine against fixed, seeded random class embeddings: the papers use CLIP "
             "text embeddings of the class names, which cannot be computed offline here" +
             ("" if setting.embed_scale == EMBED_SCALE else
              f" (scale {setting.embed_scale:g}, not the papers' {EMBED_SCALE:g}: with nearly orthogonal random "
              "embeddings and a few epochs, scale 100 leaves every output dominated by one class-independent "
              "direction, an untrained class wins every joint prediction and every merge predicts one class; "
              "measured, see CIFAR_EMBED_SCALE in hetfuse/experiments/class_split.py)") +
             f". Fusion: {samples} alignment samples, 2000 repair samples (BN reset). Joint "
             "accuracy = argmax over all classes; per-task = argmax over the task's classes on its images. Rows "
             "are mean ± std over the splits and both directions of the heterogeneous pair (arch a on task A + "
             "arch b on task B, and the reverse); homogeneous rows fuse two models of one arch, the arch on task A of "
             "that direction (arch a, then arch b).", "",
             f"Command: `{cmd}`", ""]
    if not paper:
        data = {"mnist": "MNIST", "cifar10": "CIFAR-10"}.get(setting.dataset, setting.dataset)
        lines += [f"No paper numbers exist for this table: neither paper has a class-split {data} table "
                  "(the heterogeneous-merging paper splits CIFAR-10, CIFAR-100 and ImageNet; CLAFusion's MNIST "
                  "experiment is skill transfer, not a class split), so the paper columns are empty.", ""]
    lines += ["| method | joint | task A | task B | per-task avg | paper joint | paper per-task avg |",
              "|---|---|---|---|---|---|---|"]
    for label in labels:
        sel = [r for r in rows if r["method"] == label]
        vals = {k: [float(r[k]) for r in sel if str(r[k]) not in ("nan", "")] for k in
                ("joint", "task_a", "task_b", "per_task_avg")}
        p = paper.get(label)
        lines.append(f"| {label} | {fmt_ms(vals['joint'])} | {fmt_ms(vals['task_a'])} | {fmt_ms(vals['task_b'])} | "
                     f"{fmt_ms(vals['per_task_avg'])} | {p[0] if p else ''} | {p[1] if p else ''} |")
    if waiting:
        missing: dict[str, list[str]] = {}
        for reason, k, d, label in waiting:
            missing.setdefault(reason, []).append(f"{label} (split {k}, direction {d})")
        lines += ["", "Not computed yet (their parents are still training; `--resume` fills them in):", "",
                  *[f"- {reason}: {', '.join(rows_)}" for reason, rows_ in missing.items()]]
    lines += _verdict(rows, labels)
    new = {m.label for m in setting.methods if m.new} | {label for label, p in setting.width_rows if p}
    if new:
        wide = {m.label for m in setting.methods if m.params.get("budget", 1.0) > 1.0}
        lines += _gap(rows, labels, new, wide)
    return "\n".join(lines) + "\n"


def _gap(rows: list[dict], labels: list[str], new: set[str], wide: set[str]) -> list[str]:
    """Before / after: the best existing and the best new one-shot merge, each against the ensemble, at 1x width
    and over all."""
    ens = _joint(rows, "Ensemble")
    if not ens:
        return []
    e = mean_std(ens)[0]
    merges = [lb for lb in labels if not _reference(lb) and _joint(rows, lb)]

    def best(pool):
        pool = [lb for lb in pool if _joint(rows, lb)]
        return max(pool, key=lambda lb: mean_std(_joint(rows, lb))[0]) if pool else None

    old_best = best([lb for lb in merges if lb not in new])
    new_best = best([lb for lb in merges if lb in new])
    one_x = best([lb for lb in merges if lb in new and lb not in wide])
    outs = {lb: mean_std(_joint(rows, lb))[0] for lb in labels if lb.startswith(OUTPUT_ENSEMBLE)}
    homo_out, hetero_out = outs.get(f"{OUTPUT_ENSEMBLE} (homo)"), outs.get(f"{OUTPUT_ENSEMBLE} (hetero)")
    out = ["", "Gap to the ensemble's joint accuracy (" + f"{e:.2f}" + "), before and after" +
           (" — and to the output-averaging ensemble of the same pair (the mean of the two task models' outputs, "
            "scored like any single network: perm-acts at budget 2, exact; the ensemble row instead scores each "
            "task model on its own classes only, which no single network can do)" if outs else "") + ":", "",
           "| | method | joint | gap to the ensemble |" + (" gap to the output-averaging ensemble |" if outs else ""),
           "|---|---|---|---|" + ("---|" if outs else "")]
    homo = {m.label for m in (gap_grid() + gap_grid(cifar=True)) if m.pair == "homo"}
    for what, lb in (("best existing method", old_best), ("best new method, 1x width", one_x),
                     ("best new method, any width", new_best)):
        if lb is not None:
            m = mean_std(_joint(rows, lb))[0]
            line = f"| {what} | {lb} | {fmt_ms(_joint(rows, lb))} | {e - m:.2f} |"
            if outs:
                ref = homo_out if lb in homo else hetero_out
                line += f" {ref - m:.2f} |" if ref is not None else " |"
            out.append(line)
    return out


def _reference(label: str) -> bool:
    """Rows that are not merges: the task models and the ensembles."""
    return label in ("Task A", "Task B", "Ensemble") or label.startswith(OUTPUT_ENSEMBLE)


def _joint(rows: list[dict], label: str) -> list[float]:
    return [float(r["joint"]) for r in rows if r["method"] == label and str(r["joint"]) not in ("nan", "")]


def _verdict(rows: list[dict], labels: list[str]) -> list[str]:
    """The summary's closing sentences: the best merge and its spread, the runner-up, whether the best merge beats
    each single-task model on joint accuracy (on average and per split and direction), the gap to the ensemble."""
    merges = [lb for lb in labels if not _reference(lb) and _joint(rows, lb)]
    if not merges:
        return []
    ranked = sorted(merges, key=lambda lb: -mean_std(_joint(rows, lb))[0])
    best = ranked[0]
    b, b_sd = mean_std(_joint(rows, best))
    out = ["", f"Best one-shot merge by joint accuracy: **{best}** ({fmt_ms(_joint(rows, best))}, "
               f"{len(_joint(rows, best))} runs)."]
    if len(ranked) > 1:
        r2, r2_sd = mean_std(_joint(rows, ranked[1]))
        within = "within" if b - r2 <= max(b_sd, r2_sd) else "outside"
        out[-1] += f" Runner-up: {ranked[1]} ({r2:.2f} ± {r2_sd:.2f}); the difference is {within} one standard " \
                   "deviation."
    for task in ("Task A", "Task B"):
        if not _joint(rows, task):
            continue
        t = mean_std(_joint(rows, task))[0]
        wins = total = 0
        for r in rows:
            if r["method"] != best or str(r["joint"]) in ("nan", ""):
                continue
            same = [x for x in rows if x["method"] == task and x.get("pair") == r.get("pair")
                    and str(x.get("direction")) == str(r.get("direction"))]
            if same:
                total += 1
                wins += float(r["joint"]) > float(same[0]["joint"])
        out.append(f"- Against the single-task model of {task.lower()} (joint {t:.2f}): the best merge is "
                   f"{'above' if b > t else 'below'} it by {abs(b - t):.2f} points on average, above it in "
                   f"{wins} of {total} split/direction runs.")
    ens = _joint(rows, "Ensemble")
    if ens:
        e = mean_std(ens)[0]
        out.append(f"- Gap from the best merge to the ensemble of the task models ({e:.2f}): {e - b:.2f} points.")
    return out
