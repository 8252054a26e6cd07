"""Seconds per CIFAR-10 training epoch of the candidate parent architectures on this CPU: threads per process,
batch size, memory format, and two single-threaded processes at once versus one process with two threads.

    python benchmarks/parents_recipe.py --out results/bench/parents_recipe

Each case runs in a fresh child process: a model from the zoo, SGD (Nesterov, momentum 0.9) on random 32x32
batches with cross-entropy, 2 warm-up steps then ``--steps`` timed steps; the time per step is scaled to one epoch of
50,000 images (a class-split task model sees 25,000: half that). ``pair`` cases start two such processes at once,
each with one thread, and report each one's epoch time (the throughput of the machine is two epochs in that time).
``channels_last`` cases run only where hetfuse's probe says the processor survives it
(:mod:`hetfuse.train.memory_format`). Accuracy per epoch of the recipe actually used is in the parents' own
``log.csv`` files (``results/parents/*/log.csv``). Writes ``parents_recipe.json``, ``parents_recipe.md`` and
``command.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ARCHS = ["resnet20:w=1", "resnet32:w=1", "resnet20:w=2", "vgg11:w=0.5,bn", "vgg16:w=0.5,bn"]
CHILD = r"""
import sys, time, torch, torch.nn.functional as F
from hetfuse.models import build_model
arch, threads, bs, cl, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
m = build_model(arch, input_dim=3, output_dim=10, input_shape=(3, 32, 32))
x, y = torch.randn(bs, 3, 32, 32), torch.randint(0, 10, (bs,))
if cl:
    m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
m.train()
for i in range(2 + steps):
    if i == 2:
        t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()
print((time.perf_counter() - t0) / steps)
"""


def _split_archs(text: str) -> list[str]:
    """Zoo strings separated by commas, where options inside a spec also use commas (``vgg11:w=0.5,bn``): a part
    that does not start a zoo name joins the spec before it."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if out and (":" not in part and not part.startswith(("resnet", "vgg", "mvgg", "mlp", "vit", "bert"))):
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


def run(arch, threads, bs, cl, steps):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-c", CHILD, arch, str(threads), str(bs), "1" if cl else "0", str(steps)],
                            stdout=subprocess.PIPE, text=True, env=env)


def epoch_s(proc, bs):
    out, _ = proc.communicate()
    return round(float(out.strip().splitlines()[-1]) * 50_000 / bs, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated zoo architectures (default: all)")
    a = ap.parse_args()
    from hetfuse.train.memory_format import channels_last_safe

    safe = channels_last_safe()
    rows = []
    import platform

    for arch in _split_archs(a.archs):
        for threads, bs, cl in [(1, 128, False), (1, 256, False), (2, 128, False), (2, 256, False),
                                (1, 128, True), (2, 128, True)]:
            if cl and not safe:
                continue
            rows.append({"arch": arch, "mode": "one process", "threads": threads, "batch": bs, "channels_last": cl,
                         "epoch_s": epoch_s(run(arch, threads, bs, cl, a.steps), bs)})
            print(rows[-1], flush=True)
        procs = [run(arch, 1, 128, False, a.steps) for _ in range(2)]
        times = [epoch_s(p, 128) for p in procs]
        rows.append({"arch": arch, "mode": "two processes at once", "threads": 1, "batch": 128, "channels_last": False,
                     "epoch_s": max(times), "each_epoch_s": times})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parents_recipe.json").write_text(json.dumps({"channels_last_safe": safe, "rows": rows}, indent=2) + "\n")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    lines = ["# Seconds per CIFAR-10 epoch (50,000 images) of the candidate parents on this CPU", "",
             f"Processor: {cpu}.", "",
             f"channels_last safe on this processor: {safe} (unsafe: those rows are not run).", "",
             "| arch | mode | threads | batch | channels_last | s / epoch |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['mode']} | {r['threads']} | {r['batch']} | {r['channels_last']} | "
                     f"{r['epoch_s']} |")
    (out / "parents_recipe.md").write_text("\n".join(lines) + "\n")
    from hetfuse.experiments.common import write_command

    write_command(out, "python " + " ".join(shlex.quote(x) for x in sys.argv))


if __name__ == "__main__":
    main()
