"""Fusing more than two models of different depths (beyond CLAFusion, whose authors fused two).

Three bias-free MLPs of depths 2, 3 and 4 (hidden 400-200, 400-200-100, 400-200-100-50) are trained
per seed in two settings:

* ``full``: each on the full MNIST training set (same data, different seeds and depths);
* ``split``: heterogeneous data, each a specialist for one group of labels (0-3, 4-6, 7-9) trained on
  every image of its labels plus 10% of each other label (the skill-transfer recipe, three ways).

Each triple is fused with uniform weights (1/3 each) into the shallowest model's widths, with both
balancing methods and with and without REPAIR; every pair is fused as well (weights 1/2), and the
prediction ensembles of the same models with the same weights are evaluated. Outputs: ``results.csv``
(one row per seed x setting x combination x balance x repair), ``summary.md`` and ``command.txt``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import FusionConfig
from ..data import Dataset, alignment_samples
from ..pipeline import prepare_fusion
from ..train import accuracy, ensemble_accuracy
from .common import fmt_ms, prepare_output, resolve_dataset, train_mlp, write_command, write_csv

HIDDEN = ((400, 200), (400, 200, 100), (400, 200, 100, 50))
GROUPS = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
SETTINGS = ("full", "split")
COLUMNS = ["seed", "setting", "models", "balance", "repair", "acc_parents", "acc_fused", "acc_ensemble"]


def group_split(labels: torch.Tensor, group: Sequence[int], *, seed: int, other_fraction: float = 0.1) -> torch.Tensor:
    """Indices of every example whose label is in ``group`` plus ``other_fraction`` of each other label."""
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        if label in group:
            keep.append(idx)
        else:
            k = int(round(other_fraction * len(idx)))
            keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values


def run_multi_model(*, data_root=None, seeds: Sequence[int], out_dir, epochs: int = 10, samples: int = 400,
                    progress: bool = True, cache=True, dataset: Dataset | None = None,
                    hidden: Sequence[Sequence[int]] = HIDDEN, settings: Sequence[str] = SETTINGS, force: bool = False,
                    command: str | None = None) -> list[dict]:
    out = prepare_output(out_dir, force)
    ds = resolve_dataset(dataset, data_root)
    rows: list[dict] = []
    timings = []
    for seed in seeds:
        for setting in settings:
            t0 = time.perf_counter()
            models = []
            for k, h in enumerate(hidden):
                idx = None if setting == "full" else group_split(ds.y_train, GROUPS[k % len(GROUPS)], seed=seed)
                part = "all" if setting == "full" else "group" + "".join(map(str, GROUPS[k % len(GROUPS)]))
                models.append(train_mlp(ds, idx, h, part=part, seed=seed * 10 + k, epochs=epochs, cache=cache,
                                        progress=progress))
            t_train = time.perf_counter() - t0
            parent_acc = [accuracy(m, ds.x_test, ds.y_test) for m in models]
            x = alignment_samples(ds.x_train, samples, seed=seed)
            combos = [tuple(range(len(models)))] + list(combinations(range(len(models)), 2))
            it = [(c, b) for c in combos for b in ("add", "merge")]
            for combo, balance in tqdm(it, desc=f"fuse seed {seed} {setting}", disable=not progress):
                subset = [models[i] for i in combo]
                w = [1.0 / len(subset)] * len(subset)
                prep = prepare_fusion(subset, x, FusionConfig(balance=balance, samples=samples,
                                                              repair_samples=samples, seed=seed))
                ens = ensemble_accuracy(subset, w, ds.x_test, ds.y_test)
                for repair in (False, True):
                    fused = prep.combine(w, repair=repair)
                    rows.append({"seed": seed, "setting": setting, "models": "+".join(str(i) for i in combo),
                                 "balance": balance, "repair": repair,
                                 "acc_parents": "/".join(f"{parent_acc[i]:.2f}" for i in combo),
                                 "acc_fused": accuracy(fused, ds.x_test, ds.y_test), "acc_ensemble": ens})
            timings.append((seed, setting, t_train, time.perf_counter() - t0 - t_train))
    write_csv(out / "results.csv", rows, COLUMNS)
    cmd = write_command(out, command)
    _write_summary(out / "summary.md", rows, ds, seeds, epochs, samples, hidden, settings, timings, cmd)
    return rows


def _write_summary(path: Path, rows, ds, seeds, epochs, samples, hidden, settings, timings, cmd) -> None:
    arch = ", ".join("-".join(map(str, h)) for h in hidden)
    lines = [
        "# Fusing three MLPs of different depths",
        "",
        f"Data: {ds.name}; seeds {list(seeds)}; {epochs} epochs SGD (lr 0.01, momentum 0.5, batch 64); bias-free "
        f"MLPs with hidden layers {arch} (models 0, 1, 2). `full`: each trained on the full training set "
        "(initialisation seed 10·seed + model index). `split`: model k is a specialist for labels "
        f"{', '.join('{' + ','.join(map(str, g)) + '}' for g in GROUPS)} respectively, trained on every image "
        "of its labels plus 10% of each other label. Fusion: uniform weights, target = the shallowest model of "
        f"the combination (its widths), CLA on the number of neurons with both constraints, OT on {samples} "
        "training pre-activations. Accuracy on the full test set, mean ± sample std over seeds.",
        "",
        f"Command: `{cmd}`",
        "",
        "The CLAFusion paper fuses two models only, so there is no paper number to put beside these.",
        "",
    ]
    for setting in settings:
        lines += [f"## Setting `{setting}`", "",
                  "| models | parents | ensemble | add | add + repair | merge | merge + repair |",
                  "|---|---|---|---|---|---|---|"]
        combos = sorted({r["models"] for r in rows if r["setting"] == setting}, key=lambda c: (-len(c), c))
        for combo in combos:
            sel = [r for r in rows if r["setting"] == setting and r["models"] == combo]
            parents = []
            for j in range(len(combo.split("+"))):
                parents.append(fmt_ms([float(r["acc_parents"].split("/")[j]) for r in sel
                                       if r["balance"] == "add" and not r["repair"]]))
            ens = fmt_ms([r["acc_ensemble"] for r in sel if r["balance"] == "add" and not r["repair"]])
            cells = []
            for balance in ("add", "merge"):
                for repair in (False, True):
                    cells.append(fmt_ms([r["acc_fused"] for r in sel if r["balance"] == balance
                                         and r["repair"] == repair]))
            lines.append(f"| {combo} | {' / '.join(parents)} | {ens} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Timing", ""]
    for seed, setting, t_train, t_fuse in timings:
        lines.append(f"- seed {seed}, {setting}: train/load {t_train:.1f} s, fusions + evaluation {t_fuse:.1f} s")
    path.write_text("\n".join(lines) + "\n")
