"""Finetuning time per epoch with 1 and 2 processes (torch DDP, gloo on CPU) through the command line users run.

    HETFUSE_DATA=../shared/data python benchmarks/bench_ddp.py --out results/bench/ddp [--arch resnet18:w=0.25]
        [--limit 6000] [--epochs 2]

A freshly initialised zoo network is finetuned on a seeded subset of CIFAR-10 (``--limit`` examples) with
``hetfuse finetune`` — once as one process (torch's default threads), once under ``torchrun --standalone
--nproc-per-node 2`` (one thread per process) — and the seconds of each epoch are read from the run's log.
The two runs see the same global batches; they differ only through BatchNorm, which normalises each process's
half of a batch with that half's statistics (no SyncBatchNorm), so their held-out accuracies are close, not
equal. (Without BatchNorm they take the same steps: tests/test_fit.py checks that to 1e-5.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _epochs(log: Path) -> list[dict]:
    with open(log, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="resnet18:w=0.25")
    ap.add_argument("--limit", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    import torch

    from hetfuse.data import load_dataset
    from hetfuse.io import save_model
    from hetfuse.models import build_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("cifar10", None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    torch.manual_seed(0)
    save_model(build_model(a.arch, input_dim=3, output_dim=10, input_shape=ds.input_shape), tmp / "init.safetensors",
               metadata={"arch_spec": a.arch})
    common = ["finetune", str(tmp / "init.safetensors"), "--dataset", "cifar10", "--limit", str(a.limit),
              "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--quiet"]
    hetfuse = shutil.which("hetfuse") or "hetfuse"
    torchrun = shutil.which("torchrun") or "torchrun"
    runs = {
        "1 process": ([hetfuse, *common, "--out", str(tmp / "one.safetensors")], tmp / "one.log.csv", {}),
        "2 processes": ([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", hetfuse, *common,
                         "--out", str(tmp / "two.safetensors")], tmp / "two.log.csv", {"OMP_NUM_THREADS": "1"}),
    }
    results = {}
    for name, (cmd, log, env) in runs.items():
        proc = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows = _epochs(log)
        results[name] = {"seconds_per_epoch": [float(r["seconds"]) for r in rows],
                         "val_acc": [float(r["val_acc"]) for r in rows], "command": " ".join(cmd)}
        print(f"{name}: {results[name]['seconds_per_epoch']} s per epoch, held-out {results[name]['val_acc']}")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {"arch": a.arch, "train_examples": a.limit, "epochs": a.epochs, "batch_size": a.batch_size,
            "cpu_count": os.cpu_count(), "torch_threads_1_process": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__, "results": results}
    (out / "ddp.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["# Finetuning time per epoch, 1 vs 2 processes (DDP, gloo)", "",
             f"`{a.arch}` on {a.limit} CIFAR-10 training images (of which 10% held out), batch {a.batch_size}, "
             f"{a.epochs} epochs; {os.cpu_count()} CPU cores. Command: `python benchmarks/bench_ddp.py --out {a.out} "
             f"--arch {a.arch} --limit {a.limit} --epochs {a.epochs}`.", "",
             "| run | seconds per epoch (each epoch) | held-out accuracy |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in r['seconds_per_epoch'])} | "
                     f"{', '.join(f'{v:.2f}' for v in r['val_acc'])} |")
    lines += ["", "The two runs see the same global batches and differ only through BatchNorm (each process normalises "
              "its half of a batch with that half's statistics), hence the close but unequal accuracies. On one "
              "machine the two processes share the same cores that one process uses with two threads: DDP is for "
              "more cores or machines, not a speed-up here."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
