"""CLAFusion's CIFAR-10 Tables 1–4 at CPU scale: the fused network as an initialisation.

``hetfuse experiment clafusion-table1|clafusion-table2|clafusion-table3|clafusion-table4``:

* **Table 1** (§4.2): ResNet34-shaped A + ResNet18-shaped B (both ×0.25 wide); A, B, their ensemble, the fused
  model one-shot (CLA on 1 − linear CKA, ``add``, OT on activations; without and with the BatchNorm reset),
  then the same finetuning budget for each of A, B, the fused model (BN reset), B depth-aligned (``deepen``)
  and a randomly initialised ResNet34-shaped network.
* **Table 2** (§4.2.1): heterogeneous model transfer of B into A: HMT (the longest chain), HMT + naive
  average, HMT + OTFusion, HMT + CLA + OTFusion; accuracy after transfer (raw, and with the BN reset) and
  after finetuning the raw transferred network (as the paper).
* **Table 3** (§4.3): teacher VGG13 ×0.5 + student VGG11 ×0.125 (the paper's VGG13 ×2 / VGG11 ×0.5 at a
  quarter of the width, with BatchNorm and the BN reset: the paper's VGGs have none); the fused model takes
  the student's widths at the teacher's depth; retraining of A, B, the fused model and B depth-aligned;
  parameter counts and the compression ratio.
* **Table 4** (§4.3.1): Hinton distillation from the teacher into random B, B, the fused model, B
  depth-aligned and a random network of the fused model's shape, for every temperature and α given.

Parents are the cached ones of ``hetfuse experiment cifar-resnet|cifar-vgg`` (seed s: A trained with seed s,
B with seed s + 1). Every finetune or distillation keeps its best epoch on a held-out 10% of the training set
and is stored in the cache (``finetune/``) with its resumable state; the rows go to ``results.csv`` as they
are computed, so ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_dir, cache_key
from ..config import FusionConfig
from ..data import Dataset, load_dataset
from ..errors import HetfuseError
from ..models import build_model
from ..pipeline import prepare_fusion
from ..repair.bn_reset import reset_batchnorm
from ..report.tables import fmt, mean_std
from ..train import FitSettings, accuracy, ensemble_accuracy, fit
from ..transfer import deepen, transfer
from .common import ResumableRows, prepare_output, train_zoo, write_command

RESNET = ("resnet34:w=0.25", "resnet18:w=0.25")
VGG = ("vgg13:w=0.5,bn", "vgg11:w=0.125,bn")
TEMPERATURES = (20.0, 10.0, 8.0, 4.0, 1.0)
ALPHAS = (0.7, 0.1)
PAPER_ALPHAS = (0.05, 0.1, 0.5, 0.7, 0.95, 0.99)
COLUMNS = ["table", "seed", "model", "phase", "temperature", "alpha", "accuracy", "accuracy_bn_reset", "best_epoch",
           "val_acc", "epochs", "seconds_per_epoch", "params"]
KEY = ["table", "seed", "model", "phase", "temperature", "alpha"]

# The paper's numbers (CLAFusion, ICLR 2022 submission): Tables 1-4 (means over 5 seeds; Table 3 is one seed, 42:
# Table 13's seed-42 row, which also gives the ensemble; Table 3's 5-seed means are in PAPER_T3_MEAN).
PAPER = {
    1: {("MA", "parent"): 93.31, ("MB", "parent"): 92.92, ("Ensemble", "parent"): 93.81,
        ("MF", "one-shot"): 65.58, ("MA", "finetune"): 93.52, ("MB", "finetune"): 93.29, ("MF", "finetune"): 93.60,
        ("MB depth-aligned", "finetune"): 93.22, ("random ResNet34", "finetune"): 92.00},
    2: {("HMT", "transfer"): 10.79, ("HMT + naive avg", "transfer"): 37.49, ("HMT + OTFusion", "transfer"): 18.32,
        ("HMT + CLA + OTFusion", "transfer"): 55.22, ("HMT", "finetune"): 92.93,
        ("HMT + naive avg", "finetune"): 91.34, ("HMT + OTFusion", "finetune"): 93.66,
        ("HMT + CLA + OTFusion", "finetune"): 93.70},
    3: {("MA", "parent"): 92.70, ("MB", "parent"): 89.92, ("Ensemble", "parent"): 92.86, ("MF", "one-shot"): 82.66,
        ("MA", "retrain"): 92.65, ("MB", "retrain"): 89.89, ("MF", "retrain"): 90.96,
        ("MB depth-aligned", "retrain"): 90.84},
    4: {  # temperature -> init -> (best accuracy over alpha, that alpha)
        20.0: {"random MB": (88.99, 0.7), "MB": (90.94, 0.7), "MF": (91.29, 0.1), "MB depth-aligned": (91.14, 0.7),
               "random MF": (88.20, 0.1)},
        10.0: {"random MB": (89.10, 0.7), "MB": (90.97, 0.7), "MF": (91.23, 0.5), "MB depth-aligned": (91.23, 0.1),
               "random MF": (88.84, 0.5)},
        8.0: {"random MB": (88.91, 0.7), "MB": (90.98, 0.7), "MF": (91.43, 0.7), "MB depth-aligned": (91.24, 0.7),
              "random MF": (88.76, 0.5)},
        4.0: {"random MB": (87.89, 0.7), "MB": (90.81, 0.99), "MF": (91.14, 0.5), "MB depth-aligned": (91.10, 0.5),
              "random MF": (87.65, 0.05)},
        1.0: {"random MB": (87.14, 0.1), "MB": (89.97, 0.1), "MF": (90.69, 0.05), "MB depth-aligned": (90.73, 0.05),
              "random MF": (87.04, 0.05)},
    },
}
# Table 3's experiment over 5 seeds (40-44): the "Avg" row of Table 13 (appendix D.4).
PAPER_T3_MEAN = {("MA", "parent"): 92.65, ("MB", "parent"): 89.72, ("Ensemble", "parent"): 92.68,
                 ("MF", "one-shot"): 82.03, ("MA", "retrain"): 92.63, ("MB", "retrain"): 89.77,
                 ("MF", "retrain"): 90.64, ("MB depth-aligned", "retrain"): 90.52}
PAPER_PARAMS = "33M / 3M / 3M (teacher / student / fused), compression ratio about 11"
INITS_T4 = ["random MB", "MB", "MF", "MB depth-aligned", "random MF"]


def finetune_settings(epochs: int, seed: int, **changes) -> FitSettings:
    """The same budget for every initialisation of a table: SGD + Nesterov 0.9, cosine from lr 0.01 (the
    paper's VGG finetuning lr; Table 10), weight decay 5e-4, batch 128, crop + flip, best epoch on 10% held out."""
    base = dict(epochs=epochs, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128,
                schedule="cosine", augment=True, seed=seed)
    return FitSettings(**dict(base, **changes))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_like(model: nn.Module, seed: int) -> nn.Module:
    """A network of ``model``'s structure with fresh PyTorch default initialisation (seeded)."""
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in out.modules():
        if hasattr(m, "reset_parameters") and m is not out:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return out


class _Run:
    """One table run: data, parents, rows and the cached finetunes."""

    def __init__(self, table: int, ds: Dataset, rows: ResumableRows, *, archs, epochs: int, ft_epochs: int,
                 samples: int, progress: bool, cache, fit_overrides: dict | None = None):
        self.table, self.ds, self.rows, self.archs = table, ds, rows, tuple(archs)
        self.fit_overrides = dict(fit_overrides or {})
        self.cache = cache
        self.epochs, self.ft_epochs, self.samples, self.progress = epochs, ft_epochs, samples, progress
        self.folder = cache_dir("finetune") if cache is True else (Path(cache) / "finetune" if cache else None)

    def test(self, model: nn.Module) -> float:
        return accuracy(model, self.ds.x_test, self.ds.y_test)

    def bn_reset(self, model: nn.Module, seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.ds.x_train.shape[0], generator=g)[:self.samples]
        return reset_batchnorm(copy.deepcopy(model), self.ds.x_train[idx]).eval()

    def add(self, seed: int, model: str, phase: str, **values) -> None:
        self.rows.add(dict(table=self.table, seed=seed, model=model, phase=phase, **values))

    def has(self, seed: int, model: str, phase: str, temperature="", alpha="") -> bool:
        return self.rows.has(table=self.table, seed=seed, model=model, phase=phase, temperature=temperature,
                             alpha=alpha)

    def train(self, init: nn.Module, seed: int, name: str, spec: dict, *, teacher=None, temperature=None,
              alpha=None) -> tuple[float, dict]:
        """Finetune (or distil into) ``init``; cached and resumable. Returns (test accuracy, row values)."""
        distill = {} if teacher is None else {"temperature": temperature, "alpha": alpha}
        settings = finetune_settings(self.ft_epochs, seed, **distill, **self.fit_overrides)
        key = dict(spec, init=name, settings=asdict(settings), n_train=int(self.ds.x_train.shape[0]))
        out = None
        if self.folder is not None:
            out = self.folder / f"{cache_key(key, prefix=f't{self.table}-s{seed}')}.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
        res = fit(copy.deepcopy(init), self.ds.x_train, self.ds.y_train, settings, out=out, teacher=teacher,
                  progress=self.progress, metadata={"spec": key})
        secs = [h["seconds"] for h in res.history]
        return self.test(res.model), {"best_epoch": res.best_epoch, "val_acc": res.best_val,
                                      "epochs": settings.epochs,
                                      "seconds_per_epoch": sum(secs) / max(1, len(secs))}


def _parents(run: _Run, seed: int):
    archs = run.archs
    a, meta_a = train_zoo(archs[0], run.ds, epochs=run.epochs, seed=seed, progress=run.progress, cache=run.cache)
    b, meta_b = train_zoo(archs[1], run.ds, epochs=run.epochs, seed=seed + 1, progress=run.progress,
                          cache=run.cache)
    return a, b, {"a": archs[0], "b": archs[1], "epochs": run.epochs, "seed": seed,
                  "train_seconds": [meta_a.get("train_seconds"), meta_b.get("train_seconds")]}


def _fusion_config(run: _Run, seed: int, **kw) -> FusionConfig:
    return FusionConfig(representation="cka", balance="add", match="ot-acts", samples=run.samples,
                        repair_samples=run.samples, seed=seed, **kw)


def _table1(run: _Run, seed: int) -> dict:
    a, b, spec = _parents(run, seed)
    x = run.ds.x_train
    prep = prepare_fusion([a, b], x, _fusion_config(run, seed))
    mf = prep.combine([0.5, 0.5], repair=True)
    info = {"mapping": prep.report["mappings"], "params": {"MA": param_count(a), "MB": param_count(b),
                                                           "MF": param_count(mf)}}
    if not run.has(seed, "MA", "parent"):
        run.add(seed, "MA", "parent", accuracy=run.test(a), params=param_count(a))
        run.add(seed, "MB", "parent", accuracy=run.test(b), params=param_count(b))
        run.add(seed, "Ensemble", "parent",
                accuracy=ensemble_accuracy([a, b], [0.5, 0.5], run.ds.x_test, run.ds.y_test))
        run.add(seed, "MF", "one-shot", accuracy=run.test(prep.combine([0.5, 0.5], repair=False)),
                accuracy_bn_reset=run.test(mf), params=param_count(mf))
    deep, _ = deepen(b, a, x, similarity="cka", samples=run.samples, seed=seed)
    if not run.has(seed, "MB depth-aligned", "parent"):
        run.add(seed, "MB depth-aligned", "parent", accuracy=run.test(deep), params=param_count(deep))
    torch.manual_seed(1000 + seed)
    rand = build_model(run.archs[0], input_dim=3, output_dim=run.ds.num_classes, input_shape=run.ds.input_shape)
    for name, init in (("MA", a), ("MB", b), ("MF", mf), ("MB depth-aligned", deep), ("random ResNet34", rand)):
        if not run.has(seed, name, "finetune"):
            acc, vals = run.train(init, seed, name, spec)
            run.add(seed, name, "finetune", accuracy=acc, params=param_count(init), **vals)
    return info


T2_METHODS = (("HMT", "chain", None), ("HMT + naive avg", "chain", "avg"), ("HMT + OTFusion", "chain", "ot"),
              ("HMT + CLA + OTFusion", "cla", "ot"))


def _table2(run: _Run, seed: int) -> dict:
    a, b, spec = _parents(run, seed)
    x = run.ds.x_train
    info = {}
    for name, mapping, then in T2_METHODS:
        res = transfer(b, a, x, mapping=mapping, then=then, config=_fusion_config(run, seed, target=1,
                                                                                 repair="none"))
        info[name] = {"pairs": res.pairs, "alignment": res.report.get("alignment")}
        if not run.has(seed, name, "transfer"):
            run.add(seed, name, "transfer", accuracy=run.test(res.model),
                    accuracy_bn_reset=run.test(run.bn_reset(res.model, seed)), params=param_count(res.model))
        if not run.has(seed, name, "finetune"):
            acc, vals = run.train(res.model, seed, name, dict(spec, mapping=mapping, then=then))
            run.add(seed, name, "finetune", accuracy=acc, params=param_count(res.model), **vals)
    return info


def _student_models(run: _Run, seed: int):
    a, b, spec = _parents(run, seed)
    x = run.ds.x_train
    prep = prepare_fusion([a, b], x, _fusion_config(run, seed, target=1))
    mf = prep.combine([0.5, 0.5], repair=True)
    deep, _ = deepen(b, a, x, similarity="cka", samples=run.samples, seed=seed)
    return a, b, mf, deep, prep, spec


def _table3(run: _Run, seed: int) -> dict:
    a, b, mf, deep, prep, spec = _student_models(run, seed)
    pa, pb, pf = param_count(a), param_count(b), param_count(mf)
    if not run.has(seed, "MA", "parent"):
        run.add(seed, "MA", "parent", accuracy=run.test(a), params=pa)
        run.add(seed, "MB", "parent", accuracy=run.test(b), params=pb)
        run.add(seed, "Ensemble", "parent",
                accuracy=ensemble_accuracy([a, b], [0.5, 0.5], run.ds.x_test, run.ds.y_test))
        run.add(seed, "MF", "one-shot", accuracy=run.test(prep.combine([0.5, 0.5], repair=False)),
                accuracy_bn_reset=run.test(mf), params=pf)
        run.add(seed, "MB depth-aligned", "parent", accuracy=run.test(deep), params=param_count(deep))
    for name, init in (("MA", a), ("MB", b), ("MF", mf), ("MB depth-aligned", deep)):
        if not run.has(seed, name, "retrain"):
            acc, vals = run.train(init, seed, name, spec)
            run.add(seed, name, "retrain", accuracy=acc, params=param_count(init), **vals)
    return {"params": {"MA": pa, "MB": pb, "MF": pf}, "compression_ratio": pa / pf,
            "mapping": prep.report["mappings"]}


def _table4(run: _Run, seed: int, temperatures, alphas) -> dict:
    a, b, mf, deep, _, spec = _student_models(run, seed)
    inits = {"random MB": random_like(b, 2000 + seed), "MB": b, "MF": mf, "MB depth-aligned": deep,
             "random MF": random_like(mf, 3000 + seed)}
    for alpha in alphas:  # alpha outermost: a cut-short run has every temperature for the first alphas
        for t in temperatures:
            for name in INITS_T4:
                if not run.has(seed, name, "distill", temperature=float(t), alpha=float(alpha)):
                    acc, vals = run.train(inits[name], seed, name, spec, teacher=a, temperature=float(t),
                                          alpha=float(alpha))
                    run.add(seed, name, "distill", temperature=float(t), alpha=float(alpha), accuracy=acc,
                            params=param_count(inits[name]), **vals)
    return {"teacher_accuracy": run.test(a)}


def run_clafusion_table(table: int, *, data_root=None, out_dir, seeds=(0,), epochs: int = 10, finetune_epochs: int = 2,
                        samples: int = 400, temperatures=TEMPERATURES, alphas=ALPHAS, progress: bool = True,
                        cache=True, dataset: Dataset | None = None, force: bool = False, resume: bool = False,
                        command: str | None = None, archs: tuple[str, str] | None = None,
                        fit_overrides: dict | None = None) -> list[dict]:
    """Run one of the tables (see the module docstring); returns the rows of ``results.csv``. ``archs``
    replaces the table's (A, B) architectures and ``fit_overrides`` its finetuning settings (small tests)."""
    if table not in (1, 2, 3, 4):
        raise HetfuseError(f"CLAFusion tables are 1-4, got {table}")
    if finetune_epochs < 1:
        raise HetfuseError("--finetune-epochs must be at least 1")
    out = Path(out_dir)
    if resume and (out / "results.csv").is_file():
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = prepare_output(out_dir, force)
    ds = dataset if dataset is not None else load_dataset("cifar10", data_root)
    rows = ResumableRows(out / "results.csv", COLUMNS, KEY, resume=resume)
    archs = archs if archs is not None else (RESNET if table in (1, 2) else VGG)
    run = _Run(table, ds, rows, archs=archs, epochs=epochs, ft_epochs=finetune_epochs, samples=samples,
               progress=progress, cache=cache, fit_overrides=fit_overrides)
    t0 = time.perf_counter()
    info = {}
    for s in seeds:
        if table == 1:
            info[s] = _table1(run, s)
        elif table == 2:
            info[s] = _table2(run, s)
        elif table == 3:
            info[s] = _table3(run, s)
        else:
            info[s] = _table4(run, s, temperatures, alphas)
    report = {"table": table, "seeds": list(seeds), "parent_epochs": epochs, "finetune_epochs": finetune_epochs,
              "samples": samples, "archs": list(archs),
              "finetune_settings": asdict(finetune_settings(finetune_epochs, 0, **(fit_overrides or {}))),
              "temperatures": list(temperatures) if table == 4 else None,
              "alphas": list(alphas) if table == 4 else None, "seconds": time.perf_counter() - t0,
              "per_seed": info, "data": ds.note or ds.name}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    cmd = write_command(out, command)
    (out / "summary.md").write_text(summary(table, rows.rows, report, cmd))
    return rows.rows


# ------------------------------------------------------------------------------------------------ summaries

def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _values(rows, model, phase, col="accuracy", **key):
    out = []
    for r in rows:
        if r["model"] == model and r["phase"] == phase and all(_same(r[k], v) for k, v in key.items()):
            v = r.get(col, "")
            if v not in ("", None):
                out.append(float(v))
    return out


def _ms(vals) -> str:
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {s:.2f}"


def _scale_note(report: dict) -> str:
    ft = report["finetune_settings"]
    return (f"Scale: CPU run. Parents trained {report['parent_epochs']} epochs (the paper: 300); every finetune, "
            f"retraining or distillation runs {report['finetune_epochs']} epochs (the paper: 120) with SGD + Nesterov "
            f"0.9, cosine from lr {ft['lr']}, weight decay {ft['weight_decay']}, batch {ft['batch_size']}, crop + "
            "flip, keeping the epoch with the best accuracy on a held-out 10% of the training set (seeded; the "
            "test set is only used for the numbers below). Networks are narrower than the paper's (stated per "
            f"table); data: {report['data']}. Seeds: {', '.join(map(str, report['seeds']))} (seed s: A trained "
            "with seed s, B with s + 1). Means ± sample standard deviation over seeds.")


def summary(table: int, rows: list[dict], report: dict, cmd: str) -> str:
    paper = PAPER[table]
    lines = [f"# CLAFusion Table {table} at CPU scale", "", f"Command: `{cmd}`", ""]
    if table in (1, 2, 3):
        a_spec, b_spec = report["archs"]
        arch = {1: f"A = `{a_spec}` (ResNet34-shaped), B = `{b_spec}` (ResNet18-shaped); the paper's are full width, "
                   "without BatchNorm",
                2: f"B = `{b_spec}` transferred into A = `{a_spec}`; the paper's ResNet18 / ResNet34 are full width, "
                   "without BatchNorm",
                3: f"teacher A = `{a_spec}`, student B = `{b_spec}`; the paper's are VGG13 ×2 and VGG11 ×0.5 without "
                   "BatchNorm. We keep BatchNorm and recompute its statistics after fusing: a BatchNorm-free VGG11 "
                   "×0.125 did not train at all in a 3-epoch probe on this CPU (`results/clafusion/bn_free_probe/`)"
                }[table]
        lines += [f"Networks: {arch}.", ""]
        if table == 3:
            lines += ["The paper's Table 3 is one training seed (seed 42; the same numbers are the seed-42 row of its "
                      "Table 13, which also gives the ensemble); its Table 13 (appendix D.4) repeats the experiment "
                      "over 5 seeds (40-44): their mean is the last column.", ""]
            lines += ["| model | phase | ours | ours, BN reset | paper, seed 42 | paper, mean of 5 seeds |",
                      "|---|---|---|---|---|---|"]
        else:
            lines += ["| model | phase | ours | ours, BN reset | paper |", "|---|---|---|---|---|"]
        seen = []
        for r in rows:
            k = (r["model"], r["phase"])
            if k not in seen:
                seen.append(k)
        for model, phase in seen:
            p = paper.get((model, phase))
            mean = f" {fmt(PAPER_T3_MEAN.get((model, phase)))} |" if table == 3 else ""
            lines.append(f"| {model} | {phase} | {_ms(_values(rows, model, phase))} | "
                         f"{_ms(_values(rows, model, phase, 'accuracy_bn_reset'))} | {fmt(p)} |{mean}")
        secs = [float(r["seconds_per_epoch"]) for r in rows if r.get("seconds_per_epoch") not in ("", None)]
        if secs:
            lines += ["", f"Finetuning took {sum(secs) / len(secs):.0f} s per epoch on average (one process)."]
        if table == 1:
            lines += ["", "MF one-shot is the fused network without repair (`ours`) and with its BatchNorm statistics "
                          "recomputed (`ours, BN reset`); the finetuned MF starts from the BN-reset network. "
                          "MB depth-aligned computes the same function as MB (the `parent` row checks it)."]
        if table == 2:
            lines += ["", "Transfer accuracy is that of the transferred network as it is (`ours`; the paper's "
                          "numbers are of networks without BatchNorm) and with its BatchNorm statistics recomputed; "
                          "finetuning starts from the raw transferred network, as the paper's."]
        if table == 3:
            per = report["per_seed"]
            first = next(iter(per.values()))
            pa, pb, pf = first["params"]["MA"], first["params"]["MB"], first["params"]["MF"]
            lines += ["", f"Parameters: teacher {pa:,}, student {pb:,}, fused {pf:,}; compression ratio teacher / "
                          f"fused {pa / pf:.1f} (paper: {PAPER_PARAMS}). The fused network has the student's "
                          "widths at the teacher's depth."]
    else:
        temps = report["temperatures"]
        alphas = report["alphas"]
        a_spec, b_spec = report["archs"]
        lines += [f"Teacher `{a_spec}` distilled into five initialisations of the student `{b_spec}` (MF and "
                  "random MF have the student's widths at the teacher's depth). Each cell: the best test accuracy "
                  "over the α tried (that α in parentheses), mean over seeds; the paper's beside. α tried: "
                  f"{', '.join(map(str, alphas))} (the paper: {', '.join(map(str, PAPER_ALPHAS))}).", ""]
        head = " | ".join(f"{n} (ours) | {n} (paper)" for n in INITS_T4)
        lines += [f"| T | {head} |", "|---" * (1 + 2 * len(INITS_T4)) + "|"]
        best = {n: [] for n in INITS_T4}
        for t in temps:
            cells = []
            for n in INITS_T4:
                cand = []
                for al in alphas:
                    v = _values(rows, n, "distill", temperature=float(t), alpha=float(al))
                    if v:
                        cand.append((sum(v) / len(v), al))
                if cand:
                    m, al = max(cand)
                    best[n].append(m)
                    ours = f"{m:.2f} ({al})"
                else:
                    ours = "n/a"
                p = paper.get(float(t), {}).get(n)
                cells.append(f"{ours} | {p[0]:.2f} ({p[1]})" if p else f"{ours} | n/a")
            lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
        pb = {n: [paper[t][n][0] for t in paper] for n in INITS_T4}
        lines.append("| Best | " + " | ".join(
            f"{max(best[n]):.2f} | {max(pb[n]):.2f}" if best[n] else f"n/a | {max(pb[n]):.2f}"
            for n in INITS_T4) + " |")
        lines.append("| Avg | " + " | ".join(
            f"{sum(best[n]) / len(best[n]):.2f} | {sum(pb[n]) / len(pb[n]):.2f}" if best[n]
            else f"n/a | {sum(pb[n]) / len(pb[n]):.2f}" for n in INITS_T4) + " |")
        teacher = [v["teacher_accuracy"] for v in report["per_seed"].values()]
        lines += ["", f"Teacher test accuracy: {_ms(teacher)} (paper 92.70)."]
    lines += ["", _scale_note(report), ""]
    return "\n".join(lines)


__all__ = ["PAPER", "PAPER_T3_MEAN", "run_clafusion_table", "summary"]
