"""Which exact assignment solver to use: SciPy's ``linear_sum_assignment``, ``lapjv`` and ``lap.lapjv`` on the
costs fusion actually solves (Euclidean distances between the activation vectors of two random MLPs' layers,
shallow and deep) and on uniform random costs.

    python benchmarks/bench_assignment.py --out results/bench/assignment [--widths 1024,4096] [--layers 0,7]

Every solver's total cost is checked against SciPy's (same optimum); solvers that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _costs(width: int, layers: list[int]):
    from hetfuse.graph import describe, space_statistics
    from hetfuse.models import MLP

    torch.manual_seed(0)
    models = [MLP(784, [width] * (max(layers) + 1), 10, bias=False).eval() for _ in range(2)]
    x = torch.randn(400, 784)
    stats = space_statistics(models, [describe(m) for m in models], x, pairs=[(0, 1)])
    for s in layers:
        yield f"activation distance, layer {s + 1}", np.ascontiguousarray(stats.sq_distances(0, 1, s).sqrt().numpy())
    yield "uniform random", np.random.default_rng(0).random((width, width))


def _solvers():
    from scipy.optimize import linear_sum_assignment

    out = {"scipy": lambda c: linear_sum_assignment(c)[1]}
    try:
        from lapjv import lapjv
        out["lapjv"] = lambda c: np.asarray(lapjv(c - c.min(), force_doubles=True)[0])
    except ImportError:
        pass
    try:
        import lap
        out["lap.lapjv"] = lambda c: np.asarray(lap.lapjv(c)[1])
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="1024,4096")
    ap.add_argument("--layers", default="0,7", help="0-based hidden layers of an 8-layer MLP whose costs are solved")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = []
    solvers = _solvers()
    for width in [int(w) for w in a.widths.split(",")]:
        for name, cost in _costs(width, [int(v) for v in a.layers.split(",")]):
            ref = None
            for solver, fn in solvers.items():
                t0 = time.perf_counter()
                cols = fn(cost)
                secs = time.perf_counter() - t0
                total = float(cost[np.arange(width), cols].sum())
                ref = total if ref is None else ref
                rows.append({"width": width, "cost": name, "solver": solver, "seconds": secs,
                             "same_optimum": abs(total - ref) <= 1e-9 * max(1.0, abs(ref))})
                print(rows[-1], flush=True)
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows}
    (out / "assignment.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Exact assignment solvers", "", f"Command: `{record['command']}` (one thread).", "",
             "| width | cost | " + " | ".join(solvers) + " |", "|---|---|" + "---|" * len(solvers)]
    keys = sorted({(r["width"], r["cost"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for w, c in keys:
        cells = []
        for s in solvers:
            r = next(r for r in rows if r["width"] == w and r["cost"] == c and r["solver"] == s)
            cells.append(f"{r['seconds']:.2f} s" + ("" if r["same_optimum"] else " (different total!)"))
        lines.append(f"| {w} | {c} | " + " | ".join(cells) + " |")
    (out / "assignment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
