"""Can a sparse exact assignment beat SciPy's dense one on OTFusion's activation-distance costs (the scale issue's
ot-acts time target)? Measured, not adopted.

    python benchmarks/sparse_assignment.py --out results/bench/assignment_sparse [--widths 1024,4096]

The candidate ("sparse + pricing"): solve the assignment on the k cheapest entries of every row and column with
SciPy's sparse solver (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``), compute dual potentials for that
solution (shortest paths from a virtual source over the "row i leaves its column for column j" arcs, by
Bellman-Ford in torch), price out every entry of the dense cost (reduced cost c[i, j] - u[i] - v[j]); if none is
negative the sparse solution is optimal for the dense cost (a certificate, so the method is exact), else the ``add``
most negative entries of every row are added and the sparse problem solved again. Costs: Euclidean distances between
the activation vectors (400 Gaussian inputs) of two random 8-layer MLPs' first and last hidden layers, the costs
``ot-acts`` solves (``benchmarks/bench_assignment.py``'s), and uniform random ones. One torch thread. Every answer's
total is checked against SciPy's.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sparse_priced(c: np.ndarray, k: int = 32, add: int = 16, max_rounds: int = 50):
    """The optimal column of every row, and the number of pricing rounds it took."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    from hetfuse.match.assignment import _potentials, candidate_keys

    n = c.shape[0]
    ct = torch.from_numpy(c)
    keys = candidate_keys(ct, k)
    shift = float(ct.min()) - 1.0  # the sparse solver drops explicit zeros: keep every kept entry positive
    tol = 1e-9 * max(1.0, float(ct.abs().max()))
    for rounds in range(1, max_rounds + 1):
        i, j = keys // n, keys % n
        g = csr_matrix(((ct[i, j] - shift).numpy(), (i.numpy(), j.numpy())), shape=(n, n))
        r, col = min_weight_full_bipartite_matching(g)
        sol = torch.empty(n, dtype=torch.int64)
        sol[torch.from_numpy(r)] = torch.from_numpy(col).to(torch.int64)
        v = _potentials(n, sol[i], j, ct[i, j] - ct[i, sol[i]])
        u = ct[torch.arange(n), sol] - v[sol]
        reduced = ct - u[:, None] - v[None, :]
        low, at = reduced.topk(add, dim=1, largest=False)
        bad = low < -tol
        if not bool(bad.any()):
            return sol.numpy(), rounds
        keys = torch.unique(torch.cat([keys, (torch.arange(n)[:, None].expand(-1, add)[bad]) * n + at[bad]]))
    raise RuntimeError("pricing did not settle")


def main() -> None:
    from bench_assignment import _costs
    from scipy.optimize import linear_sum_assignment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="1024,4096")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--add", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for width in [int(w) for w in a.widths.split(",")]:
        for name, cost in _costs(width, [0, 7]):
            t0 = time.perf_counter()
            ref = linear_sum_assignment(cost)[1]
            t_scipy = time.perf_counter() - t0
            t0 = time.perf_counter()
            sol, rounds = sparse_priced(cost, a.k, a.add)
            t_sparse = time.perf_counter() - t0
            best = float(cost[np.arange(width), ref].sum())
            got = float(cost[np.arange(width), sol].sum())
            rows.append({"width": width, "cost": name, "scipy_s": round(t_scipy, 3), "sparse_s": round(t_sparse, 3),
                         "rounds": rounds, "same_optimum": abs(got - best) <= 1e-9 * max(1.0, abs(best))})
            print(rows[-1], flush=True)
    record = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "k": a.k, "add": a.add,
              "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Sparse exact assignment with pricing against SciPy's dense solver", "",
             f"Command: `{record['command']}` (one thread; k = {a.k} cheapest entries per row and column, "
             f"{a.add} added per row and round). Every answer has SciPy's optimal total.", "",
             "| width | cost | SciPy (s) | sparse + pricing (s) | rounds | same optimum |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['cost']} | {r['scipy_s']} | {r['sparse_s']} | {r['rounds']} | "
              f"{'yes' if r['same_optimum'] else 'NO'} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
