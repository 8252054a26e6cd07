"""lsq in one pass against the layer-by-layer route (results/bench/gap_methods/summary.md, fifth-session section).

    python benchmarks/lsq_one_pass.py new   # one pass of every network (the default route)
    python benchmarks/lsq_one_pass.py old   # the layer-by-layer route, forced by LOCKSTEP_BYTES = 0

Random ResNet-20 and ResNet-32, 2000 random CIFAR-shaped samples, LMA + perm-acts + lsq fitted on 500, one thread;
prints the seconds, the combine stage, peak RSS and a checksum of the fused outputs.
"""

import sys
import time
import resource
import torch
import hetfuse.repair.lsq as lsq
from hetfuse import fuse
from hetfuse.models import build_model
torch.set_num_threads(1)
if sys.argv[1] == "old":
    lsq.LOCKSTEP_BYTES = 0
torch.manual_seed(0)
a, b = (build_model(arch, input_dim=3, output_dim=10, input_shape=(3, 32, 32)).eval()
        for arch in ("resnet20", "resnet32"))
x = torch.randn(2000, 3, 32, 32)
t0 = time.perf_counter()
res = fuse([a, b], x, samples=400, repair_samples=2000, depth_align="lma", match="perm-acts", repair="lsq",
           fit_samples=500)
print(sys.argv[1], round(time.perf_counter() - t0, 1), res.report["timings"].get("combine_s"), "peak MB",
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
with torch.no_grad():
    print(float(res.model(x[:200]).double().sum()))
