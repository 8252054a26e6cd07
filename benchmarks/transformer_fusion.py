"""Fusing two ViTs of different depths on the CPU: time and peak memory (the transformer issue's §5).

    python benchmarks/transformer_fusion.py --data-root ../shared/data --out results/bench/transformer_fusion

Two zoo ViTs (``vit:depth=4`` and ``vit:depth=6``, dim 192, 3 heads, patch 4, MLP 768; random weights: the cost
does not depend on training) are fused on 512 CIFAR-10 training images (random images where the data set is
missing, said in the output) with LMA + perm-acts and with LMA + zip (BN-free REPAIR, the default repair). Each
case runs in a fresh child process, so its peak resident memory (``ru_maxrss``) is its own; the wall time is that
of ``hetfuse.fuse`` in the child, after the models are built and the 512 images (written by the parent process,
so the data set itself is not in the child's memory) are loaded. Targets: under 10 s and 2 GB
each. Writes ``results.json``, ``summary.md`` and ``command.txt``.
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

CASES = {"lma-perm-acts": {"depth_align": "lma", "match": "perm-acts"},
         "lma-zip": {"depth_align": "lma", "match": "zip"}}
ARCH = "vit:depth={depth},dim=192,heads=3,patch=4,mlp=768"


def samples(data_root: str | None, path: Path) -> str:
    """Write 512 images to ``path`` (the child reads only them, so the data set is not in its memory)."""
    import torch
    from safetensors.torch import save_file

    source = "CIFAR-10 training images"
    try:
        from hetfuse.data import load_dataset

        x = load_dataset("cifar10", data_root).x_train[:512].contiguous()
    except Exception as e:  # no data set here: random images cost the same
        x, source = torch.randn(512, 3, 32, 32), f"random images ({type(e).__name__})"
    save_file({"x": x}, str(path))
    return source


def child(case: str, data: str, threads: int) -> None:
    import torch
    from safetensors.torch import load_file

    from hetfuse import fuse
    from hetfuse.models import build_model

    torch.set_num_threads(threads)
    x = load_file(data)["x"]
    torch.manual_seed(0)
    a, b = (build_model(ARCH.format(depth=d), input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
            for d in (4, 6))
    t0 = time.perf_counter()
    res = fuse([a, b], x, samples=512, **CASES[case])
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings = {k: round(v, 2) for k, v in res.report["timings"].items()}
    print(json.dumps({"case": case, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb),
                      "threads": threads, "alignment": [m["alignment"] for m in res.report["mappings"]],
                      "timings": timings}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.data, a.threads)
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.safetensors"
        source = samples(a.data_root, data)
        for case in CASES:
            cmd = [sys.executable, __file__, "--child", case, "--threads", str(a.threads), "--data", str(data)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(dict(json.loads(out.strip().splitlines()[-1]), data=source))
            print(rows[-1], flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        lines = ["# Fusing two ViTs of depths 4 and 6 (dim 192, 3 heads) on the CPU", "",
                 f"Data: {rows[0]['data']}, 512 samples; {rows[0]['threads']} torch threads; each case in a fresh "
                 "process. Targets: under 10 s and under 2 GB of peak resident memory each.", "",
                 "| case | seconds | peak RSS (MB) | target met |", "|---|---|---|---|"]
        for r in rows:
            ok = r["seconds"] < 10 and r["peak_rss_mb"] < 2048
            lines.append(f"| {r['case']} | {r['seconds']} | {r['peak_rss_mb']} | {'yes' if ok else 'no'} |")
        (path / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
