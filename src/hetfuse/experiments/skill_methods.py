"""Skill transfer revisited: the MNIST skill-transfer pair of CLAFusion (§4.1) merged by every depth aligner ×
neuron matcher, to see which one-shot method comes closest to the prediction ensemble.

Model A (400-200-100, every 4 + 10% of the rest) and model B (400-200-100-50, the rest), trained as in the
skill-transfer experiment (same cache). Their widths differ once balanced, so the permutation matchers and
``zip`` (equal widths) do not apply; ``elastic-zip`` does. Each method is prepared once per seed and combined at
every weight of B in ``wb_grid``; the summary reports each method's best weight.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from ..config import FusionConfig
from ..data import Dataset, alignment_samples, skill_split
from ..errors import HetfuseError
from ..pipeline import prepare_fusion
from ..train import accuracy, ensemble_accuracy
from .common import fmt_ms, mean_std, prepare_output, resolve_dataset, train_mlp, write_command, write_csv
from .skill_transfer import HIDDEN_A, HIDDEN_B

ALIGNERS = ("cla", "sma", "lma")
MATCHERS = ("ot-acts", "ot-weights", "perm-acts", "perm-weights", "zip", "elastic-zip")
WB_GRID = (0.1, 0.2, 0.3, 0.5, 0.7)
GRID = [(a, m, {}) for a, m in itertools.product(ALIGNERS, MATCHERS)]
# closing the gap to the ensemble: the best existing rows beside least squares, CCA and preserved early layers
GAP_GRID = [("cla", "ot-acts", {}), ("cla", "ot-acts", {"repair": "lsq"}), ("lma", "ot-acts", {"repair": "lsq"}),
            ("cla", "elastic-zip", {}), ("cla", "elastic-zip", {"repair": "lsq"}), ("cla", "cca", {}),
            ("cla", "cca", {"repair": "lsq"}), ("cla", "ot-acts", {"preserve_until": 1}),
            ("cla", "ot-acts", {"preserve_until": 1, "repair": "lsq"})]


def _label(match: str, extra: dict) -> str:
    return match + "".join(f" + {v}" if k == "repair" else f" + {k.replace('_', ' ')} {v}" for k, v in extra.items())
COLUMNS = ["seed", "depth_align", "match", "wb", "acc_a", "acc_b", "acc_fused", "acc_ensemble", "mapping", "note",
           "seconds"]


def run_skill_methods(*, data_root=None, seeds: Sequence[int], out_dir, epochs: int = 10, samples: int = 400,
                      progress: bool = True, cache=True, dataset: Dataset | None = None,
                      hidden_a: Sequence[int] = HIDDEN_A, hidden_b: Sequence[int] = HIDDEN_B,
                      wb_grid: Sequence[float] = WB_GRID, force: bool = False,
                      command: str | None = None, grid=None) -> list[dict]:
    from tqdm.auto import tqdm

    out = prepare_output(out_dir, force)
    ds = resolve_dataset(dataset, data_root)
    rows = []
    for s in tqdm(list(seeds), desc="skill transfer, every method", disable=not progress):
        a = train_mlp(ds, skill_split(ds.y_train, "a", seed=s), hidden_a, part="skill-a", seed=s, epochs=epochs,
                      cache=cache, progress=progress)
        b = train_mlp(ds, skill_split(ds.y_train, "b", seed=s), hidden_b, part="skill-b", seed=s, epochs=epochs,
                      cache=cache, progress=progress)
        acc_a, acc_b = accuracy(a, ds.x_test, ds.y_test), accuracy(b, ds.x_test, ds.y_test)
        ens = {wb: ensemble_accuracy([a, b], [1 - wb, wb], ds.x_test, ds.y_test) for wb in wb_grid}
        x = alignment_samples(ds.x_train, samples, seed=s)
        for align, match_name, extra in (grid or GRID):
            match = _label(match_name, extra)
            t0 = time.perf_counter()
            try:
                prep = prepare_fusion([a, b], x, FusionConfig(depth_align=align, similarity="cka" if align != "cla"
                                                              else "neurons", match=match_name, samples=samples,
                                                              repair_samples=samples, seed=s, **extra))
            except HetfuseError as e:
                rows.append({"seed": s, "depth_align": align, "match": match, "wb": "", "acc_a": acc_a, "acc_b": acc_b,
                             "acc_fused": "", "acc_ensemble": "", "mapping": "", "note": str(e)[:120],
                             "seconds": time.perf_counter() - t0})
                continue
            mapping = next((m["alignment"] for m in prep.report["mappings"] if m["changed"]), [])
            for wb in wb_grid:
                fused = prep.combine([1 - wb, wb])
                rows.append({"seed": s, "depth_align": align, "match": match, "wb": wb, "acc_a": acc_a,
                             "acc_b": acc_b, "acc_fused": accuracy(fused, ds.x_test, ds.y_test),
                             "acc_ensemble": ens[wb], "mapping": "[" + ",".join(str(v + 1) for v in mapping) + "]",
                             "note": "", "seconds": time.perf_counter() - t0})
    write_csv(out / "results.csv", rows, COLUMNS)
    cmd = write_command(out, command)
    (out / "summary.md").write_text(_summary(rows, seeds, epochs, samples, wb_grid, cmd, grid or GRID))
    return rows


def _summary(rows, seeds, epochs, samples, wb_grid, cmd, grid=GRID) -> str:
    lines = ["# Skill transfer, every depth aligner × neuron matcher", "",
             f"MNIST; seeds {list(seeds)}; the skill-transfer pair (A 400-200-100 on every 4 + 10% of the rest, B "
             f"400-200-100-50 on the rest), {epochs} epochs each, as in `results/skill_transfer/`. CLA with the "
             "number of neurons, SMA and LMA with linear CKA; both constraints; repair `auto` (REPAIR) on the "
             f"{samples} alignment samples. Accuracy (mean ± std over seeds) at each weight of B; "
             "the last columns give "
             "the best weight of each method (by mean).", "", f"Command: `{cmd}`", "",
             "No paper numbers exist for this table: the CLAFusion paper has no table of every aligner × matcher. "
             "Its skill-transfer table (Table 8) has only its own method (CLA on the number of neurons + OT, adding "
             "or merging layers, without REPAIR); our rows of that method, beside the paper's, are in "
             "`results/skill_transfer/summary.md`.", "",
             "| aligner | matcher | mapping (1-based) | " + " | ".join(f"wB {wb}" for wb in wb_grid) +
             " | best | gap to the ensemble at that wB |", "|---|---|---|" + "---|" * (len(wb_grid) + 2)]
    best_fused = -1.0
    for align, match_name, extra in grid:
        match = _label(match_name, extra)
        sel = [r for r in rows if r["depth_align"] == align and r["match"] == match]
        if sel and sel[0]["note"]:
            lines.append(f"| {align} | {match} | | " + " | ".join("n/a" for _ in wb_grid) +
                         f" | n/a: {sel[0]['note'][:60]} | |")
            continue
        cells, means = [], []
        for wb in wb_grid:
            v = [r["acc_fused"] for r in sel if r["wb"] == wb]
            cells.append(fmt_ms(v))
            means.append(mean_std(v)[0])
        k = max(range(len(means)), key=lambda i: means[i])
        ens = mean_std([r["acc_ensemble"] for r in sel if r["wb"] == wb_grid[k]])[0]
        maps = sorted({r["mapping"] for r in sel})
        lines.append(f"| {align} | {match} | {' '.join(maps)} | " + " | ".join(cells) +
                     f" | {means[k]:.2f} (wB {wb_grid[k]}) | {ens - means[k]:.2f} |")
        best_fused = max(best_fused, means[k])
    a = mean_std(list({r["seed"]: r["acc_a"] for r in rows}.values()))
    b = mean_std(list({r["seed"]: r["acc_b"] for r in rows}.values()))
    lines += ["", f"Parents: A {a[0]:.2f} ± {a[1]:.2f}, B {b[0]:.2f} ± {b[1]:.2f}."]
    if best_fused >= 0:
        lines.append(f"Best fused (mean over seeds, best weight) − best parent: {best_fused - max(a[0], b[0]):+.2f} "
                     "points.")
    return "\n".join(lines) + "\n"
