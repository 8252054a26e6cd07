"""Fusing ImageNet-size networks on a GPU: time and peak GPU memory per stage (the scale issue's §3).

    python benchmarks/gpu/fuse_imagenet_size.py --out results/bench/gpu          # on a machine with a GPU
    python benchmarks/gpu/fuse_imagenet_size.py --small --device cpu             # a smoke run of the same code

Pairs, random weights (the cost does not depend on training), 512 random 224 x 224 images (nothing is read or
downloaded), LMA depth alignment + perm-acts + the default repair:

* ResNet-18 + ResNet-34 and ResNet-50 + ResNet-101, written here in the usual torchvision layout (7x7 stem,
  max-pool, BasicBlock / Bottleneck stages, projection shortcuts) — user-style models, described by tracing;
* two ViT-B-size encoders (zoo ``vit``: dim 768, 12 heads, MLP 3072, patch 16) of depths 12 and 16.

Per case: seconds and peak GPU memory (MB, ``torch.cuda.max_memory_allocated``) of each stage (depth alignment and
balancing, matching, applying the maps, combining with repair) from the fusion's report. Cases run one after the
other in this process; a case that runs out of GPU memory is recorded as such and the next one runs.
``--small``: tiny widths, 32 x 32 images, 32 samples, to check the script on a CPU. Under 10 minutes on one
H100-class GPU is the aim. Writes ``results.json``, ``summary.md`` and ``command.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nn.Module):
    def __init__(self, block, layers, widths=(64, 128, 256, 512), classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics of a trained network, roughly: not all 0 / 1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build_pairs(small: bool) -> dict[str, tuple]:
    from hetfuse.models import build_model

    w = (8, 16, 32, 64) if small else (64, 128, 256, 512)
    side = 32 if small else 224
    vit = "vit:depth={d},dim={dim},heads={h},patch={p},mlp={mlp}"
    vdim, vheads, vmlp, vpatch = (32, 4, 64, 8) if small else (768, 12, 3072, 16)
    classes = 10 if small else 1000
    return {
        "resnet18+resnet34": (lambda: ImageNetResNet(BasicBlock, [2, 2, 2, 2], w, classes),
                              lambda: ImageNetResNet(BasicBlock, [3, 4, 6, 3], w, classes), side),
        "resnet50+resnet101": (lambda: ImageNetResNet(Bottleneck, [3, 4, 6, 3], w, classes),
                               lambda: ImageNetResNet(Bottleneck, [3, 4, 23, 3], w, classes), side),
        "vit-b12+vit-b16": tuple(
            (lambda d=d: build_model(vit.format(d=d, dim=vdim, h=vheads, p=vpatch, mlp=vmlp), input_dim=3,
                                     output_dim=classes, input_shape=(3, side, side))) for d in (12, 16)) + (side,),
    }


def run_case(name: str, make_a, make_b, side: int, n: int, device: torch.device) -> dict:
    from hetfuse import fuse

    torch.manual_seed(0)
    a = _randomize_bn(make_a(), 0).to(device).eval()
    torch.manual_seed(1)
    b = _randomize_bn(make_b(), 1).to(device).eval()
    x = torch.randn(n, 3, side, side, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    res = fuse([a, b], x, samples=n, repair_samples=n, depth_align="lma", match="perm-acts")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    params = [sum(p.numel() for p in m.parameters()) for m in (a, b, res.model)]
    return {"case": name, "seconds": round(seconds, 2), "samples": n, "image": side, "params": params,
            "fused_depth_from": res.report["depths_in"], "device": str(device),
            "timings_s": {k: round(v, 2) for k, v in res.report["timings"].items()},
            "gpu_peak_mb": res.report.get("gpu_peak_mb", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths and images: a CPU smoke run")
    ap.add_argument("--samples", type=int, default=None, help="default 512 (32 with --small)")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    a = ap.parse_args()
    device = torch.device(a.device)
    n = a.samples or (32 if a.small else 512)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for name, (make_a, make_b, side) in build_pairs(a.small).items():
        if a.only and a.only not in name:
            continue
        try:
            rows.append(run_case(name, make_a, make_b, side, n, device))
        except torch.cuda.OutOfMemoryError as exc:  # say so and go on with the next pair
            rows.append({"case": name, "error": f"out of GPU memory: {exc}"})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        from hetfuse.experiments.common import write_command

        path = Path(a.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps({"device": card, "rows": rows}, indent=2) + "\n")
        write_command(path, "python " + " ".join(shlex.quote(x) for x in sys.argv))
        lines = [f"# Fusing ImageNet-size pairs on {card}", "",
                 f"{n} random images; LMA + perm-acts + default repair; seconds and peak GPU memory per stage.", "",
                 "| case | total s | depth s | match s | apply maps s | combine s | peak MB per stage |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['error']} | | | | | |")
                continue
            t = r["timings_s"]
            lines.append(f"| {r['case']} | {r['seconds']} | {t.get('depth_s')} | {t.get('match_s')} | "
                         f"{t.get('apply_maps_s')} | {t.get('combine_s')} | {r['gpu_peak_mb']} |")
        (path / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
