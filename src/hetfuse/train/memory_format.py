"""When the ``channels_last`` memory format is safe to train with.

torch 2.13.0's CPU build corrupts memory on some processors (seen on an AMD EPYC with AVX2 and no AVX-512) in the
backward pass of a 1×1, stride-2 ``Conv2d`` with fewer than 8 input channels in ``channels_last``: with one
thread the process dies (segmentation fault, bus error or abort), with two it can spin forever. The minimal
reproduction (plain torch, no hetfuse) is in the README's troubleshooting section.

hetfuse keeps ``channels_last`` as an option (it is 15-25 % faster where it works) but checks once per machine
and torch build, in a child process that runs that exact trigger, whether this processor is affected; where it
is (or the check does not finish within a minute), training quietly uses the default memory format instead and
warns once. ``HETFUSE_CHANNELS_LAST=0`` never uses it; ``HETFUSE_CHANNELS_LAST=1`` skips the check and trusts
the processor. The verdict is cached under the cache root (``channels_last-<key>.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import warnings

import torch

ENV_VAR = "HETFUSE_CHANNELS_LAST"
PROBE_TIMEOUT_S = 60

# The trigger: the backward pass of 1x1 stride-2 convolutions with 2..7 input channels in channels_last, on one
# thread (two threads can hang instead of crashing, so the child runs single-threaded under a time limit).
PROBE = """
import torch
from torch import nn
torch.set_num_threads(1)
torch.manual_seed(0)
for cin in (2, 3, 4, 6):
    conv = nn.Conv2d(cin, 2 * cin, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(16, cin, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    conv(x).sum().backward()
print("ok")
"""

_verdict: bool | None = None
_warned = False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key() -> str:
    text = "|".join([torch.__version__, _cpu_name(), platform.machine(), str(torch.backends.cpu.get_cpu_capability())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe() -> bool:
    """Run the trigger in a child process; True when it finishes cleanly within the time limit."""
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    except (subprocess.TimeoutExpired, OSError):
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("ok")


def channels_last_safe() -> bool:
    """Whether training in ``channels_last`` is safe on this processor (see the module docstring)."""
    global _verdict
    env = os.environ.get(ENV_VAR, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if _verdict is not None:
        return _verdict
    from ..cache import cache_dir

    path = cache_dir(f"channels_last-{_key()}.json")
    try:
        _verdict = bool(json.loads(path.read_text())["safe"])
        return _verdict
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _verdict = probe()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"safe": _verdict, "torch": torch.__version__, "cpu": _cpu_name().strip()}))
    except OSError:
        pass
    return _verdict


def use_channels_last(requested: bool, model: torch.nn.Module | None = None) -> bool:
    """``requested`` where it is safe; where it is not, False with one warning per process. Models without a
    convolution never need it."""
    global _warned
    if not requested:
        return False
    if model is not None and not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    if channels_last_safe():
        return True
    if not _warned:
        _warned = True
        warnings.warn("channels_last is not used: this processor crashes torch's channels_last convolution "
                      "backward (see the README's troubleshooting section); training in the default memory format",
                      RuntimeWarning, stacklevel=3)
    return False
