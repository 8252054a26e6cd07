"""Wide layers in little memory: time and peak memory of fusing two random 8-layer MLPs (the scale issue's §1).

    python benchmarks/wide_layers.py --out results/bench/wide_layers [--threads 1]

Cases (each in a fresh child process, so its peak resident memory, ``ru_maxrss``, is its own):

* ``8x4096/<matcher>``: two random bias-free MLPs 784-4096x8-10 (seeds 0 and 1), 500 random normal samples,
  exact matching, no repair. In the same child, before the fusion, one SciPy ``linear_sum_assignment`` on one
  4096 x 4096 activation-distance cost (the squared distances between the two models' 4th hidden layers'
  pre-activations on the same samples) is timed: the target is the fusion within 3x of that one assignment, and
  under 4 GB peak resident memory (the three networks alone take about 1.5 GB).
* ``8x1024/<matcher>``: the same at width 1024; target under 2 s.

The matcher is ``perm-acts`` (a permutation per space from the correlations) and ``ot-acts`` (exact optimal
transport on activation distances; with equal widths and uniform weights a permutation, solved as an assignment);
``+sparse`` cases use the opt-in approximate assignment (``solver="sparse"``, k = 32) and report the largest
bound on the relative optimality gap over the spaces.
Writes ``results.json``, ``summary.md`` and ``command.txt``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

CASES = [(4096, "perm-acts"), (4096, "ot-acts"), (1024, "perm-acts"), (1024, "ot-acts"),
         (4096, "perm-acts+sparse"), (4096, "ot-acts+sparse")]  # +sparse: the opt-in approximate solver


def child(width: int, match: str, threads: int) -> None:
    import torch
    from scipy.optimize import linear_sum_assignment

    from hetfuse import fuse
    from hetfuse.models import MLP

    torch.set_num_threads(threads)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(MLP(784, [width] * 8, 10, bias=False).eval())
    torch.manual_seed(2)
    x = torch.randn(500, 784)
    lsa_s = None
    if width >= 4096:
        with torch.no_grad():
            pre = []  # each model's 4th hidden layer's pre-activations
            for m in models:
                v, seen = x, 0
                for layer in m.modules():
                    if isinstance(layer, torch.nn.Linear):
                        v, seen = layer(v), seen + 1
                        if seen == 4:
                            break
                    elif isinstance(layer, torch.nn.ReLU):
                        v = layer(v)
                pre.append(v.T.double())
            cost = torch.cdist(pre[0], pre[1]).pow(2).numpy()
            del pre
        t0 = time.perf_counter()
        linear_sum_assignment(cost)
        lsa_s = time.perf_counter() - t0
        del cost
    t0 = time.perf_counter()
    method, _, solver = match.partition("+")
    res = fuse(models, x, match=method, samples=500, repair=False, **({"solver": solver} if solver else {}))
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gaps = res.report["match_info"].get("gaps")
    print(json.dumps({"case": f"8x{width}/{match}", "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb),
                      "max_gap_bound": None if gaps is None else max(max(g) for g in gaps),
                      "lsa_4096_s": None if lsa_s is None else round(lsa_s, 2), "threads": threads,
                      "timings": {k: round(v, 2) for k, v in res.report["timings"].items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        width, match = a.child.split("/")
        child(int(width), match, a.threads)
        return
    rows = []
    for width, match in CASES:
        name = f"{width}/{match}"
        if a.only and a.only not in f"8x{name}":
            continue
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        lines = ["# Fusing two random 8-layer MLPs: time and peak memory", "",
                 f"500 random samples, exact matching, no repair; {a.threads} torch thread(s); each case in a fresh "
                 "process. Targets: 8x4096 under 4 GB peak RSS and within 3x one SciPy assignment on a 4096 x 4096 "
                 "activation-distance cost (timed in the same process); 8x1024 under 2 s.", "",
                 "| case | seconds | peak RSS (MB) | one 4096² assignment (s) | ratio | target met |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            if r["lsa_4096_s"]:
                ratio = r["seconds"] / r["lsa_4096_s"]
                ok = ratio <= 3 and r["peak_rss_mb"] < 4096
                gap = "" if r.get("max_gap_bound") is None else f" (gap bound {100 * r['max_gap_bound']:.2f} %)"
                lines.append(f"| {r['case']}{gap} | {r['seconds']} | {r['peak_rss_mb']} | {r['lsa_4096_s']} | "
                             f"{ratio:.1f} | {'yes' if ok else 'no'} |")
            else:
                lines.append(f"| {r['case']} | {r['seconds']} | {r['peak_rss_mb']} | | | "
                             f"{'yes' if r['seconds'] < 2 else 'no'} |")
        (path / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
