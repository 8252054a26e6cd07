"""``hetfuse demo``: skill transfer between two MLPs of different depth and width on bundled data.

Uses scikit-learn's bundled 8x8 digits (1,797 images, no download): model A (64-48-32, a specialist
for digit 4 trained on every 4 plus 10% of the other digits) and model B (64-64-48-32, trained on
the rest) are fused with CLAFusion at several weights of B.
"""

from __future__ import annotations

import sys
import time

import torch

from .config import FusionConfig
from .data import load_dataset, skill_split
from .experiments.common import first_alignment
from .pipeline import prepare_fusion
from .models import MLP
from .train import accuracy, ensemble_accuracy, train_model

WBS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def run_demo(*, seed: int = 0, epochs: int = 40, progress: bool = True) -> str:
    """The demo's result table. ``progress``: a line per stage on stderr (with the seconds so far) and progress
    bars, so that a slow machine is seen to be working. Runs on one thread: its networks are tiny, and on a 2-core
    machine with another job running, two threads made it 5-10 times slower (38-62 s instead of 5-8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(seed=seed, epochs=epochs, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(*, seed: int, epochs: int, progress: bool) -> str:
    t0 = time.perf_counter()

    def stage(text: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:5.1f} s] {text}", file=sys.stderr, flush=True)

    stage("loading scikit-learn's 8x8 digits")
    ds = load_dataset("digits")
    parts = {}
    for name, hidden, split in (("A", [48, 32], "a"), ("B", [64, 48, 32], "b")):
        torch.manual_seed(seed)
        model = MLP(ds.input_dim, hidden, ds.num_classes, bias=False)
        idx = skill_split(ds.y_train, split, seed=seed)
        stage(f"training model {name} ({'-'.join(map(str, [ds.input_dim, *hidden, ds.num_classes]))}) on "
              f"{len(idx)} images, {epochs} epochs")
        train_model(model, ds.x_train[idx], ds.y_train[idx], epochs=epochs, lr=0.05, momentum=0.9, batch_size=32,
                    seed=seed, progress=progress, desc=f"train {name} {hidden}")
        parts[name] = model
    a, b = parts["A"], parts["B"]
    acc_a, acc_b = accuracy(a, ds.x_test, ds.y_test), accuracy(b, ds.x_test, ds.y_test)
    rows = []
    mapping: list[int] = []
    for balance in ("add", "merge"):
        stage(f"fusing A and B (CLA depth alignment, balance {balance}, OT on activations)")
        prep = prepare_fusion([a, b], ds.x_train, FusionConfig(balance=balance, samples=400, seed=seed,
                                                               progress=progress))
        if balance == "add":
            mapping = [i + 1 for i in first_alignment(prep.report) or []]
        stage(f"scoring the fused model ({balance}) at {len(WBS)} weights, with and without repair, and the "
              "ensemble")
        for wb in WBS:
            w = [1 - wb, wb]
            rows.append((balance, wb, accuracy(prep.combine(w, repair=False), ds.x_test, ds.y_test),
                         accuracy(prep.combine(w, repair=True), ds.x_test, ds.y_test),
                         ensemble_accuracy([a, b], w, ds.x_test, ds.y_test)))
    lines = [
        "hetfuse demo: skill transfer on scikit-learn's 8x8 digits (1397 train / 400 test images)",
        f"  model A  64-48-32-10     (digit 4 + 10% of the rest): {acc_a:6.2f}%",
        f"  model B  64-64-48-32-10  (the rest):                  {acc_b:6.2f}%",
        f"  CLA mapping of A's hidden layers into B's, shallow → deep (1-based, neurons representation): "
        f"{', '.join(f'{j + 1}→{v}' for j, v in enumerate(mapping))}",
        "",
        f"  {'balance':<8}{'wB':>5}{'fused':>9}{'+repair':>9}{'ensemble':>10}",
    ]
    for balance, wb, f0, f1, ens in rows:
        lines.append(f"  {balance:<8}{wb:>5.1f}{f0:>8.2f}%{f1:>8.2f}%{ens:>9.2f}%")
    stage("done")
    lines.append("")
    lines.append(f"  (one fused network, no retraining; {time.perf_counter() - t0:.1f} s in all)")
    return "\n".join(lines)
