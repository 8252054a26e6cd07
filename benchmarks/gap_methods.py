"""The cost of the methods that close the gap to the ensemble: seconds per fusion and peak memory (issue 20 §3).

    python benchmarks/gap_methods.py --out results/bench/gap_methods [--threads 2]

Two pairs with random weights (the cost does not depend on training): MLPs 784-256x3 and 784-256x5 (the class-split
MNIST pair) on 400 alignment and 2000 repair samples of MNIST's shape, and ResNet-20 and ResNet-32 (x1, CIFAR-10's
shape) on 400 alignment and 2000 repair samples (the least-squares fit on 500 of them, as in the CIFAR-10 gap
table). Every method runs in a fresh child process, so its peak resident memory (``ru_maxrss``) is its own; the
wall time is that of ``hetfuse.fuse`` in the child. Random inputs (standard normal): the data set is not needed for
a cost measurement. Writes ``results.json``, ``summary.md`` and ``command.txt``.
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

PAIRS = {"mlp": ("mlp:256,256,256", "mlp:256,256,256,256,256", (784,), 10),
         "resnet": ("resnet20", "resnet32", (3, 32, 32), 10)}
METHODS = {"perm-acts": {"depth_align": "lma", "match": "perm-acts"},
           "perm-acts + lsq": {"depth_align": "lma", "match": "perm-acts", "repair": "lsq"},
           "perm-acts 1.5x + lsq": {"depth_align": "lma", "match": "perm-acts", "budget": 1.5, "repair": "lsq"},
           "zip": {"depth_align": "lma", "match": "zip"},
           "zip + lsq": {"depth_align": "lma", "match": "zip", "repair": "lsq"},
           "cca": {"depth_align": "lma", "match": "cca"},
           "cca + lsq": {"depth_align": "lma", "match": "cca", "repair": "lsq"},
           "perm-acts, preserve 1": {"depth_align": "lma", "match": "perm-acts", "preserve_until": 1}}


def child(pair: str, method: str, threads: int) -> None:
    import torch

    from hetfuse import fuse
    from hetfuse.models import build_model

    torch.set_num_threads(threads)
    arch_a, arch_b, shape, classes = PAIRS[pair]
    torch.manual_seed(0)
    a, b = (build_model(arch, input_dim=shape[0], output_dim=classes, input_shape=shape).eval()
            for arch in (arch_a, arch_b))
    x = torch.randn(2000, *shape)
    params = dict(METHODS[method])
    if pair == "resnet" and params.get("repair") == "lsq":
        params["fit_samples"] = 500
    t0 = time.perf_counter()
    res = fuse([a, b], x, samples=400, repair_samples=2000, **params)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pair": pair, "method": method, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb),
                      "threads": threads, "timings": {k: round(v, 2) for k, v in res.report["timings"].items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.method, a.threads)
        return
    rows = []
    for pair in a.pairs.split(","):
        for method in METHODS:
            cmd = [sys.executable, __file__, "--child", pair, "--method", method, "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        lines = ["# The cost of the gap-closing methods", "",
                 f"Random weights and inputs; 400 alignment and 2000 repair samples (ResNets: the least-squares fit "
                 f"on 500); depth alignment LMA; {rows[0]['threads']} torch threads; each method in a fresh process.",
                 "", "| pair | method | seconds | peak RSS (MB) | of which repair/combine (s) |",
                 "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['pair']} | {r['method']} | {r['seconds']} | {r['peak_rss_mb']} | "
                         f"{r['timings'].get('combine_s', '')} |")
        (path / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
