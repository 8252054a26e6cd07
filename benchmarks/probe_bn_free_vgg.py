"""Does a BatchNorm-free CIFAR VGG train with this CPU budget? (the choice stated in CLAFusion Tables 3-4)

    HETFUSE_DATA=../shared/data python benchmarks/probe_bn_free_vgg.py --out results/clafusion/bn_free_probe

VGG11 x0.125 with and without BatchNorm, PyTorch's default initialisation, 3 epochs on a seeded 10,000-image
subset of CIFAR-10 (SGD momentum 0.9, weight decay 5e-4, batch 128, crop + flip, constant lr), one thread;
training loss per epoch and accuracy on 2000 random test images (seeded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from hetfuse.data import load_dataset
    from hetfuse.models import build_model
    from hetfuse.train import accuracy, train_model

    torch.set_num_threads(1)
    ds = load_dataset("cifar10", None)
    idx = torch.randperm(ds.x_train.shape[0], generator=torch.Generator().manual_seed(0))[:10000]
    test = torch.randperm(ds.x_test.shape[0], generator=torch.Generator().manual_seed(1))[:2000]  # files are by class
    rows = []
    for spec, lr in (("vgg11:w=0.125,nobn", 0.05), ("vgg11:w=0.125,nobn", 0.01), ("vgg11:w=0.125,bn", 0.05)):
        torch.manual_seed(0)
        m = build_model(spec, input_dim=3, output_dim=10, input_shape=ds.input_shape)
        t0 = time.perf_counter()
        hist = train_model(m, ds.x_train[idx], ds.y_train[idx], epochs=3, lr=lr, momentum=0.9, batch_size=128,
                           weight_decay=5e-4, seed=0, augment=True, schedule="constant", progress=False)
        rows.append({"arch": spec, "lr": lr, "loss": [h["loss"] for h in hist],
                     "test_accuracy_2000": accuracy(m, ds.x_test[test], ds.y_test[test]),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# BatchNorm-free VGG probe", "", f"Command: `python benchmarks/probe_bn_free_vgg.py --out {a.out}`. "
             "VGG11 ×0.125, 3 epochs on 10,000 CIFAR-10 training images (seeded), SGD momentum 0.9, weight decay "
             "5e-4, batch 128, crop + flip, constant lr; accuracy on 2000 random test images (seeded).", "",
             "| arch | lr | training loss per epoch | test accuracy |", "|---|---|---|---|"]
    lines += [f"| `{r['arch']}` | {r['lr']} | {', '.join(f'{v:.3f}' for v in r['loss'])} | "
              f"{r['test_accuracy_2000']:.2f} |" for r in rows]
    lines += ["", "ln 10 = 2.303: a loss that stays there has learned nothing."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
