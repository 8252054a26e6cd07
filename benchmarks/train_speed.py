"""Seconds per CIFAR-10 training epoch of zoo models on this machine's CPU, extrapolated.

For every model and for both memory formats (contiguous NCHW and ``channels_last``) the script
runs :func:`hetfuse.train.train_model` exactly as ``hetfuse train --dataset cifar10`` does by
default (batch 128, random crop + flip, one-cycle schedule over a 391-batch epoch, Nesterov SGD,
weight decay 5e-4, label smoothing 0.1): 3 warm-up batches, then ~30 timed batches (fewer for
very slow models, see ``--max-seconds``), and extrapolates the mean seconds per batch to the
391 batches of an epoch of the 50,000 training images. Evaluation time is not included.

    python benchmarks/train_speed.py [--data-root /work/shared/data] [--batches 30]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from hetfuse.data import load_dataset
from hetfuse.models import build_model
from hetfuse.train import train_model

MODELS = ("vgg11:w=0.25,bn", "vgg11:w=0.5,bn", "vgg13:w=2,bn", "resnet18:w=0.25", "resnet34:w=0.25",
          "resnet20:w=1", "resnet20:w=4")
BATCH = 128
WARMUP = 3


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _kwargs() -> dict:
    return dict(epochs=1, lr=0.1, momentum=0.9, nesterov=True, batch_size=BATCH, weight_decay=5e-4,
                augment=True, schedule="onecycle", label_smoothing=0.1, progress=False, seed=0)


def time_one(spec: str, ds, *, channels_last: bool, batches: int, max_seconds: float) -> dict:
    torch.manual_seed(0)
    model = build_model(spec, input_dim=ds.input_dim, output_dim=ds.num_classes, input_shape=ds.input_shape)
    params = sum(p.numel() for p in model.parameters())
    warm = train_model(model, ds.x_train, ds.y_train, channels_last=channels_last, max_batches=WARMUP,
                       record_time=True, **_kwargs())
    per_warm = warm[0]["seconds"] / WARMUP
    # ~`batches` timed batches, fewer if that would take much longer than max_seconds (at least 5)
    n = max(5, min(batches, math.ceil(max_seconds / max(per_warm, 1e-6))))
    hist = train_model(model, ds.x_train, ds.y_train, channels_last=channels_last, max_batches=n,
                       record_time=True, **_kwargs())
    per_batch = hist[0]["seconds"] / hist[0]["batches"]
    epoch_batches = math.ceil(ds.x_train.shape[0] / BATCH)
    return {"model": spec, "channels_last": channels_last, "params": params, "timed_batches": hist[0]["batches"],
            "seconds_per_batch": per_batch, "seconds_per_epoch_extrapolated": per_batch * epoch_batches,
            "epoch_batches": epoch_batches, "loss_finite": math.isfinite(hist[0]["loss"]),
            "loadavg_after": _loadavg()}


def _markdown(report: dict) -> str:
    lines = ["# CIFAR-10 training speed (CPU)", "",
             "**Extrapolated, not measured end to end:** seconds per epoch = mean seconds per batch over the "
             f"timed batches (after {WARMUP} warm-up batches) x {report['epoch_batches']} batches of "
             f"{BATCH} (50,000 training images; the last batch really holds 80). Training only, no evaluation.",
             "", f"- command: `{report['command']}`",
             f"- machine: {report['machine']}", f"- torch {report['torch']}, {report['threads']} threads",
             f"- recipe: {report['recipe']}",
             f"- load average before / after: {report['loadavg_before']} / {report['loadavg_after']}",
             f"- background load: {report['background']}", "",
             "", "This run itself keeps about 2 cores busy (1-minute load average about 2); a clearly higher load "
             "average after a row means another process shared the CPU during it.", "",
             "| model | params | NCHW s/epoch | channels_last s/epoch | channels_last speed-up | timed batches "
             "| 1-min load after (NCHW / CL) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    by = {}
    for r in report["results"]:
        by.setdefault(r["model"], {})[r["channels_last"]] = r
    for spec, d in by.items():
        a, b = d.get(False), d.get(True)
        if a is None or b is None:
            continue
        lines.append(f"| `{spec}` | {a['params']:,} | {a['seconds_per_epoch_extrapolated']:.0f} | "
                     f"{b['seconds_per_epoch_extrapolated']:.0f} | "
                     f"{a['seconds_per_batch'] / b['seconds_per_batch']:.2f}x | "
                     f"{a['timed_batches']} / {b['timed_batches']} | "
                     f"{a['loadavg_after'][0]:.1f} / {b['loadavg_after'][0]:.1f} |")
    lines += ["", "Speed-up > 1 means channels_last is faster."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("HETFUSE_DATA", "/work/shared/data"))
    ap.add_argument("--models", default=",".join(MODELS), help="semicolon-separated zoo specs")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per configuration (default 30)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="time budget per configuration: slower models get fewer timed batches (min 5)")
    ap.add_argument("--background", default="none noticed",
                    help="free-text note on other load on the machine, copied into the results")
    ap.add_argument("--out", default="results/train_speed")
    a = ap.parse_args(argv)
    models = [m for m in (a.models.split(";") if ";" in a.models else _split_specs(a.models)) if m]
    ds = load_dataset("cifar10", a.data_root)
    report = {"command": " ".join(["python"] + [shlex.quote(x) for x in [sys.argv[0]] + (argv or sys.argv[1:])]),
              "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "recipe": "batch 128, random crop 4 + flip, one-cycle (max lr 0.1) over 391 batches, Nesterov "
                        "SGD momentum 0.9, weight decay 5e-4, label smoothing 0.1",
              "extrapolated": True, "warmup_batches": WARMUP, "epoch_batches": math.ceil(ds.x_train.shape[0] / BATCH),
              "data_note": ds.note, "background": a.background, "loadavg_before": _loadavg(), "results": []}
    t0 = time.perf_counter()
    for spec in models:
        for cl in (False, True):
            r = time_one(spec, ds, channels_last=cl, batches=a.batches, max_seconds=a.max_seconds)
            report["results"].append(r)
            print(f"{spec:18s} channels_last={cl!s:5s} {r['seconds_per_batch']:.3f} s/batch -> "
                  f"{r['seconds_per_epoch_extrapolated']:.0f} s/epoch ({r['timed_batches']} batches)", flush=True)
    report["loadavg_after"] = _loadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "train_speed.md").write_text(_markdown(report))
    print(f"wrote {out / 'train_speed.md'} and {out / 'train_speed.json'}")
    return 0


def _split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs whose own options also use commas (``vgg11:w=0.25,bn``)."""
    specs: list[str] = []
    for part in text.split(","):
        if ":" in part or not specs:
            specs.append(part.strip())
        else:
            specs[-1] += "," + part.strip()
    return specs


if __name__ == "__main__":
    sys.exit(main())
