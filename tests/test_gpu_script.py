"""The prepared GPU benchmark (benchmarks/gpu/fuse_imagenet_size.py) runs where no GPU is: its --small mode on the
CPU fuses the same three pairs (torchvision-layout ResNets, ViT encoders of depths 12 and 16) at toy sizes, so the
script a lent GPU machine would run is known to work. Only its first pair here (CI time)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "fuse_imagenet_size.py"


def test_the_gpu_benchmark_runs_small_on_the_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--only", "resnet18",
                          "--samples", "8", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["case"] == "resnet18+resnet34" and row["device"] == "cpu"
    assert row["fused_depth_from"][0] < row["fused_depth_from"][1]
    assert set(row["timings_s"]) >= {"depth_s", "match_s", "apply_maps_s", "combine_s"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["device"] == "CPU" and saved["rows"][0]["case"] == "resnet18+resnet34"
    assert (tmp_path / "summary.md").read_text().startswith("# Fusing ImageNet-size pairs on CPU")
