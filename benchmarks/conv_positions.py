"""Fewer positions per image in the matching statistics of convolutional networks: does it change the alignment or
the fused accuracy (the scale issue's §4)?

    python benchmarks/conv_positions.py --data-root ../shared/data --out results/bench/conv_positions

On the committed converged class-split CIFAR-10 task models of split 0 (``results/parents``: ResNet-20 on task A,
ResNet-20 and ResNet-32 on task B; see ``hetfuse experiment parents``), three merges — homogeneous Perm (two
ResNet-20), Perm + LMA and Zip + LMA (ResNet-20 + ResNet-32) — run with every position of every feature map in the
statistics (exact, the default) on three alignment-sample seeds (the seed spread), and with at most N positions
per image (``positions=N``, evenly spread) on seed 0. Per run: the matching stage's seconds, the depth alignment,
the share of neurons whose fused partner is the exact run's (seed 0) and the joint / per-task accuracy on the
CIFAR-10 test images (the class-split protocol). One torch thread. Writes ``results.json``, ``summary.md`` and
``command.txt``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

POSITIONS = [None, 256, 64, 16]
SEEDS = [0, 1, 2]
METHODS = [("Homo Perm", "homo", "perm-acts"), ("Perm + LMA", "hetero", "perm-acts"), ("Zip + LMA", "hetero", "zip")]


def partners(prepared) -> list[torch.Tensor]:
    """Per space, the fused neuron each of the non-target model's neurons goes to (its largest map entry)."""
    i = 1 - prepared.target_index
    return [sm.cols if sm.one_hot else sm.out.argmax(1) for sm in prepared.match.maps[i]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--samples", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from hetfuse import FusionConfig, prepare_fusion
    from hetfuse.data import load_dataset
    from hetfuse.experiments.class_split import CIFAR10_SPLITS, load_task_model, settings
    from hetfuse.train import model_task_metrics

    setting = settings("converged-resnet")
    ds = load_dataset("cifar10", a.data_root)
    tasks = list(CIFAR10_SPLITS[0])
    (ma, head), (mb20, _), (mb32, _) = (load_task_model(setting, 0, t, r, ds=ds)
                                         for t, r in (("A", "a"), ("B", "a"), ("B", "b")))
    rows = []
    for label, kind, match in METHODS:
        models = [ma, mb20] if kind == "homo" else [ma, mb32]
        ref = None
        runs = [(None, s) for s in SEEDS] + [(p, 0) for p in POSITIONS if p is not None]
        for positions, seed in runs:
            cfg = FusionConfig(depth_align="lma", match=match, samples=a.samples, seed=seed, positions=positions)
            t0 = time.perf_counter()
            prepared = prepare_fusion(models, ds.x_train, cfg)
            prep_s = time.perf_counter() - t0
            fused = prepared.combine()
            metrics = model_task_metrics(fused, head, ds.x_test, ds.y_test, tasks)
            part = partners(prepared)
            if positions is None and seed == 0:
                ref = (part, prepared.report["mappings"])
            same = sum(int((p == r).sum()) for p, r in zip(part, ref[0], strict=True))
            total = sum(p.numel() for p in part)
            rows.append({"method": label, "positions": positions or "all", "seed": seed,
                         "match_s": round(prepared.report["timings"]["match_s"], 2), "prepare_s": round(prep_s, 2),
                         "same_partner": round(same / total, 4), "same_depth_alignment":
                         prepared.report["mappings"] == ref[1], "joint": round(metrics["joint"], 2),
                         "per_task_avg": round(metrics["per_task_avg"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        lines = ["# Fewer positions per image in the matching statistics (converged class-split CIFAR-10, split 0)", "",
                 f"{a.samples} alignment samples; one torch thread; exact rows on seeds {SEEDS} give the seed spread "
                 "(mean ± std); `positions` rows on seed 0, compared with the exact seed-0 run.", "",
                 "| method | positions | match s | same partner | same depth alignment | joint | per-task avg |",
                 "|---|---|---|---|---|---|---|"]
        for label, _, _ in METHODS:
            exact = [r for r in rows if r["method"] == label and r["positions"] == "all"]
            j = [r["joint"] for r in exact]
            t = [r["match_s"] for r in exact]
            lines.append(f"| {label} | all (seeds {SEEDS}) | {statistics.mean(t):.1f} | — | — | "
                         f"{statistics.mean(j):.2f} ± {statistics.stdev(j):.2f} | "
                         f"{statistics.mean(r['per_task_avg'] for r in exact):.2f} |")
            for r in rows:
                if r["method"] == label and r["positions"] != "all":
                    lines.append(f"| {label} | {r['positions']} | {r['match_s']} | {r['same_partner']:.3f} | "
                                 f"{'yes' if r['same_depth_alignment'] else 'no'} | {r['joint']} | "
                                 f"{r['per_task_avg']} |")
        (path / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
