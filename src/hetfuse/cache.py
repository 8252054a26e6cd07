"""The one cache root of hetfuse: decoded data sets and trained checkpoints of the experiments.

``$HETFUSE_CACHE`` if set, else ``~/.cache/hetfuse``. Data sets go to ``<root>/datasets`` (the CIFAR-10 decode
is about 177 MB), trained models of the experiments to ``<root>/models`` under names that hash everything
that changes the result (data set, split, architecture, recipe, seed, epochs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_ENV_VAR = "HETFUSE_CACHE"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path("~/.cache/hetfuse").expanduser()


def cache_dir(*parts: str) -> Path:
    return cache_root().joinpath(*parts)


def cache_key(spec: dict, *, prefix: str = "") -> str:
    """A file-name-safe key for a JSON-able ``spec`` (readable prefix + hash of everything in it)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix)[:80]
    return f"{safe}-{digest}" if safe else digest
