"""Speed of weight matching and of the Sinkhorn solver (issue 21 §2).

    python benchmarks/matching_speed.py --out results/bench/matching_speed

Two random bias-free MLPs 784-[1024]*8-10 (``hetfuse.models.MLP``, seeds 0 and 1; random weights: the cost does
not depend on training) are fused on 500 Gaussian inputs (seed 2) without repair, with ``perm-weights`` (Git
Re-Basin weight matching) and with ``ot-acts`` using ``solver="sinkhorn", reg=0.01``. Each case runs in a fresh child
process (``--repeats`` times); the time is that of ``hetfuse.fuse`` in the child, after the models are built, with
``--threads`` torch threads (default 1). Weight matching also reports its sweeps, the assignments it solved and its
objective Σ⟨W_t, P W_i⟩; both report a checksum of the fused model's outputs on the inputs (the sum), which shows
that the fused model did not change. Target: under 5 s each. Writes ``results.json``, ``summary.md`` and
``command.txt``.

The numbers before the change cannot be re-measured by this script (the old code is gone); they were measured
in-process the same way, one thread, on the same machine, at commit 5b92b90 and are written into the summary
(``BEFORE``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

CASES = {"perm-weights": {"match": "perm-weights"},
         "ot-acts-sinkhorn": {"match": "ot-acts", "solver": "sinkhorn", "reg": 0.01}}
TARGET_S = 5.0
# measured before the change (commit 5b92b90; one torch thread; 2-core machine shared with two niced background
# jobs and another engineer's runs, so about ±30 %): ``hetfuse.fuse`` in-process on the same models and inputs
BEFORE = {"perm-weights": {"seconds": [64.2, 51.2], "objective": 249.93262627601248, "sweeps": 52,
                           "output_sum": -0.022042218674528158, "commit": "5b92b90"},
          "ot-acts-sinkhorn": {"seconds": [26.7, 50.6], "output_sum": -0.0433238772502591, "commit": "5b92b90",
                               "note": "26.7 s at 5b92b90 and 50.6 s at f1957ac (the same solver code, a busier "
                                       "machine); the outputs' sum is f1957ac's: the package's float32 matching "
                                       "statistics, landed in between, moved it from -0.043323873183"}}


def child(case: str, threads: int) -> None:
    import torch

    from hetfuse import fuse
    from hetfuse.models import MLP

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    a = MLP(784, [1024] * 8, 10, bias=False)
    torch.manual_seed(1)
    b = MLP(784, [1024] * 8, 10, bias=False)
    torch.manual_seed(2)
    x = torch.randn(500, 784)
    t0 = time.perf_counter()
    res = fuse([a, b], x, repair=False, **CASES[case])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out_sum = float(res.model(x).double().sum())
    info = res.report.get("match_info", {})
    row = {"case": case, "seconds": round(seconds, 2), "threads": threads, "output_sum": out_sum,
           "timings": {k: round(v, 2) for k, v in res.report["timings"].items()}}
    if case == "perm-weights":
        row.update(sweeps=info["sweeps"][0], solves=info["solves"][0], objective=info["objective"][0])
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per case (the best time is reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads)
        return
    rows = []
    for case in CASES:
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--child", case, "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps({"runs": rows, "before": BEFORE}, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        (path / "summary.md").write_text(summary(rows, a.threads))


def summary(rows: list[dict], threads: int) -> str:
    lines = ["# Weight matching and Sinkhorn: two random bias-free 784-[1024]*8-10 MLPs", "",
             f"`hetfuse.fuse([a, b], x, repair=False, ...)` on 500 Gaussian inputs, {threads} torch thread(s), each "
             f"run in a fresh process (weight matching runs its independent steps on one thread per core: two "
             f"here); target under {TARGET_S:g} s. Machine: 2 CPU cores; background jobs stopped for the run. "
             "Before: measured in-process the same way on the old code (not re-measurable by this script), on the "
             "same machine shared with two niced background jobs and another engineer's runs (±30 %).", "",
             "| case | before (s) | after (s), best | runs (s) | target met | fused outputs' sum, before / after |",
             "|---|---|---|---|---|---|"]
    for case in CASES:
        runs = [r for r in rows if r["case"] == case]
        best = min(r["seconds"] for r in runs)
        before = BEFORE[case]
        lines.append(f"| {case} | {' / '.join(str(s) for s in before['seconds'])} | {best} | "
                     f"{', '.join(str(r['seconds']) for r in runs)} | {'yes' if best < TARGET_S else 'no'} | "
                     f"{before['output_sum']:.12g} / {runs[0]['output_sum']:.12g} |")
    pw = next(r for r in rows if r["case"] == "perm-weights")
    b = BEFORE["perm-weights"]
    lines += ["", "## perm-weights", "",
              f"Objective Σ⟨W_t, P W_i⟩: before {b['objective']!r} in {b['sweeps']} sweeps; after "
              f"{pw['objective']!r} in {pw['sweeps']} sweeps — the same permutations (checked neuron by neuron "
              "against the old code's when the change was made, and in tests/test_weight_matching.py against the "
              f"plain algorithm). The descent solved {pw['solves']} of the {pw['sweeps'] * 8} (space, sweep) "
              "assignments; the others were skipped because no permutation their cost reads had changed since "
              "their last solve. Steps that neither read nor write each other's permutations (spaces two or more "
              "layers apart) run at the same time on two threads, a step waiting for every running step it "
              "conflicts with, so the steps are those of the sequential descent. The remaining time is mostly "
              "those exact 1024 x 1024 assignments (SciPy, 10-20 ms each late in the descent, 40-100 ms in the "
              "first sweeps: about 5.5 s of one core) and the cost products (about 3.5 s): 281 of the 311 solves "
              "change the permutation (a few neurons each late in the descent), so no solve can be skipped "
              "without changing the result. `lap.lapjv` (PyPI `lap`) solves these costs 1.85x faster than SciPy "
              "(the same answers, measured on every tenth cost of this descent) but is 5x slower than SciPy on "
              "deep layers' activation-distance costs (`results/bench/assignment/`), so it is not adopted.", "",
              "## ot-acts, solver=sinkhorn, reg=0.01", "",
              "Before: POT's `sinkhorn_log` on NumPy arrays (two log-sum-exps over the 1024 x 1024 matrix per "
              "iteration, 30-280 iterations a space). After: `hetfuse.match.transport.sinkhorn_plan`, in torch on "
              "the cost's device, log-domain stabilised by absorption (matrix-vector products between rebuilds "
              "of the kernel); the same fixed point and stopping rule (plans within 1e-14 of POT's, in units of "
              "1/n), the same fused model. Before: " + BEFORE["ot-acts-sinkhorn"]["note"] + ".", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
