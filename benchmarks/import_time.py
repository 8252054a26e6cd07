"""Import and process start-up times: ``import torch`` against ``import hetfuse`` (+ the fusion API), and whole
``hetfuse`` processes (``--help``, ``methods``, ``fuse`` of two small checkpoints).

    python benchmarks/import_time.py --out results/bench/import_time [--repeats 7]

Each measurement is the wall time of a fresh Python process (``subprocess``), repeated; the median is
reported beside the minimum. The goal of the engine issue: ``import hetfuse`` costs at most 0.5 s more than
``import torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], repeats: int, env=None) -> dict:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        runs.append(time.perf_counter() - t0)
        if out.returncode != 0:  # e.g. a command an older version lacks (the before/after comparison)
            return {"median_s": None, "min_s": None, "runs_s": [], "error": out.stderr.strip().splitlines()[-1:]}
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--label", default="", help="a label for the table's title (e.g. 'before: hetfuse 0.1')")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = {
        "import torch": _time([py, "-c", "import torch"], a.repeats),
        "import hetfuse": _time([py, "-c", "import hetfuse"], a.repeats),
        "import hetfuse + fusion API": _time([py, "-c", "import hetfuse; hetfuse.fuse; hetfuse.FusionConfig()"],
                                             a.repeats),
        "hetfuse --help": _time([py, "-m", "hetfuse.cli", "--help"], a.repeats),
        "hetfuse methods": _time([py, "-m", "hetfuse.cli", "methods"], a.repeats),
    }
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, HETFUSE_CACHE=d)
        ck = [Path(d) / "a.safetensors", Path(d) / "b.safetensors"]
        for arch, split, path in (("mlp:48,32", "skill-a", ck[0]), ("mlp:64,48,32", "skill-b", ck[1])):
            subprocess.run([py, "-m", "hetfuse.cli", "train", "--arch", arch, "--dataset", "digits", "--epochs", "2",
                            "--split", split, "--out", str(path), "--quiet"], check=True, capture_output=True, env=env)
        rows["hetfuse fuse (digits pair, 400 samples)"] = _time(
            [py, "-m", "hetfuse.cli", "fuse", str(ck[0]), str(ck[1]), "--dataset", "digits", "--wb", "0.3",
             "--out", str(Path(d) / "f.safetensors"), "--force", "--quiet"], a.repeats, env=env)
    extra = rows["import hetfuse + fusion API"]["median_s"] - rows["import torch"]["median_s"]
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "repeats": a.repeats,
              "times": rows, "hetfuse_over_torch_s": extra}
    (out / "import_time.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Import and process times" + (f" ({a.label})" if a.label else ""), "",
             f"Command: `python {record['command']}`; {a.repeats} fresh processes "
             f"each; {record['machine']['cpus']} CPUs, Python {record['machine']['python']}.", "",
             "| what | median (s) | min (s) |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_s']:.2f} | {v['min_s']:.2f} |" if v["median_s"] is not None
              else f"| {k} | n/a (failed: {' '.join(v['error'])}) | |" for k, v in rows.items()]
    lines += ["", f"`import hetfuse` with the fusion API costs {extra:+.2f} s over `import torch` "
              "(goal: at most +0.5 s)."]
    (out / "import_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
