"""hetfuse: fuse trained neural networks of different depths and widths without retraining.

The public API is imported lazily, so ``import hetfuse`` costs little more than ``import torch``.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "fuse": "pipeline", "prepare_fusion": "pipeline", "FusionResult": "pipeline", "PreparedFusion": "pipeline",
    "FusionConfig": "config", "align_depth": "align", "cross_layer_alignment": "align",
    "save_model": "io", "load_model": "io", "methods": "registry", "describe": "graph",
    "barrier": "barriers", "BarrierResult": "barriers",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hetfuse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
