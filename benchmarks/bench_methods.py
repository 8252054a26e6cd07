"""Time and peak memory of every neuron matcher and of the depth aligners (similarity included), on random networks.

    python benchmarks/bench_methods.py --out results/bench/methods [--only mlp] [--timeout 900]

Cases (random weights, ``torch.manual_seed(0)``, standard-normal inputs, 500 samples, repair off so the
matcher's cost shows):

* ``mlp-8x1024/<matcher>``: two MLPs 784-(1024 x 8)-10;
* ``resnet20x4/<matcher>``: two CIFAR ResNet20 x4 (widths 64/128/256), 32x32 inputs;
* ``mlp-8x1024-vs-6x1024/<aligner>`` and ``resnet26x4-vs-resnet20x4/<aligner>``: CLA, SMA, LMA with linear CKA
  (the depth stage: unit activations, the similarity matrices and the dynamic program), matched by ot-acts.

Each case runs in a fresh child process; ``peak_rss_mib`` is that process's ``ru_maxrss`` (it includes the Python
and torch baseline and the two models). Times come from the fusion's own report (``timings``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MARK = "@@BENCH@@"
MATCHERS = ["ot-acts", "ot-weights", "perm-acts", "perm-weights", "zip", "elastic-zip", "none"]
ALIGNERS = ["cla", "sma", "lma"]


def cases() -> list[dict]:
    out = []
    for m in MATCHERS:
        out.append({"name": f"mlp-8x1024/{m}", "models": "mlp:8x1024|mlp:8x1024", "match": m, "depth_align": "cla"})
    for m in MATCHERS:
        out.append({"name": f"resnet20x4/{m}", "models": "resnet20:w=4|resnet20:w=4", "match": m, "depth_align": "cla"})
    for a in ALIGNERS:
        out.append({"name": f"mlp-8x1024-vs-6x1024/{a}", "models": "mlp:8x1024|mlp:6x1024", "match": "ot-acts",
                    "depth_align": a})
    for a in ALIGNERS:
        out.append({"name": f"resnet26x4-vs-resnet20x4/{a}", "models": "resnet26:w=4|resnet20:w=4", "match": "ot-acts",
                    "depth_align": a})
    return out


def _build(spec: str):
    from hetfuse.models import MLP, build_model

    if spec.startswith("mlp:"):
        depth, width = spec[4:].split("x")
        return MLP(784, [int(width)] * int(depth), 10, bias=False).eval(), (784,)
    return build_model(spec, input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval(), (3, 32, 32)


def run_case(case: dict) -> dict:
    import torch

    import hetfuse

    torch.manual_seed(0)
    specs = case["models"].split("|")
    built = [_build(s) for s in specs]
    models = [m for m, _ in built]
    x = torch.randn(500, *built[0][1])
    rss_setup = _rss()
    t0 = time.perf_counter()
    res = hetfuse.fuse(models, x, samples=500, match=case["match"], depth_align=case["depth_align"],
                       similarity="cka", repair="none", seed=0)
    wall = time.perf_counter() - t0
    t = res.report["timings"]
    return {"case": case["name"], "match": case["match"], "depth_align": case["depth_align"], "wall_s": wall,
            "depth_s": t["depth_s"], "match_s": t["match_s"], "apply_maps_s": t["apply_maps_s"],
            "combine_s": t["combine_s"], "total_s": t["total_s"], "rss_after_setup_mib": rss_setup,
            "peak_rss_mib": _rss(), "fused_widths": res.report["fused_widths"][:3], "status": "ok",
            "threads": torch.get_num_threads()}


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/methods")
    ap.add_argument("--only", default=None)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(MARK + json.dumps(run_case(json.loads(a.case))), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    records = []
    for case in cases():
        if a.only and a.only not in case["name"]:
            continue
        print(f"[bench] {case['name']} ...", flush=True)
        load = os.getloadavg()[0]
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                  text=True, timeout=a.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            rec = json.loads(line[len(MARK):]) if line else {"case": case["name"], "status": "failed",
                                                              "stderr": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            rec = {"case": case["name"], "status": f"exceeded {a.timeout:.0f} s"}
        rec["load_1m_before"] = load
        records.append(rec)
        print(f"[bench]   {rec.get('status')} {rec.get('total_s', '')}", flush=True)
        (out / "methods.json").write_text(json.dumps({"command": command, "machine": platform.platform(),
                                                      "cpus": os.cpu_count(), "records": records}, indent=2) + "\n")
        _markdown(out / "methods.md", records, command)


def _markdown(path: Path, records: list[dict], command: str) -> None:
    lines = ["# Matchers and depth aligners: time and peak memory", "",
             f"Command: `{command}` ({os.cpu_count()} CPUs). "
             "Random networks, 500 samples, repair off; `depth` = unit activations + similarity + dynamic program + "
             "balancing; `match` = activation statistics + the matcher. "
             "`load` = 1-minute load average before the case.",
             "", "| case | total s | depth s | match s | apply maps s | peak RSS MiB | load |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | **{r.get('status')}** | | | | | {r.get('load_1m_before', 0):.1f} |")
            continue
        lines.append(f"| {r['case']} | {r['total_s']:.2f} | {r['depth_s']:.2f} | {r['match_s']:.2f} | "
                     f"{r['apply_maps_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['load_1m_before']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
